"""istio-cni's ambient in-pod redirection (1.24+, REDIRECT mode), installed in a pod netns.

The rules are `cni/pkg/iptables/testdata/default.golden` (identical 1.25 -> HEAD;
docs/ambient.md, "The in-pod rules") without the DNS-capture rules (nat udp/tcp 53
-> 15053 and the raw-table CT zones): the simulator has no DNS proxy, and no DNS
traffic is involved in what it measures. Plus the netlink state istio-cni adds:
`ip rule fwmark 0x111/0xfff pref 32764 lookup 100` and a `local` default route in
table 100, for IPv4 and IPv6.
"""

from __future__ import annotations

import subprocess

INPOD_MARK = 0x539  # ztunnel's sockets (cni/pkg/config InpodMark)
INPOD_MASK = 0xFFF
TPROXY_MARK = 0x111  # InpodTProxyMark: connections ztunnel made towards the app
ROUTE_TABLE = 100  # RouteTableInbound
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_PORT = 15008
PROBE_SNAT_V4 = "169.254.7.127"
PROBE_SNAT_V6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"


def rules(ipv6: bool = False) -> str:
    """iptables-restore input, in default.golden's order (DNS capture omitted)."""
    lo, probe = ("::1/128", PROBE_SNAT_V6) if ipv6 else ("127.0.0.1/32", PROBE_SNAT_V4)
    m, mask, t = f"0x{INPOD_MARK:x}", f"0x{INPOD_MASK:x}", f"0x{TPROXY_MARK:x}"
    return f"""*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark {m}/{mask} -j CONNMARK --set-xmark {t}/{mask}
-A ISTIO_OUTPUT -m connmark --mark {t}/{mask} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -s {probe} -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -d {probe} -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d {lo} -p tcp ! --dport {INBOUND_PORT} -m mark ! --mark {m}/{mask} -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}
-A ISTIO_OUTPUT -p tcp -m mark --mark {t}/{mask} -j ACCEPT
-A ISTIO_OUTPUT ! -d {lo} -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d {lo} -p tcp -m mark ! --mark {m}/{mask} -j REDIRECT --to-ports {OUTBOUND_PORT}
COMMIT
"""  # noqa: E501  (kept one rule per line, as in the golden file)


def _run(argv: list[str], stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def install(netns: str) -> None:
    """Install the rules, ip rules and routes in `netns` (a fresh pod netns)."""
    exec_ = ["ip", "netns", "exec", netns]
    _run([*exec_, "iptables-restore", "-w", "5"], rules(ipv6=False))
    _run([*exec_, "ip6tables-restore", "-w", "5"], rules(ipv6=True))
    for family, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        _run(
            [
                "ip",
                family,
                "-n",
                netns,
                "rule",
                "add",
                "fwmark",
                f"0x{TPROXY_MARK:x}/0x{INPOD_MASK:x}",
                "pref",
                "32764",
                "lookup",
                str(ROUTE_TABLE),
            ]
        )
        _run(
            [
                "ip",
                family,
                "-n",
                netns,
                "route",
                "add",
                "local",
                default,
                "dev",
                "lo",
                "table",
                str(ROUTE_TABLE),
            ]
        )


def dump(netns: str) -> str:
    """What is installed (iptables-save + ip rule), for display and tests."""
    out = []
    for argv in (
        ["iptables-save"],
        ["ip6tables-save"],
        ["ip", "-4", "rule"],
        ["ip", "-6", "rule"],
        ["ip", "-4", "route", "show", "table", str(ROUTE_TABLE)],
    ):
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False
        )
        out.append(proc.stdout)
    return "".join(out)
