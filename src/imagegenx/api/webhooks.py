"""Task callbacks as Standard Webhooks (https://www.standardwebhooks.com/, spec 1.0.0).

Each delivery is an HTTP POST of ``{"type": ..., "timestamp": <ISO 8601>, "data": {...}}`` with the
headers ``webhook-id`` (the same on every retry: receivers use it as an idempotency key),
``webhook-timestamp`` (unix seconds of *this attempt*) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``), so any Standard Webhooks library verifies
it, e.g. ``standardwebhooks.Webhook(secret).verify(body, headers)``.

Delivery runs on daemon worker threads fed by a bounded schedule (``max_pending``): a request never
waits for a receiver, and a dead receiver cannot make memory grow. Following the spec's status
handling, 2xx is success; network errors, timeouts, 408, 425, 429 and 5xx are retried with
exponential backoff and jitter (honouring ``Retry-After``); anything else (3xx, 4xx, 410 Gone) fails
at once. Every attempt checks the URL against SSRF first and connects to the checked address.
Deliveries live in memory: a process that dies loses the ones not yet made (the task record stays
the source of truth, clients can poll it).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from imagegenx.api.ssrf import Target, UnsafeURL, check_url, make_client, redact
from imagegenx.types import UserError

__all__ = ["WebhookSender", "new_secret", "sign"]

log = logging.getLogger(__name__)

_SECRET_PREFIX = "whsec_"
_MIN_SECRET_BYTES = 24  # the spec's minimum for HMAC secrets
_RETRY_STATUSES = frozenset({408, 425, 429})


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _secret_key(secret: str) -> bytes:
    encoded = secret.removeprefix(_SECRET_PREFIX).rstrip("=")
    try:
        # Padding is optional, as in the reference library.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise UserError("the webhook secret is not valid base64 after the 'whsec_' prefix") from None
    if not key:
        raise UserError("the webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}.{body}">``."""
    if "." in msg_id:
        raise ValueError("a webhook id must not contain '.'")
    to_sign = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(_secret_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


@dataclass
class _Delivery:
    url: str
    event_type: str
    msg_id: str
    body: bytes
    attempts: int = 0


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    retry: bool = False
    retry_after_s: float | None = None
    error: str = ""


class WebhookSender:
    """Signs and delivers webhooks in the background, with retries.

    ``retries``: attempts after the first (so ``retries=0`` tries once); the n-th retry waits
    ``base_delay_s * 2**(n-1)``, scaled by a random factor in [0.5, 1] and capped at ``max_delay_s``
    (or the receiver's ``Retry-After``, also capped). ``check`` vets the URL before every attempt and
    raises ``UnsafeURL`` to refuse it; if it returns a ``ssrf.Target`` the POST goes to the checked
    address. Tests pass ``functools.partial(check_url, allow_hosts={"127.0.0.1:PORT"})``.

    ``send`` never blocks: when ``max_pending`` deliveries are waiting it drops the new one (logged,
    counted in ``stats["dropped"]``). ``close`` stops taking new ones and drains what is pending.
    """

    def __init__(
        self,
        secret: str,
        *,
        retries: int = 5,
        base_delay_s: float = 1.0,
        check: Callable[[str], Target | None] = check_url,
        max_delay_s: float = 3600.0,
        timeout_s: float = 15.0,
        max_pending: int = 10_000,
        workers: int = 2,
    ) -> None:
        if len(_secret_key(secret)) < _MIN_SECRET_BYTES:
            raise UserError(f"a webhook secret needs at least {_MIN_SECRET_BYTES} bytes (see new_secret())")
        if retries < 0 or base_delay_s < 0 or max_pending < 1 or workers < 1:
            raise ValueError("retries and base_delay_s must be >= 0, max_pending and workers >= 1")
        self._secret = secret
        self._retries = retries
        self._base_delay_s = base_delay_s
        self._max_delay_s = max_delay_s
        self._timeout_s = timeout_s
        self._check = check
        self._max_pending = max_pending
        self._n_workers = workers
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Delivery]] = []  # (due, seq, delivery)
        self._seq = itertools.count()
        self._inflight = 0
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._stopped = False
        self.stats = {"delivered": 0, "failed": 0, "dropped": 0, "attempts": 0}

    # -- public API ---------------------------------------------------------------------------------

    def send(self, url: str, event_type: str, data: dict, *, msg_id: str | None = None) -> None:
        """Queue one event for ``url``. ``msg_id`` (no '.') defaults to a fresh ``msg_...`` id."""
        msg_id = msg_id or "msg_" + secrets.token_urlsafe(18)
        if "." in msg_id:
            raise ValueError("a webhook id must not contain '.'")
        payload = {"type": event_type, "timestamp": _now_iso(), "data": data}
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        delivery = _Delivery(url=url, event_type=event_type, msg_id=msg_id, body=body)
        with self._cond:
            if self._closing or len(self._heap) >= self._max_pending:
                self.stats["dropped"] += 1
                why = "the sender is closed" if self._closing else f"{self._max_pending} are already pending"
                log.warning("webhook %s %s to %s dropped: %s", event_type, msg_id, redact(url), why)
                return
            self._start_workers()
            heapq.heappush(self._heap, (time.monotonic(), next(self._seq), delivery))
            self._cond.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or in flight; False if ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._heap and not self._inflight, timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking new events, deliver the pending ones (retries included) for up to ``timeout``
        seconds, then drop what is left (logged) and stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._cond:
            if self._heap:
                self.stats["dropped"] += len(self._heap)
                log.warning("webhook sender closed with %d deliveries undelivered", len(self._heap))
                self._heap.clear()
            self._stopped = True
            self._cond.notify_all()

    def __enter__(self) -> WebhookSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- workers --------------------------------------------------------------------------------------

    def _start_workers(self) -> None:  # with self._cond held
        if self._threads:
            return
        for i in range(self._n_workers):
            thread = threading.Thread(target=self._run, name=f"webhooks-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _next(self) -> _Delivery | None:
        """The next due delivery, waiting for it; None when the worker should exit."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                if self._heap:
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        self._inflight += 1
                        return heapq.heappop(self._heap)[2]
                elif self._closing and not self._inflight:
                    return None
                else:
                    wait = None
                self._cond.wait(wait)

    def _run(self) -> None:
        while (delivery := self._next()) is not None:
            try:
                outcome = self._attempt(delivery)
            except Exception as exc:  # a bug must not kill the worker thread
                log.exception("webhook %s %s: unexpected error", delivery.event_type, delivery.msg_id)
                outcome = _Outcome(ok=False, error=repr(exc))
            with self._cond:
                self._inflight -= 1
                self._settle(delivery, outcome)
                self._cond.notify_all()

    def _settle(self, delivery: _Delivery, outcome: _Outcome) -> None:  # with self._cond held
        where = f"webhook {delivery.event_type} {delivery.msg_id} to {redact(delivery.url)}"
        if outcome.ok:
            self.stats["delivered"] += 1
            log.debug("%s delivered after %d attempt(s)", where, delivery.attempts)
        elif outcome.retry and delivery.attempts <= self._retries and not self._stopped:
            delay = self._backoff(delivery.attempts, outcome.retry_after_s)
            log.info(
                "%s attempt %d failed (%s); retrying in %.1fs", where, delivery.attempts, outcome.error, delay
            )
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), delivery))
        else:
            self.stats["failed"] += 1
            log.warning("%s gave up after %d attempt(s): %s", where, delivery.attempts, outcome.error)

    def _backoff(self, attempts: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(max(0.0, retry_after_s), self._max_delay_s)
        delay = self._base_delay_s * 2 ** (attempts - 1)
        return min(delay * random.uniform(0.5, 1.0), self._max_delay_s)

    def _attempt(self, delivery: _Delivery) -> _Outcome:
        delivery.attempts += 1
        with self._cond:
            self.stats["attempts"] += 1
        try:
            target = self._check(delivery.url)
        except UnsafeURL as exc:
            return _Outcome(ok=False, error=str(exc))
        except UserError as exc:  # e.g. DNS failure: may recover
            return _Outcome(ok=False, retry=True, error=str(exc))
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._secret, delivery.msg_id, timestamp, delivery.body),
        }
        url, extensions = delivery.url, {}
        if target is not None:
            url, extensions = target.request_url, target.extensions
            headers.update(target.headers)
        try:
            # One client per attempt: connections are never shared between receivers.
            with (
                make_client(self._timeout_s) as client,
                client.stream(
                    "POST", url, content=delivery.body, headers=headers, extensions=extensions
                ) as r,
            ):
                status, retry_after = r.status_code, r.headers.get("retry-after")
        except httpx.HTTPError as exc:
            return _Outcome(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return _Outcome(ok=True)
        retry = status >= 500 or status in _RETRY_STATUSES
        return _Outcome(
            ok=False, retry=retry, retry_after_s=_parse_retry_after(retry_after), error=f"HTTP {status}"
        )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
