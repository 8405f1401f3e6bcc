"""The ambient node simulator on the real kernel (issue 5): istio-cni's rules capture
traffic into the ztunnel stand-in, pod A -> pod B works and is intact with and without
the agent, and everything is removed afterwards, also when a step fails. These run on
the HAProxy stand-in; the HBONE one (the default) has tests/test_hbone.py."""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from eztunnel_lab import counters, inpod, netlab, sim, standin
from eztunnel_lab.netlab import Lab
from eztunnel_lab.sim import AmbientNode, SimError

from .conftest import PY, TOOLS, flowcheck_client, flowcheck_server, require_root, wait_line

pytestmark = pytest.mark.kernel


@pytest.fixture
def node() -> Iterator[AmbientNode]:
    require_root()
    with AmbientNode(("a", "b"), agent=False, standin="haproxy") as n:
        yield n


def peer_server(node: AmbientNode, pod: sim.SimPod, port: int) -> None:
    proc = node.spawn(
        pod, [PY, str(TOOLS / "peer.py"), "server", "0.0.0.0", str(port)], stdout=subprocess.PIPE
    )
    wait_line(proc, "listening")


def peer_client(node: AmbientNode, netns: str, host: str, port: int) -> str:
    """The address the server saw us come from (after an echo round trip)."""
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, PY, str(TOOLS / "peer.py"), "client", host, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[0]


def flowcheck(
    node: AmbientNode, src: sim.SimPod, dst: sim.SimPod, port: int, conns: int, *extra: str
) -> dict[str, object]:
    return flowcheck_client(
        node.lab, src.pod, dst.ip, port, "--conns", str(conns), *extra, timeout=70
    )


def leftovers(node: AmbientNode, pids: list[int]) -> list[str]:
    left = node.leftovers()
    left += [
        f"pid {pid}"
        for pid in pids
        if Path(f"/proc/{pid}").exists()
        and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    ]
    return left


# ---- the rules and the stand-in ------------------------------------------------------------


def test_rules_are_istio_cnis_and_stand_in_sockets_carry_the_mark(node: AmbientNode) -> None:
    for pod in node.pods:
        dump = inpod.dump(pod.netns)
        for rule in (
            "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
            "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark "
            "--nfmask 0xffffffff --ctmask 0xffffffff",
            "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! "
            "--mark 0x539/0xfff -j REDIRECT --to-ports 15006",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff "
            "-j REDIRECT --to-ports 15001",
            "-A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff "
            "-j REDIRECT --to-ports 15001",
            "32764:\tfrom all fwmark 0x111/0xfff lookup 100",
            "local default dev lo",
        ):
            assert rule in dump, f"{rule!r} missing in {pod.netns}:\n{dump}"
        # Every stand-in listener in the pod carries ztunnel's mark (simmark).
        ss = node.lab.exec(pod.netns, "ss", "-ltnpeH").stdout
        lines = [line for line in ss.splitlines() if "haproxy" in line]
        assert len(lines) == 3 and all("fwmark:0x539" in line for line in lines), ss


def test_outbound_is_captured_and_delivered_from_the_client_ip(node: AmbientNode) -> None:
    a, b = node.pods
    peer_server(node, b, 9000)
    before, tls0 = node.standin_stats(), int(standin.info(node.stats_socket)["CumSslConns"])
    seen = peer_client(node, a.netns, b.ip, 9000)
    hops = sim.check_path(before, node.standin_stats(), "a", "b", 1)
    assert hops == {"out-a": 1, "hbone-a": 1, "in-b": 1, "app-b": 1}
    assert seen == a.ip  # transparent source, as ztunnel's freebind_connect
    # Both ends of the pod-to-pod leg are TLS (the client side and the server side).
    assert int(standin.info(node.stats_socket)["CumSslConns"]) - tls0 == 2


def test_inbound_plaintext_is_captured_on_15006(node: AmbientNode) -> None:
    b = node.pods[1]
    peer_server(node, b, 9000)
    before = node.standin_stats()
    # From the node (not a mesh pod, no mark): istio-cni sends it to 15006 in pod b.
    seen = peer_client(node, node.lab.node, b.ip, 9000)
    after = node.standin_stats()
    assert after["inplain-b"].sessions_total - before["inplain-b"].sessions_total == 1
    assert after["app-b"].sessions_total - before["app-b"].sessions_total == 1
    assert seen == "10.240.0.1"


_MTLS_PROBE = textwrap.dedent("""
    import socket, ssl, sys
    host, ca, cert = sys.argv[1], sys.argv[2], sys.argv[3]
    s = socket.create_connection((host, 15008), timeout=5)
    s.sendall(f"PROXY TCP4 10.240.0.1 {host} 40000 9000\\r\\n".encode())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    if cert != "-":
        ctx.load_cert_chain(cert)
    try:
        t = ctx.wrap_socket(s)
        t.recv(100)  # the app's first line, or the server's alert
        print("accepted")
    except (ssl.SSLError, OSError) as e:
        print("refused", e)
""")


def test_hbone_port_requires_a_mesh_client_certificate(node: AmbientNode) -> None:
    b = node.pods[1]
    peer_server(node, b, 9000)
    pki = node.workdir / "pki"

    def probe(cert: str) -> str:
        return node.lab.exec(
            node.lab.node, PY, "-c", _MTLS_PROBE, b.ip, str(pki / "ca.pem"), cert
        ).stdout

    assert probe("-").startswith("refused")
    assert probe(str(pki / "a.pem")).startswith("accepted")


# ---- pod A -> pod B, with and without the agent ----------------------------------------------


