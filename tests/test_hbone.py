"""The HBONE stand-in for ztunnel (eztunnel-hbone, lab/hbone) on the real kernel: traffic
is captured, intact through every path in both families, pooled (two flows, one TLS
connection), identities are checked both ways, and nothing is left behind."""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from eztunnel_lab import hbone, netlab, sim, simpki
from eztunnel_lab.sim import AmbientNode, SimError

from .conftest import PY, require_root, wait_line

pytestmark = pytest.mark.kernel

# A dual-stack echo server that first tells the client the address it came from.
_SERVER = textwrap.dedent("""
    import socket, sys, threading
    ls = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6,
                              dualstack_ipv6=True, backlog=64)
    print("listening", flush=True)
    def serve(c, peer):
        with c:
            ip = peer[0].removeprefix("::ffff:")
            c.sendall(f"{ip}\\n".encode())
            while data := c.recv(65536):
                c.sendall(data)
    while True:
        c, peer = ls.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()
""")

# N connections held open at once; each does an echo round trip. Prints the addresses
# the server saw, then waits for stdin to close.
_HOLD = textwrap.dedent("""
    import socket, sys
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    conns, seen = [], []
    for i in range(n):
        s = socket.create_connection((host, port), timeout=10)
        f = s.makefile("rb")
        seen.append(f.readline().decode().strip())
        s.sendall(b"ping%d" % i)
        got = b""
        while len(got) < len(b"ping%d" % i):
            chunk = s.recv(16)
            if not chunk:
                sys.exit(f"EOF after {got!r}")
            got += chunk
        assert got == b"ping%d" % i, got
        conns.append(s)
    print("open", *seen, flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def node() -> Iterator[AmbientNode]:
    require_root()
    with AmbientNode(("a", "b"), agent=False, standin="hbone") as n:
        yield n


def echo_server(node: AmbientNode, pod: sim.SimPod, port: int = 9000) -> None:
    proc = node.spawn(pod, [PY, "-c", _SERVER, str(port)], stdout=subprocess.PIPE)
    wait_line(proc, "listening")


def connect_once(netns: str, host: str, port: int = 9000) -> str:
    """One connection from `netns`: the address the server saw (after an echo)."""
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, PY, "-c", _HOLD, host, str(port), "1"],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[1]


def delta(
    before: dict[str, object], after: dict[str, object], pod: str, hop: str
) -> dict[str, int]:
    b, a = before["pods"][pod][hop], after["pods"][pod][hop]  # type: ignore[index]
    return {k: int(a[k]) - int(b[k]) for k in a}


# ---- capture and delivery ------------------------------------------------------------------


def test_listeners_are_dual_stack_and_every_socket_carries_the_mark(node: AmbientNode) -> None:
    a, b = node.pods
    echo_server(node, b)
    for pod in node.pods:
        ss = node.lab.exec(pod.netns, "ss", "-ltnpeH").stdout
        lines = [line for line in ss.splitlines() if "eztunnel-hbone" in line]
        ports = sorted(line.split()[3] for line in lines)
        assert ports == ["*:15001", "*:15006", "*:15008"], ss  # [::] with v6only off
        assert all("fwmark:0x539" in line for line in lines), ss
    # An established tunnel and the socket towards the app carry it too (SO_MARK).
    hold = node.spawn(
        a, [PY, "-c", _HOLD, b.ip, "9000", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    wait_line(hold, "open")
    for pod in node.pods:
        ss = node.lab.exec(pod.netns, "ss", "-tnpeH", "state", "established").stdout
        mine = [line for line in ss.splitlines() if "eztunnel-hbone" in line]
        assert mine and all("fwmark:0x539" in line for line in mine), ss
    assert hold.stdin is not None
    hold.stdin.close()
    hold.wait(timeout=10)


@pytest.mark.parametrize("family", [4, 6])
def test_outbound_is_captured_tunnelled_and_delivered_from_the_client_ip(
    node: AmbientNode, family: int
) -> None:
    a, b = node.pods
    echo_server(node, b)
    src, dst = (a.ip, b.ip) if family == 4 else (a.pod.ip6, b.pod.ip6)
    before, t0 = node.standin_stats(), node.hbone_stats()
    seen = connect_once(a.netns, dst)
    assert seen == src  # IP_TRANSPARENT from the client's address, as ztunnel
    hops = sim.check_path(before, node.standin_stats(), "a", "b", 1)
    assert hops == {"out-a": 1, "hbone-a": 1, "in-b": 1, "app-b": 1}
    t1 = node.hbone_stats()
    assert delta(t0, t1, "a", "hbone")["tunnels_opened"] == 1
    assert delta(t0, t1, "b", "in")["tunnels_opened"] == 1  # mutual TLS completed in b
    assert delta(t0, t1, "a", "hbone")["wire_bytes_out"] > 0
    # The app saw a fresh port, not the client's (printed by the server: address only).


def test_inbound_plaintext_is_captured_on_15006(node: AmbientNode) -> None:
    b = node.pods[1]
    echo_server(node, b)
    before = node.standin_stats()
    seen = connect_once(node.lab.node, b.ip)  # from the node: not in the mesh, no mark
    after = node.standin_stats()
    assert after["inplain-b"].sessions_total - before["inplain-b"].sessions_total == 1
    assert after["app-b"].sessions_total - before["app-b"].sessions_total == 1
    assert seen == "10.240.0.1"


def test_intact_through_every_hop_in_both_families_and_pooled(node: AmbientNode) -> None:
    # The simulator's own check: flowcheck over IPv4 then IPv6, 8 flows each, SHA-256 at
    # both ends, every hop counted, at most one new tunnel per family.
    assert sim.self_check(node)


# ---- pooling -------------------------------------------------------------------------------


def test_two_flows_share_one_tls_connection(node: AmbientNode) -> None:
    a, b = node.pods
    echo_server(node, b)
    t0 = node.hbone_stats()
    hold = node.spawn(
        a, [PY, "-c", _HOLD, b.ip, "9000", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    wait_line(hold, "open")
    # Both flows are open now: one TCP (TLS) connection from a to b's 15008 carries them.
    ss = node.lab.exec(a.netns, "ss", "-tnH", "state", "established", "dport", "= :15008").stdout
    assert len(ss.splitlines()) == 1, ss
    t1 = node.hbone_stats()
    out = delta(t0, t1, "a", "hbone")
    assert out["tunnels_opened"] == 1 and out["tunnels_reused"] == 1 and out["streams"] == 2
    assert delta(t0, t1, "b", "in")["tunnels_opened"] == 1
    assert int(t1["pods"]["a"]["hbone"]["streams_active"]) == 2
    assert hold.stdin is not None
    hold.stdin.close()
    hold.wait(timeout=10)
    # The idle tunnel stays pooled: a later flow reuses it.
    connect_once(a.netns, b.ip)
    out = delta(t0, node.hbone_stats(), "a", "hbone")
    assert out["tunnels_opened"] == 1 and out["tunnels_reused"] == 2
    # Released (as 5 idle minutes would): the next flow opens a new one.
    assert node.release_idle_tunnels() == 1
    connect_once(a.netns, b.ip)
    assert delta(t0, node.hbone_stats(), "a", "hbone")["tunnels_opened"] == 2


def test_a_full_tunnel_opens_another_and_idle_ones_are_released() -> None:
    require_root()
    settings = hbone.Settings(pool_max_streams=2, pool_idle_timeout_ms=300)
    with AmbientNode(("a", "b"), agent=False, hbone_settings=settings) as node:
        a, b = node.pods
        echo_server(node, b)
        hold = node.spawn(
            a, [PY, "-c", _HOLD, b.ip, "9000", "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        wait_line(hold, "open")
        t = node.tunnels("a", "b")
        assert t is not None and t.opened == 3 and t.max_streams_on_a_tunnel == 2
        assert hold.stdin is not None
        hold.stdin.close()
        hold.wait(timeout=10)
        # No stream left: released after the idle timeout, their TLS connections closed.
        netlab.wait_until(
            lambda: node.hbone_stats()["pods"]["a"]["hbone"]["tunnels_active"] == 0,
            10,
            "idle tunnels released",
        )


# ---- identities ----------------------------------------------------------------------------

_PROBE = textwrap.dedent("""
    import socket, ssl, sys
    host, ca, cert = sys.argv[1], sys.argv[2], sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    ctx.set_alpn_protocols(["h2"])
    if cert != "-":
        ctx.load_cert_chain(cert)
    try:
        with socket.create_connection((host, 15008), timeout=5) as s:
            t = ctx.wrap_socket(s)
            # TLS 1.3: a refused client certificate shows as an alert on the first read.
            preface = b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n"
            t.sendall(preface + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # + empty SETTINGS
            head = t.recv(9)
            print("accepted" if len(head) == 9 and head[3] == 4 else f"refused {head!r}")
    except (ssl.SSLError, OSError) as e:
        print("refused", e)
""")


def test_client_certificates_are_checked(node: AmbientNode) -> None:
    b = node.pods[1]
    pki = node.workdir / "pki"
    other = simpki.MeshCA.create(node.workdir / "other-ca")  # a CA the mesh does not trust

    def probe(cert: Path | str) -> str:
        return node.lab.exec(
            node.lab.node, PY, "-c", _PROBE, b.ip, str(pki / "ca.pem"), str(cert)
        ).stdout

    t0 = node.hbone_stats()
    assert probe("-").startswith("refused")  # no client certificate
    assert probe(other.issue("a", "default", "a", "10.240.0.11")).startswith("refused")
    assert probe(pki / "a.pem").startswith("accepted")  # a's workload certificate
    refused = delta(t0, node.hbone_stats(), "b", "in")["refused"]
    assert refused == 2


def test_a_server_with_the_wrong_identity_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    require_root()
    real = simpki.MeshCA.issue

    def impostor(self: simpki.MeshCA, name: str, ns: str, sa: str, ip: str) -> Path:
        # b gets a valid mesh certificate, but for another service account.
        return real(self, name, ns, "impostor" if name == "b" else sa, ip)

    monkeypatch.setattr(simpki.MeshCA, "issue", impostor)
    with AmbientNode(("a", "b"), agent=False) as node:
        a, b = node.pods
        echo_server(node, b)
        before = node.hbone_stats()
        proc = subprocess.run(
            ["ip", "netns", "exec", a.netns, PY, "-c", _HOLD, b.ip, "9000", "1"],
            input="",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode != 0  # the connection was closed without a byte
        after = node.hbone_stats()
        assert delta(before, after, "a", "hbone")["errors"] >= 1
        assert delta(before, after, "a", "hbone")["tunnels_opened"] == 0
        assert delta(before, after, "b", "app")["connections"] == 0
        assert "is not the destination's spiffe://cluster.local/ns/default/sa/b" in (
            node.log_tail("hbone", 50)
        )


# ---- configuration and cleanup ---------------------------------------------------------------


def test_bad_configuration_is_one_line_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("workers 2\nframe_size 12\n")
    proc = subprocess.run(
        [str(hbone.binary_path()), str(cfg)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"eztunnel-hbone: {cfg}: line 2: frame_size 12 outside 16384..16777215"
    ]


def test_everything_removed_when_the_hbone_stand_in_does_not_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_root()
    monkeypatch.setattr(hbone, "config", lambda *a, **k: "no-such-setting 1\n")
    node = AmbientNode(("a", "b"), agent=False)
    with pytest.raises(SimError, match=r"(?s)process exited \(1\).*unknown setting"), node:
        pass
    assert node.leftovers() == []
