"""Vetting a URL the service was given before anything connects to it (see ``ssrf`` for the whole).

1. ``check_url`` parses the URL itself (``urllib.parse``), refuses schemes other than http(s),
   credentials (any ``@`` in the authority), whitespace and control characters, and ``localhost``.
2. The host is normalised the way ``socket.inet_aton`` and browsers (WHATWG URL) read it: decimal
   ``2130706433``, octal ``0177.0.0.1``, hex ``0x7f.1`` and short ``127.1`` forms all become
   ``127.0.0.1``; non-ASCII hosts go through IDNA first (so full-width digits cannot hide an address).
3. A name is resolved with ``socket.getaddrinfo`` and *every* address must be public
   (``address_policy``). The result, a ``Target``, names the one address to connect to.

``check_url`` resolves DNS and so blocks: from async code call it in a thread (``ssrf.afetch`` does).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

from imagegenx.api.address_policy import IPAddress, forbidden_reason
from imagegenx.types import UserError

__all__ = ["Target", "UnsafeURL", "check_url", "parse_ipv4_loose", "redact"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsafeURL(UserError):
    """A URL the service refuses to contact: wrong scheme, credentials, or a non-public address."""


# WHATWG URL: a host whose last label is a number must be an IPv4 address.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)\Z")
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\Z")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
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
            if reason := forbidden_reason(ip):
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
    ip4 = parse_ipv4_loose(host)
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
