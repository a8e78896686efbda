"""Outbound HTTP to URLs that users give us, without server-side request forgery (SSRF).

Users hand the service URLs: ``image_url`` for img2img and ControlNet, ``callback_url`` for webhooks.
Fetched naively, ``http://169.254.169.254/latest/meta-data/`` reads the cloud's instance credentials
and ``http://127.0.0.1:5432/`` reaches the database. So every outbound request goes through here:

1. ``check_url`` parses the URL itself (``urllib.parse``), refuses schemes other than http(s),
   credentials (any ``@`` in the authority), whitespace and control characters, and ``localhost``.
2. The host is normalised the way ``socket.inet_aton`` and browsers (WHATWG URL) read it: decimal
   ``2130706433``, octal ``0177.0.0.1``, hex ``0x7f.1`` and short ``127.1`` forms all become
   ``127.0.0.1``; non-ASCII hosts go through IDNA first (so full-width digits cannot hide an address).
3. A name is resolved with ``socket.getaddrinfo`` and *every* address must be public: not loopback,
   private (RFC 1918, fc00::/7), link-local (169.254/16 including the metadata address, fe80::/10),
   CGNAT (100.64/10), unspecified, multicast, reserved, documentation or benchmarking ranges, and
   IPv6 forms that embed such an IPv4 address (``::ffff:127.0.0.1``, 6to4).
4. The request then connects to the very address that was checked (the URL's host is kept in the
   ``Host`` header and as TLS SNI, so certificates are still verified against the name). Resolving
   twice would let a DNS-rebinding server answer "public" to the check and "127.0.0.1" to the
   connection.
5. Redirects are followed by hand (at most ``MAX_REDIRECTS``), each hop checked again; proxies
   from the environment are ignored; bodies are streamed and cut off at ``max_bytes``.

``allow_private`` and ``allow_hosts`` exist for tests against a server on 127.0.0.1 (and for an
operator who deliberately points callbacks at an internal host); request handlers never pass them
from user input.

``check_url`` resolves DNS and so blocks: from async code call it in a thread (``afetch`` does).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import anyio.to_thread
import httpx

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
_DEFAULT_PORTS = {"http": 80, "https": 443}
_USER_AGENT = "imagegenx"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeURL(UserError):
    """A URL the service refuses to contact: wrong scheme, credentials, or a non-public address."""


# Special-purpose ranges (IANA registries), each with the reason shown to the user. Anything else
# that Python's ``ipaddress`` does not call global is refused as well (see ``_forbidden_reason``).
_FORBIDDEN_V4 = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_FORBIDDEN_V6 = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/8", "reserved"),  # also IPv4-compatible ::a.b.c.d and NAT64 64:ff9b::/96
        ("100::/64", "reserved"),
        ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo
        ("2001:db8::/32", "reserved"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "link-local"),  # deprecated site-local
        ("ff00::/8", "multicast"),
    )
)

# WHATWG URL: a host whose last label is a number must be an IPv4 address.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)\Z")
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\Z")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


def _forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted, or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "link-local"
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
            return _forbidden_reason(ip.ipv4_mapped)
        if ip.sixtofour is not None and (reason := _forbidden_reason(ip.sixtofour)):
            return reason
        table = _FORBIDDEN_V6
    else:
        table = _FORBIDDEN_V4
    for net, reason in table:
        if ip in net:
            return reason
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private:
        return "private"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified or ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def _parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` as ``inet_aton`` does (1-4 parts, decimal/octal/hex); None if it is a name.

    A host whose last label is numeric but that is not a valid address is refused rather than
    passed to DNS, as browsers do: ``1.2.3.08`` or ``1.2.3.4.5`` have no safe meaning.
    """
    parts = host.split(".")
    if not _NUMERIC_LABEL.match(parts[-1]):
        return None
    if len(parts) > 4:
        raise UnsafeURL(f"malformed numeric host {host!r}")
    values = []
    for part in parts:
        if part.startswith("0x"):
            digits, base = part[2:] or "0", 16
        elif len(part) > 1 and part.startswith("0"):
            digits, base = part[1:], 8
        else:
            digits, base = part, 10
        try:
            values.append(int(digits, base))
        except ValueError:
            raise UnsafeURL(f"malformed numeric host {host!r}") from None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise UnsafeURL(f"malformed numeric host {host!r}")
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _netloc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def redact(url: str) -> str:
    """``url`` without credentials, query and fragment: safe to log or show in an error."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    return f"{parts.scheme}://{_netloc_host(host)}{port}{parts.path}"


@dataclass(frozen=True)
class Target:
    """A vetted URL and the one address every connection for it must go to."""

    url: str  # the URL as checked, without fragment
    scheme: str  # http or https
    host: str  # normalised: IDNA, lower case, numeric forms canonical, no brackets
    port: int
    address: str  # the checked IP address to connect to
    path: str  # path and query, as sent in the request line

    @property
    def is_ip(self) -> bool:
        return self.host == self.address

    @property
    def request_url(self) -> str:
        """The URL with the host replaced by the checked address (what httpx connects to)."""
        return f"{self.scheme}://{_netloc_host(self.address)}:{self.port}{self.path}"

    @property
    def headers(self) -> dict[str, str]:
        port = "" if self.port == _DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return {"Host": f"{_netloc_host(self.host)}{port}"}

    @property
    def extensions(self) -> dict[str, str]:
        """httpx request extensions: TLS SNI (and certificate checks) use the URL's name."""
        return {"sni_hostname": self.host} if self.scheme == "https" and not self.is_ip else {}


