"""Which IP addresses an outbound request may reach: public unicast only.

Refused: loopback, private (RFC 1918, fc00::/7), link-local (169.254/16 including the cloud metadata
address, fe80::/10), CGNAT (100.64/10), unspecified, multicast, reserved, documentation and
benchmarking ranges, and IPv6 forms that embed such an IPv4 address (``::ffff:127.0.0.1``, 6to4).
``url_check.check_url`` applies this to every address a URL's host stands for.
"""

from __future__ import annotations

import ipaddress

__all__ = ["IPAddress", "forbidden_reason"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Special-purpose ranges (IANA registries), each with the reason shown to the user. Anything else
# that Python's ``ipaddress`` does not call global is refused as well (see ``forbidden_reason``).
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


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted, or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "link-local"
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
            return forbidden_reason(ip.ipv4_mapped)
        if ip.sixtofour is not None and (reason := forbidden_reason(ip.sixtofour)):
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
