"""One NATS connection for synchronous callers: an asyncio loop on a private daemon thread.

The queue protocol is synchronous (workers and the API call it from plain threads) while nats-py is
asyncio. Each :class:`NatsThread` owns a loop that runs forever on its own thread and one connection
made on that loop; callers hand it coroutines with :meth:`NatsThread.run`, which blocks until they end
(``asyncio.run_coroutine_threadsafe``). Many threads may call at once: their coroutines interleave on
the one loop, as nats-py expects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class NatsThread:
    """A connection to ``url`` and the loop thread that drives it; :meth:`close` ends both."""

    def __init__(self, url: str, name: str, *, timeout_s: float = 10.0) -> None:
        if not url.startswith(("nats://", "tls://")):
            raise ValueError(f"a NATS url looks like nats://host:4222, got {url!r}")
        self.timeout_s = timeout_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"{name}-nats", daemon=True)
        self._thread.start()
        try:
            self.nc = self.run(self._connect(url, name))
        except Exception as exc:
            self._stop_loop()
            raise ConnectionError(f"could not connect to NATS at {url}: {exc!r}") from exc
        self._closed = False

    async def _connect(self, url: str, name: str):
        import nats  # the scale extra; imported only when a NATS backend is chosen

        async def error_cb(exc: Exception) -> None:
            log.warning("NATS connection %s: %r", name, exc)

        # Reconnect for ever once running, but give up on the first connection after timeout_s: a
        # wrong url is a configuration error to report (nats-py would retry it for ever too).
        connecting = nats.connect(
            url, name=name, connect_timeout=2, max_reconnect_attempts=-1, error_cb=error_cb
        )
        return await asyncio.wait_for(connecting, self.timeout_s)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop thread and return its result (its exception is raised here)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(self.timeout_s * 3 if timeout_s is None else timeout_s)

    def close(self) -> None:
        """Flush what was published and close the connection, then stop the thread. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self.run(self.nc.drain())
        except Exception as exc:  # a dead server must not stop a shutdown
            log.warning("closing the NATS connection: %r", exc)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


async def pull_now(nc: Any, stream: str, consumer: str, batch: int, timeout_s: float) -> list:
    """The messages a pull consumer can deliver now, up to ``batch`` (no waiting)."""
    from nats.errors import TimeoutError as NatsTimeout

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    request = json.dumps({"batch": batch, "no_wait": True}).encode()
    messages = []
    try:
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", request, reply=inbox)
        while len(messages) < batch:
            msg = await sub.next_msg(timeout=timeout_s)
            if msg.headers and "Status" in msg.headers:  # 404 nothing / 408 nothing more now
                break
            messages.append(msg)
    except NatsTimeout:  # what the server sends this inbox later comes back after AckWait
        log.warning("JetStream pull from %s/%s got no end mark in %ss", stream, consumer, timeout_s)
    finally:
        await sub.unsubscribe()
    return messages