def check_url(
    url: str,
    *,
    allow_private: bool = False,
    allow_hosts: Collection[str] = (),
) -> Target:
    """Refuse ``url`` (``UnsafeURL``) unless it is http(s) to a public address; resolves DNS.

    Returns the vetted ``Target``; callers that only validate can ignore it, callers that connect
    should connect to ``target.address`` (``fetch`` and ``WebhookSender`` do).

    ``allow_private`` skips the address checks (scheme and credential checks remain); ``allow_hosts``
    skips them only for the listed ``"host:port"`` entries (``"127.0.0.1:8080"``, ``"[::1]:8080"``).
    Both exist for tests against a local server and for deliberate operator configuration; never
    derive them from a request.
    """
    if not isinstance(url, str) or not url:
        raise UnsafeURL("the URL is empty")
    if _BAD_CHARS.search(url):
        raise UnsafeURL("the URL contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UnsafeURL(f"only http and https URLs are allowed, not {scheme or 'a relative URL'!r}")
    if "@" in parts.netloc:
        raise UnsafeURL("URLs with credentials (user:password@host) are not allowed")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise UnsafeURL("the URL has no host")
    port = _DEFAULT_PORTS[scheme] if port is None else port
    if port == 0:
        raise UnsafeURL("port 0 is not allowed")

    host, literal = _normalise_host(raw_host, bracketed=parts.netloc.startswith("["))
    allowed = allow_private or f"{_netloc_host(host)}:{port}" in {h.lower() for h in allow_hosts}

    if literal is not None:
        addresses = [literal]
    else:
        if not allowed and (host == "localhost" or host.endswith(".localhost")):
            raise UnsafeURL(f"host {host!r} is loopback, which is not allowed")
        addresses = _resolve(host, port)
    if not allowed:
        for ip in addresses:
            if reason := _forbidden_reason(ip):
                what = (
                    f"address {ip}" if literal is not None else f"host {host!r} resolves to an address that"
                )
                raise UnsafeURL(f"{what} is {reason}, which is not allowed")

    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    clean = f"{scheme}://{_netloc_host(host)}"
    if parts.port is not None:
        clean += f":{port}"
    return Target(url=clean + path, scheme=scheme, host=host, port=port, address=str(addresses[0]), path=path)


def _normalise_host(raw: str, *, bracketed: bool) -> tuple[str, IPAddress | None]:
    """(normalised host, the IP address if the host is a literal)."""
    if bracketed:
        try:
            ip6 = ipaddress.IPv6Address(raw)
        except ValueError:
            raise UnsafeURL(f"invalid IPv6 address {raw!r}") from None
        return str(ip6), ip6
    if not raw.isascii():
        try:
            raw = raw.encode("idna").decode("ascii")
        except UnicodeError:
            raise UnsafeURL(f"invalid host name {raw!r}") from None
    host = raw.lower().removesuffix(".")
    if not host or len(host) > 253 or not _NAME.match(host):
        raise UnsafeURL(f"invalid host name {raw!r}")
    ip4 = _parse_ipv4_loose(host)
    if ip4 is not None:
        return str(ip4), ip4
    return host, None


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UserError(f"could not resolve host {host!r}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise UserError(f"could not resolve host {host!r}")
    return addresses


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