def test_a_to_b_without_agent_is_intact_and_not_spliced(node: AmbientNode) -> None:
    a, b = node.pods
    flowcheck_server(node.lab, b.pod, 9000)
    before = node.standin_stats()
    flowcheck(node, a, b, 9000, 24)
    sim.check_path(before, node.standin_stats(), "a", "b", 24)
    assert not node.lab.bpffs.exists() and node.counters() == {}


def test_a_to_b_with_agent_every_hop_spliced_and_intact(node: AmbientNode) -> None:
    a, b = node.pods
    flowcheck_server(node.lab, b.pod, 9000)
    node.start_agent()  # fake istiod over xDS -> endpoint map
    assert node.enrolled() == sorted([a.ip, b.ip])
    before, c0 = node.standin_stats(), node.counters()
    flowcheck(node, a, b, 9000, 24, "--concurrency", "1")
    sim.check_path(before, node.standin_stats(), "a", "b", 24)
    delta = counters.delta(c0, node.counters())
    for rule in counters.HOP_RULES:
        assert delta[rule] == 24, delta  # S1-S2, S3-S4, S5-S6 of each connection
    assert delta["bytes_redirected"] > 0 and delta["np_no_peer"] == 0
    # Concurrent, up to 4 MB each way: still intact (whatever got spliced).
    flowcheck(node, a, b, 9000, 32, "--max-size", str(4 << 20))
    # The agent's own CLI sees the same (it runs inside the node netns).
    out = node.cli("stats", "--json")
    assert out.returncode == 0 and int(json.loads(out.stdout)["counters"]["pairs_capture"]) >= 24


# ---- backpressure: a stalled application must slow its sender down ----------------------------


def flood(node: AmbientNode, src: sim.SimPod, dst: sim.SimPod, port: int) -> str:
    """MB a sender got accepted towards an application that never reads."""
    node.spawn(
        dst, [PY, str(TOOLS / "peer.py"), "sink", "0.0.0.0", str(port)], stdout=subprocess.PIPE
    )
    node.wait_listening(dst.netns, [port], "the sink", timeout=10)
    proc = node.spawn(
        src, [PY, str(TOOLS / "peer.py"), "flood", dst.ip, str(port), "512"], stdout=subprocess.PIPE
    )
    out, _ = proc.communicate(timeout=30)
    return out.decode().strip()


def test_stalled_reader_bounds_the_sender_without_agent(node: AmbientNode) -> None:
    a, b = node.pods
    accepted = flood(node, a, b, 9100)
    assert int(accepted.split()[0]) < 64, accepted


def test_stalled_reader_bounds_the_sender_with_agent(node: AmbientNode) -> None:
    a, b = node.pods
    node.start_agent()
    accepted = flood(node, a, b, 9100)
    assert int(accepted.split()[0]) < 64, accepted


# ---- the lab's helpers ---------------------------------------------------------------------------

_LISTEN = textwrap.dedent("""
    import socket, time
    v4 = socket.socket()
    v4.bind(("127.0.0.1", 19000))
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::", 9001))
    for s in (v4, v6):
        s.listen()
    print("listening", flush=True)
    time.sleep(60)
""")


def test_wait_listening_needs_each_exact_port_and_fails_when_the_server_exits(lab: Lab) -> None:
    pod = lab.add_pod()
    wait_line(lab.spawn(pod, [PY, "-c", _LISTEN], stdout=subprocess.PIPE), "listening")
    netlab.wait_listening(pod.name, [19000, 9001], 5)
    assert netlab.listening(pod.name, [9001])  # IPv6 wildcard, printed as *:9001
    assert not netlab.listening(pod.name, [9000])  # :19000 is not :9000
    assert not netlab.listening(pod.name, [19000, 9000])  # every port, not any
    with pytest.raises(netlab.WaitError, match="timed out waiting for"):
        netlab.wait_listening(pod.name, [9000], 0.3)
    dead = lab.spawn(pod, [PY, "-c", "raise SystemExit(3)"])
    with pytest.raises(netlab.WaitError, match=r"process exited \(3\)"):
        netlab.wait_listening(pod.name, [9000], 30, dead)


def test_counter_delta_is_what_moved_and_counts_new_counters_from_zero() -> None:
    before = {"pairs": 5, "pairs_capture": 2}
    after = {"pairs": 9, "pairs_capture": 2, "np_no_peer": 3}
    assert counters.delta(before, after) == {"pairs": 4, "pairs_capture": 0, "np_no_peer": 3}


# ---- nothing is left behind -------------------------------------------------------------------


def test_everything_removed_when_a_step_fails_after_the_agent_started() -> None:
    node = AmbientNode(("a", "b"), agent=True)
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="injected"), node:
        assert node.standin == "hbone"  # the default stand-in
        assert node.proxy and node.istiod and node.agent_proc
        pids = [node.proxy.pid, node.istiod.pid, node.agent_proc.pid]
        assert (node.lab.bpffs / "link_sockops").exists()
        raise RuntimeError("injected")
    assert leftovers(node, pids) == []


def test_everything_removed_when_start_fails_half_way(monkeypatch: pytest.MonkeyPatch) -> None:
    real = inpod.install
    calls: list[str] = []

    def failing(netns: str) -> None:
        calls.append(netns)
        if len(calls) == 2:
            raise RuntimeError("injected: rules of the second pod")
        real(netns)

    monkeypatch.setattr(inpod, "install", failing)
    node = AmbientNode(("a", "b"), agent=False)
    with pytest.raises(RuntimeError, match="injected"), node:
        pass
    assert leftovers(node, []) == []


def test_everything_removed_when_the_stand_in_does_not_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(standin, "config", lambda *a, **k: "global\n    no-such-keyword\n")
    node = AmbientNode(("a", "b"), agent=False, standin="haproxy")
    with pytest.raises(SimError, match="haproxy rejected"), node:
        pass
    assert leftovers(node, []) == []
