"""addr: one canonical text per address, and the rule for what may be enrolled."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eztunnel_plugin import addr

ANY_IP = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
    st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed)),
    # the ranges the rule is about, so every branch is hit often
    st.sampled_from(["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3"]).flatmap(
        lambda n: st.ip_addresses(network=n)
    ),
    st.sampled_from(["::/8", "fe80::/9", "ff00::/8", "fd00::/8"]).flatmap(
        lambda n: st.ip_addresses(network=n)
    ),
)


def test_canonical_text() -> None:
    assert addr.canonical("::ffff:10.0.0.1") == "10.0.0.1"  # not ::ffff:a00:1
    assert addr.canonical("::FFFF:a00:1") == "10.0.0.1"
    assert addr.canonical("FD00:0:0::0001") == "fd00::1"
    assert addr.canonical("2001:db8:0:0:1:0:0:1") == "2001:db8::1:0:0:1"
    assert addr.from_bytes(ipaddress.ip_address("::7f00:1").packed) == "::7f00:1"
    assert addr.from_bytes(ipaddress.ip_address("::ffff:1.2.3.4").packed) == "1.2.3.4"
    for bad in ("10.0.0", "010.0.0.1", "10.0.0.1/32", "fe80::1%eth0", "", "x"):
        with pytest.raises(ValueError):
            addr.canonical(bad)
    with pytest.raises(ValueError, match="5 bytes"):
        addr.from_bytes(b"12345")


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "reserved"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("febf::1", "link-local"),
        ("fec0::1", "reserved"),
        ("::7f00:1", "reserved"),
        ("64:ff9b::a00:1", "reserved"),
        ("10.0.0.1", None),
        ("100.64.0.1", None),  # carrier-grade NAT space: some clusters give it to pods
        ("192.168.1.1", None),
        ("8.8.8.8", None),
        ("fd00::1", None),
        ("2001:db8::1", None),
        ("::ffff:10.0.0.1", None),
    ],
)
def test_refusal(ip: str, reason: str | None) -> None:
    assert addr.refusal(ip) == reason
    assert addr.refusal(ipaddress.ip_address(ip)) == reason
    assert addr.enrollable(ip) is (reason is None)


def test_text_that_is_no_address() -> None:
    for bad in ("", "localhost", "10.0.0.256", "fe80::1%lo", "1.2.3", "::g"):
        with pytest.raises(ValueError, match="not an IP address"):
            addr.refusal(bad)
        assert addr.enrollable(bad) is False


def _expected(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The rule, written with ipaddress' own predicates."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return not (
            ip in ipaddress.IPv4Network("0.0.0.0/8")
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_multicast
            or ip.is_reserved  # 240.0.0.0/4, broadcast included
        )
    return not (
        ip in ipaddress.IPv6Network("::/8")
        or ip.is_link_local
        or ip.is_site_local
        or ip.is_multicast
    )


@settings(max_examples=500, deadline=None)
@given(ANY_IP)
def test_rule_and_text_agree_with_ipaddress(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    text = str(ip)
    canonical = addr.canonical(text)
    assert addr.from_bytes(ip.packed) == canonical
    assert addr.canonical(canonical) == canonical
    assert addr.canonical(text.upper()) == canonical
    mapped = isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None
    assert ("." in canonical) == (ip.version == 4 or mapped)
    assert addr.enrollable(text) is _expected(ip)
    assert addr.enrollable(canonical) is _expected(ip)
    assert addr.enrollable(ip) is _expected(ip)
