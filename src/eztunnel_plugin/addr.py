"""One canonical text form for IP addresses, and which of them may be enrolled.

Canonical text: IPv4 as a dotted quad (also when given as v4-mapped IPv6,
::ffff:a.b.c.d, since the BPF map stores IPv4 that way and both spellings are one
key there), IPv6 compressed and lower case.

Enrollable: a unicast address a pod can own. Enrolling anything else would put
sockets in scope that belong to no pod: 127.0.0.1 would make every loopback socket
under the attach cgroup (with the chart: the whole host) eligible for splicing.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"


def _v4_refusal(n: int) -> str | None:
    first = n >> 24
    if n == 0:
        return "unspecified"  # 0.0.0.0
    if first == 0:
        return "reserved"  # 0.0.0.0/8, "this network"
    if first == 127:
        return "loopback"  # 127.0.0.0/8
    if n >> 16 == 0xA9FE:
        return "link-local"  # 169.254.0.0/16, cloud metadata among them
    if 224 <= first < 240:
        return "multicast"  # 224.0.0.0/4
    if n == 0xFFFFFFFF:
        return "broadcast"
    if first >= 240:
        return "reserved"  # 240.0.0.0/4
    return None


def _v6_refusal(n: int) -> str | None:
    if n == 0:
        return "unspecified"  # ::
    if n == 1:
        return "loopback"  # ::1
    if n >> 32 == 0xFFFF:
        return _v4_refusal(n & 0xFFFFFFFF)  # v4-mapped: one key with the IPv4 address
    if n >> 120 == 0:
        return "reserved"  # the rest of ::/8: IPv4-compatible, NAT64, ...
    if n >> 118 == 0x3FA:
        return "link-local"  # fe80::/10
    if n >> 118 == 0x3FB:
        return "reserved"  # fec0::/10, deprecated site-local
    if n >> 120 == 0xFF:
        return "multicast"  # ff00::/8
    return None


def parse(text: str) -> IPAddress:
    """The address text names; v4-mapped IPv6 becomes IPv4. Raises ValueError."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValueError(f"{text!r} carries a zone; pod addresses have none")
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
    return ip


def from_bytes(raw: bytes) -> str:
    """Canonical text of a raw 4- or 16-byte address. Raises ValueError."""
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        if raw[:12] == _V4_MAPPED_PREFIX:
            return socket.inet_ntop(socket.AF_INET, raw[12:])
        # not inet_ntop: it writes ::7f00:1 as ::127.0.0.1
        return str(ipaddress.IPv6Address(raw))
    raise ValueError(f"address has {len(raw)} bytes, want 4 or 16")


def packed16(text: str) -> bytes:
    """The 16 bytes of an address as the BPF maps key it: IPv4 v4-mapped. Raises ValueError."""
    ip = parse(text)
    return ip.packed if ip.version == 6 else _V4_MAPPED_PREFIX + ip.packed


def canonical(text: str) -> str:
    """Canonical text of an address given as text. Raises ValueError."""
    return str(parse(text))


def refusal(ip: str | IPAddress) -> str | None:
    """Why ip must never be enrolled ("loopback", "multicast", ...), or None if it may be.

    Called for every address of every local workload on each push, so it avoids
    ipaddress' parser for text. Raises ValueError for text that is not an address.
    """
    if not isinstance(ip, str):
        n = int(ip)
        return _v4_refusal(n) if ip.version == 4 else _v6_refusal(n)
    try:
        if ":" in ip:
            if "%" in ip:
                raise ValueError("zone")
            return _v6_refusal(int.from_bytes(socket.inet_pton(socket.AF_INET6, ip)))
        return _v4_refusal(int.from_bytes(socket.inet_pton(socket.AF_INET, ip)))
    except (OSError, ValueError):
        raise ValueError(f"{ip[:64]!r} is not an IP address") from None


def enrollable(ip: str | IPAddress) -> bool:
    """True for a unicast address a pod can own (text that does not parse: False)."""
    try:
        return refusal(ip) is None
    except ValueError:
        return False
