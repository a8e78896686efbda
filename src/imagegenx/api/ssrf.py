"""Outbound HTTP to URLs that users give us, without server-side request forgery (SSRF).

Users hand the service URLs: ``image_url`` for img2img and ControlNet, ``callback_url`` for webhooks.
Fetched naively, ``http://169.254.169.254/latest/meta-data/`` reads the cloud's instance credentials
and ``http://127.0.0.1:5432/`` reaches the database. So every outbound request goes through here:

1-3. ``check_url`` (``url_check``) parses the URL itself, refuses anything but http(s) without
   credentials, normalises the host as ``inet_aton`` and browsers read it, resolves it, and requires
   *every* address to be public (``address_policy`` says which ranges are not).
4. The request then connects to the very address that was checked (the URL's host is kept in the
   ``Host`` header and as TLS SNI, so certificates are still verified against the name). Resolving
   twice would let a DNS-rebinding server answer "public" to the check and "127.0.0.1" to the
   connection.
5. Redirects are followed by hand (at most ``MAX_REDIRECTS``), each hop checked again; proxies
   from the environment are ignored; bodies are streamed and cut off at ``max_bytes``.

``allow_private`` and ``allow_hosts`` exist for tests against a server on 127.0.0.1 (and for an
operator who deliberately points callbacks at an internal host); request handlers never pass them
from user input.

This module is the entry point callers import (it re-exports the ``url_check`` names) and holds
steps 4-5: the pinned clients and the downloads. ``check_url`` resolves DNS and so blocks: from async
code call it in a thread (``afetch`` does).
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Collection
from urllib.parse import urljoin

import anyio.to_thread
import httpx

from imagegenx.api.url_check import Target, UnsafeURL, check_url, redact
from imagegenx.api.url_check import parse_ipv4_loose as _parse_ipv4_loose  # noqa: F401 (tests use it)
from imagegenx.types import UserError

__all__ = [
    "MAX_REDIRECTS",
    "Target",
    "UnsafeURL",
    "afetch",
    "check_url",
    "fetch",
    "make_async_client",
    "make_client",
    "redact",
]

MAX_REDIRECTS = 3
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "imagegenx"


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Built on first use (never at import time) and shared: loading CA certificates costs ~10 ms.
    return httpx.create_ssl_context()


def _client_kwargs(timeout_s: float) -> dict:
    return {
        "timeout": httpx.Timeout(timeout_s),
        "follow_redirects": False,  # each hop is checked by hand
        "trust_env": False,  # an environment proxy would connect to the unchecked name
        "verify": _ssl_context(),
        "headers": {"User-Agent": _USER_AGENT},
    }


def make_client(timeout_s: float) -> httpx.Client:
    """An httpx client for checked targets: no automatic redirects, no environment proxies.

    Use one client per target (or per delivery): the connection pool is keyed by address, and a
    connection opened with one TLS name must not carry a request for another name.
    """
    return httpx.Client(**_client_kwargs(timeout_s))


def make_async_client(timeout_s: float) -> httpx.AsyncClient:
    """The async twin of ``make_client``."""
    return httpx.AsyncClient(**_client_kwargs(timeout_s))


class _Download:
    """The logic ``fetch`` and ``afetch`` share: redirects, status, size cap, deadline."""

    def __init__(self, url: str, max_bytes: int, timeout_s: float) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.url = url
        self.max_bytes = max_bytes
        self.deadline = time.monotonic() + timeout_s
        self.hops = 0
        self.chunks: list[bytes] = []
        self.size = 0

    def request(self, client: httpx.Client | httpx.AsyncClient, target: Target) -> httpx.Request:
        remaining = max(0.001, self.deadline - time.monotonic())
        return client.build_request(
            "GET",
            target.request_url,
            headers={**target.headers, "Accept-Encoding": "identity"},
            extensions=target.extensions,
            timeout=httpx.Timeout(remaining),
        )

    def next_url(self, response: httpx.Response) -> str | None:
        """The redirect target to fetch next, or None when ``response`` is the final one."""
        if response.status_code not in _REDIRECT_CODES:
            if not 200 <= response.status_code < 300:
                raise UserError(f"fetching {redact(self.url)} failed: HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                self._too_large()
            return None
        location = response.headers.get("location")
        if not location:
            raise UserError(
                f"fetching {redact(self.url)} failed: HTTP {response.status_code} without Location"
            )
        self.hops += 1
        if self.hops > MAX_REDIRECTS:
            raise UserError(f"fetching {redact(self.url)} failed: more than {MAX_REDIRECTS} redirects")
        self.url = urljoin(self.url, location)
        return self.url

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self._too_large()
        self.chunks.append(chunk)
        if time.monotonic() > self.deadline:
            self.timed_out()

    def result(self) -> bytes:
        return b"".join(self.chunks)

    def timed_out(self) -> None:
        raise UserError(f"fetching {redact(self.url)} timed out")

    def failed(self, exc: httpx.HTTPError) -> None:
        if isinstance(exc, httpx.TimeoutException):
            self.timed_out()
        raise UserError(f"fetching {redact(self.url)} failed: {type(exc).__name__}") from exc

    def _too_large(self) -> None:
        raise UserError(f"the file at {redact(self.url)} is larger than {self.max_bytes} bytes")


def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float = 10,
    allow_private: bool = False,
    allow_hosts: Collection[str] = (),
) -> bytes:
    """GET ``url`` and return its body, refusing unsafe targets at every redirect hop.

    Raises ``UnsafeURL`` for a refused URL and ``UserError`` for a non-2xx status (the message names
    it), a body over ``max_bytes`` ("larger than N bytes"), more than ``MAX_REDIRECTS`` redirects, a
    network error, or more than about ``timeout_s`` in all. ``allow_private`` / ``allow_hosts``: for
    tests against a local server only (see ``check_url``).
    """
    download = _Download(url, max_bytes, timeout_s)
    with make_client(timeout_s) as client:
        next_url: str | None = url
        while next_url is not None:
            target = check_url(next_url, allow_private=allow_private, allow_hosts=allow_hosts)
            try:
                response = client.send(download.request(client, target), stream=True)
                try:
                    next_url = download.next_url(response)
                    if next_url is None:
                        for chunk in response.iter_bytes():
                            download.feed(chunk)
                finally:
                    response.close()
            except httpx.HTTPError as exc:
                download.failed(exc)
    return download.result()


async def afetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float = 10,
    allow_private: bool = False,
    allow_hosts: Collection[str] = (),
) -> bytes:
    """``fetch`` for async code: the same checks; DNS resolution runs in a worker thread."""
    download = _Download(url, max_bytes, timeout_s)
    async with make_async_client(timeout_s) as client:
        next_url: str | None = url
        while next_url is not None:
            check = functools.partial(
                check_url, next_url, allow_private=allow_private, allow_hosts=allow_hosts
            )
            target = await anyio.to_thread.run_sync(check)
            try:
                response = await client.send(download.request(client, target), stream=True)
                try:
                    next_url = download.next_url(response)
                    if next_url is None:
                        async for chunk in response.aiter_bytes():
                            download.feed(chunk)
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                download.failed(exc)
    return download.result()
