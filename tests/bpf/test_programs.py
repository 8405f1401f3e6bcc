"""The BPF programs on the real kernel: what they splice, what they refuse, and that every
byte arrives intact either way (pairing, backpressure, fallback, the kill switch, the
pairing proof).

Every test runs in its own lab: pod network namespaces on a bridge inside a
private node netns, one cgroup the programs attach to, one bpffs directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from eztunnel_lab.counters import delta as counters_delta
from eztunnel_lab.netlab import Lab, Pod
from eztunnel_plugin.bpf import layout, loader, syscalls
from eztunnel_plugin.bpf.maps import Dataplane

from ..conftest import (
    PY,
    TOOLS,
    enroll,
    finish_hold,
    flowcheck_client,
    flowcheck_server,
    hold_client,
    hold_server,
    wait_for,
    wait_line,
)
from .conftest import build_object
from .tools import TOOLS as BPF_TOOLS

pytestmark = pytest.mark.kernel

MB = 1 << 20


# 1. ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ip4", "ip6"])
def test_spliced_flow_is_observed_and_intact(lab: Lab, dp: Dataplane, family: str) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    b_ip = getattr(b, family)
    hold_server(lab, b, "::" if family == "ip6" else "0.0.0.0", 9000)
    before = dp.counters.read()
    client = hold_client(lab, a, b_ip, 9000, "--size", str(MB))

    flows = dp.sockinfo.flows()
    assert len(flows) == 1, flows
    flow = flows[0]
    assert flow.rule is layout.Rule.CROSS_MIRROR
    assert flow.active_netns != flow.passive_netns
    assert flow.remote.endswith(":9000") and b_ip in flow.remote
    assert flow.bytes_active_to_passive >= MB and flow.bytes_passive_to_active >= MB
    # The proof it was paired on: both ends hold the connection's two sequence numbers.
    socks = dp.sockinfo.sockets()
    active, passive = socks[flow.active_cookie], socks[flow.passive_cookie]
    assert (active.hs_snd_nxt, active.hs_rcv_nxt) == (passive.hs_rcv_nxt, passive.hs_snd_nxt)

    finish_hold(client, rounds=3)
    delta = counters_delta(before, dp.counters.read())
    assert delta["pairs"] == 1 and delta["pairs_cross_mirror"] == 1
    assert delta["bytes_redirected"] >= 8 * MB  # 4 rounds of 1 MB each way
    assert delta.get("msgs_passed", 0) == 0
    wait_for(lambda: not dp.sockinfo.sockets(), what="side tables cleaned on close")


# 2. ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ip4", "ip6"])
def test_integrity_under_stress(lab: Lab, dp: Dataplane, family: str) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    flowcheck_server(lab, b, 9000)
    before = dp.counters.read()
    result = flowcheck_client(
        lab,
        a,
        getattr(b, family),
        9000,
        "--conns",
        "80",
        "--concurrency",
        "64",
        "--min-size",
        "1",
        "--max-size",
        str(16 * MB),
        "--seed",
        "7" if family == "ip4" else "8",
    )
    delta = counters_delta(before, dp.counters.read())
    assert delta["pairs"] == 80
    # A flow whose reader lags by more than TCP's own buffer falls back to TCP.
    redirected_or_fell_back = delta["bytes_redirected"] >= result["bytes"]  # type: ignore[operator]
    assert redirected_or_fell_back or delta.get("backlog_fallbacks", 0) > 0
    wait_for(lambda: not dp.sockinfo.sockets(), what="side tables cleaned on close")


def test_integrity_when_flows_fall_back_mid_stream(lab: Lab, dp: Dataplane) -> None:
    # A tiny backlog limit makes most flows switch from redirection to TCP part-way,
    # in both directions, under concurrency: the switch must never reorder a byte.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    dp.config.set_backlog_limit(64 * 1024)
    flowcheck_server(lab, b, 9000, "--read-delay", "0.0005", "--read-chunk", "65536")
    before = dp.counters.read()
    flowcheck_client(
        lab, a, b.ip4, 9000,
        "--conns", "48", "--concurrency", "48", "--min-size", str(256 * 1024),
        "--max-size", str(8 * MB), "--read-delay", "0.0005", "--read-chunk", "65536",
    )  # fmt: skip
    delta = counters_delta(before, dp.counters.read())
    assert delta["pairs"] == 48
    assert delta["backlog_fallbacks"] > 10 and delta["bytes_redirected"] > 0


# 3. ----------------------------------------------------------------------------


def test_half_close_then_peer_keeps_sending(lab: Lab, dp: Dataplane) -> None:
    # flowcheck half-closes after sending, then reads the server's 4 MB and checks
    # the EOF comes exactly after the trailer, once.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    flowcheck_server(lab, b, 9000)
    before = dp.counters.read()
    flowcheck_client(
        lab, a, b.ip4, 9000, "--conns", "8", "--min-size", "1", "--max-size", str(4 * MB)
    )
    assert counters_delta(before, dp.counters.read())["pairs"] == 8


def _rst_outcome(lab: Lab, server_pod: Pod, client_pod: Pod, host: str, port: int) -> str:
    srv = lab.spawn(
        server_pod,
        [PY, str(TOOLS / "rst.py"), "server", "0.0.0.0", str(port)],
        stdout=subprocess.PIPE,
    )
    wait_line(srv, "listening")
    cli = lab.spawn(
        client_pod,
        [PY, str(TOOLS / "rst.py"), "client", host, str(port)],
        stdout=subprocess.PIPE,
    )
    cli.wait(timeout=10)
    assert cli.returncode == 0
    out, _ = srv.communicate(timeout=15)
    return out.decode().split()[-1]


def test_abrupt_close_behaves_like_plain_tcp(lab: Lab, dp: Dataplane) -> None:
    a, b, c, d = (lab.add_pod() for _ in range(4))
    enroll(dp, a, b)  # a->b spliced, c->d plain
    before = dp.counters.read()
    spliced = _rst_outcome(lab, b, a, b.ip4, 9001)
    assert counters_delta(before, dp.counters.read())["pairs"] == 1
    plain = _rst_outcome(lab, d, c, d.ip4, 9002)
    assert plain == "reset"
    assert spliced == plain


# 4. ----------------------------------------------------------------------------


def test_nginx_sendfile_to_curl(lab: Lab, dp: Dataplane, tmp_path: Path) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(24 * MB + 12345)
    (www / "blob").write_bytes(blob)
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""
        daemon off; master_process off; worker_processes 1;
        pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;
        events {{ worker_connections 64; }}
        http {{
          access_log off; sendfile on; tcp_nopush on;
          client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
          fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path};
          server {{ listen {b.ip4}:8080; root {www}; }}
        }}
    """)
    )
    nginx = lab.spawn(b, ["nginx", "-c", str(conf), "-p", str(tmp_path)])
    wait_for(
        lambda: lab.exec(b.name, "ss", "-ltn", "sport = :8080").stdout.count("LISTEN") > 0,
        what="nginx listening",
    )
    before = dp.counters.read()
    out = tmp_path / "got"
    for _ in range(3):
        curl = lab.spawn(a, ["curl", "-sS", "--fail", "-o", str(out), f"http://{b.ip4}:8080/blob"])
        assert curl.wait(timeout=60) == 0
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()
    delta = counters_delta(before, dp.counters.read())
    assert delta["pairs"] == 3
    # sendfile went through the redirect: all of it, or at least up to the backlog
    # limit before a lagging curl made it fall back to TCP.
    assert delta["bytes_redirected"] >= 3 * layout.DEFAULT_BACKLOG_LIMIT
    assert nginx.poll() is None


# 5. ----------------------------------------------------------------------------


def test_asyncio_backpressure_does_not_stall(lab: Lab, dp: Dataplane) -> None:
    # Both readers take 16 KB per 1 ms, so 32 MB writes stay far beyond the socket
    # buffers for seconds each way: every EPOLLIN and EPOLLOUT wakeup must come
    # (the kernel's lost-wakeup bug, docs/kernel.md, "Lost epoll wakeups", would stall here).
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    slow = ("--read-delay", "0.001", "--read-chunk", "16384")
    flowcheck_server(lab, b, 9000, *slow)
    before = dp.counters.read()
    flowcheck_client(
        lab,
        a,
        b.ip4,
        9000,
        "--conns",
        "6",
        "--concurrency",
        "6",
        "--min-size",
        str(32 * MB),
        "--max-size",
        str(32 * MB),
        *slow,
        timeout=100,
    )
    delta = counters_delta(before, dp.counters.read())
    assert delta["pairs"] == 6 and delta["bytes_redirected"] > 0


def test_stalled_reader_holds_the_writer_back(lab: Lab, dp: Dataplane) -> None:
    # The kernel does not bound what a redirect queues on its peer; without our
    # backlog check the writer would queue until the node's TCP memory is exhausted
    # and then get ENOMEM. With it, TCP's flow control takes over, in order.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    dp.config.set_backlog_limit(MB)
    srv = lab.spawn(b, [PY, str(TOOLS / "stall.py"), "server", b.ip4, "9000", "3"],
                    stdout=subprocess.PIPE)  # fmt: skip
    wait_line(srv, "listening")
    cli = lab.spawn(a, [PY, str(TOOLS / "stall.py"), "client", b.ip4, "9000"],
                    stdout=subprocess.PIPE)  # fmt: skip
    sent_line = cli.communicate(timeout=30)[0].decode().strip()
    assert sent_line.startswith("sent"), sent_line
    _, sent, sent_hash = sent_line.split()
    assert int(sent) < 64 * MB  # about the limit plus TCP's own buffers, not gigabytes
    read_line = srv.communicate(timeout=30)[0].decode().split("\n")[-2]
    assert read_line == f"read {sent} {sent_hash}"  # every byte, in order
    counters = dp.counters.read()
    assert counters["pairs"] == 1 and counters["backlog_fallbacks"] == 1
    assert counters["bytes_redirected"] >= MB
    wait_for(lambda: not dp.sockinfo.sockets(), what="side tables cleaned on close")


@pytest.mark.parametrize("verdict", [False, True], ids=["sk_msg-only", "skb-verdict"])
def test_fallen_back_sockets_leave_the_sockhash(lab: Lab, verdict: bool) -> None:
    # On TCP for good, a socket still pays for the sk_msg path while it is in the
    # sockhash; it leaves once nothing can arrive on its redirect queue any more (a
    # second after its peer stopped redirecting), and no byte is lost on the way.
    # A backlog fallback is for good with resume off (tests/bpf/test_resume.py has the rest).
    # With the SK_SKB verdict, TCP bytes pass through that queue too while it leaves.
    # A socket leaves only at an ACK that finds its queue empty; with the verdict, that
    # queue holds the TCP bytes too, so there the client reads at full speed and at
    # least its sockets must leave.
    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup, skb_verdict=verdict)
    try:
        _fall_back_and_leave(lab, dp, fast_client=verdict)
    finally:
        dp.close()


def _fall_back_and_leave(lab: Lab, dp: Dataplane, fast_client: bool) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    cfg = dp.config.read()
    cfg.flags = layout.ConfigFlag.NO_RESUME
    syscalls.map_update(dp.maps["ez_config"], bytes(4), bytes(cfg))
    dp.config.set_backlog_limit(64 * 1024)
    slow = ("--read-delay", "0.002", "--read-chunk", "65536")
    flowcheck_server(lab, b, 9000, *slow)
    flowcheck_client(lab, a, b.ip4, 9000, "--conns", "2", "--min-size", str(48 * MB),
                     "--max-size", str(48 * MB), *(() if fast_client else slow))  # fmt: skip
    counters = dp.counters.read()
    assert counters["backlog_fallbacks"] >= 2
    assert counters["unspliced"] >= 2, {k: v for k, v in counters.items() if v}


STREAMS = str(BPF_TOOLS / "streams.py")


@pytest.mark.parametrize("repeat", [100, 5000], ids=["100B", "5000B"])
@pytest.mark.parametrize("verdict", [False, True], ids=["sk_msg-only", "skb-verdict"])
def test_a_segment_that_repeats_received_bytes_is_delivered_once(
    lab: Lab, verdict: bool, repeat: int
) -> None:
    # A retransmission may start before bytes the receiver already has; TCP queues it
    # whole. With the SK_SKB verdict the kernel hands that whole skb on: without the
    # program's trim the reader got `repeat` bytes twice, and after its socket left the
    # sockhash it skipped as many (an EOF early). 5000 bytes take two
    # bpf_skb_adjust_room() calls (at most 4095 bytes each).
    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup, skb_verdict=verdict)
    try:
        server, client = _repeat(lab, dp, repeat)
        # The client's byte taints its socket, which then leaves the sockhash; the tail
        # and the FIN come by plain TCP.
        wait_for(lambda: dp.counters.read()["unspliced"] >= 1, what="the client's socket left")
        _finish_repeat(server, client)
        assert client.wait(timeout=10) == 0 and server.wait(timeout=10) == 0
    finally:
        dp.close()


def test_the_verdict_trims_what_a_segment_repeats(lab: Lab) -> None:
    # The program's own record: which socket got a repeating segment, and that it was cut.
    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup, skb_verdict=True)
    try:
        server, client = _repeat(lab, dp, 300)

        def flags() -> int:
            socks = list(dp.sockinfo.sockets().values())
            return int(socks[0].flags) if len(socks) == 1 else 0

        wait_for(lambda: bool(flags() & layout.SockFlag.RX_TRIMMED), what="the repeat trimmed")
        (info,) = dp.sockinfo.sockets().values()
        assert info.flags & layout.SockFlag.RX_SEQ
        assert not info.flags & layout.SockFlag.RX_UNTRIMMED
        assert info.rx_next != 0
        _finish_repeat(server, client)
    finally:
        dp.close()


def _repeat(
    lab: Lab, dp: Dataplane, back: int
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """A socket in the sockhash that receives through TCP (an unpaired connect() socket of
    an enrolled pod, to a plain server), and a segment that repeats `back` bytes it has."""
    a, c = lab.add_pod(), lab.add_pod()
    enroll(dp, a)
    server = lab.spawn(c, [PY, STREAMS, "repeat-server", "9000", "--back", str(back)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    wait_line(server, '{"listening"')
    client = lab.spawn(a, [PY, STREAMS, "repeat-client", c.ip4, "9000"], stdout=subprocess.PIPE)
    wait_line(server, '{"sent"')
    return server, client


def _finish_repeat(server: subprocess.Popen[bytes], client: subprocess.Popen[bytes]) -> None:
    """The tail and the FIN; every byte the client got came once and in order."""
    assert server.stdin is not None
    server.stdin.write(b"tail\n")
    server.stdin.flush()
    result = json.loads(wait_line(client, "{", timeout=30))
    assert result["bad_at"] == -1 and result["received"] == result["expected"], result


# 6. ----------------------------------------------------------------------------


def test_loopback_tuples_in_two_pods_stay_apart(lab: Lab, dp: Dataplane) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    # One pod-IP flow marks both netns as enrolled pods (loopback there is in scope).
    flowcheck_server(lab, b, 9000)
    flowcheck_client(lab, a, b.ip4, 9000)
    clients = []
    for pod in (a, b):
        hold_server(lab, pod, "127.0.0.1", 9100)
        clients.append(
            hold_client(
                lab, pod, "127.0.0.1", 9100, "--src", "", "--sport", "40100", "--size", str(MB)
            )
        )
    flows = [f for f in dp.sockinfo.flows() if f.remote == "127.0.0.1:9100"]
    assert len(flows) == 2, dp.sockinfo.flows()
    assert all(f.local == "127.0.0.1:40100" for f in flows)  # identical 4-tuples
    assert all(f.rule is layout.Rule.NETNS_MIRROR for f in flows)
    assert all(f.active_netns == f.passive_netns for f in flows)
    assert flows[0].active_netns != flows[1].active_netns
    for c in clients:
        finish_hold(c, rounds=5)  # random payload per round: a crossed wire fails here


def _ambient_rules(lab: Lab, a_name: str, a_dst: str, b_name: str) -> None:
    """Just enough of istio-cni's in-pod rules: capture in A, transparent return in B."""
    lab.exec(
        a_name,
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        a_dst,
        "--dport",
        "8080",
        "-m",
        "mark",
        "!",
        "--mark",
        "0x539/0xfff",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    )
    for rule in (
        [
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-m",
            "mark",
            "--mark",
            "0x539/0xfff",
            "-j",
            "CONNMARK",
            "--set-xmark",
            "0x111/0xfff",
        ],
        [
            "-t",
            "mangle",
            "-A",
            "OUTPUT",
            "-m",
            "connmark",
            "--mark",
            "0x111/0xfff",
            "-j",
            "CONNMARK",
            "--restore-mark",
            "--nfmask",
            "0xffffffff",
            "--ctmask",
            "0xffffffff",
        ],
    ):
        lab.exec(b_name, "iptables", *rule)
    lab.ip(b_name, "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100")
    lab.ip(b_name, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")


@pytest.mark.parametrize("first", ["app", "ztunnel"])
def test_ambient_s1_s5_tuple_collision(lab: Lab, dp: Dataplane, first: str) -> None:
    # S1 (app A -> B:8080, netns A, captured to 15001) and S5 (the proxy's spoofed
    # A:40000 -> B:8080 inside netns B) carry the same 4-tuple in two netns.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    _ambient_rules(lab, a.name, b.ip4, b.name)
    hold_server(lab, a, "0.0.0.0", 15001)  # the outbound capture listener (S2)
    hold_server(lab, b, b.ip4, 8080)  # the app (S6)

    def s1() -> subprocess.Popen[bytes]:
        return hold_client(lab, a, b.ip4, 8080, "--sport", "40000", "--size", str(MB))

    def s5() -> subprocess.Popen[bytes]:
        return hold_client(
            lab,
            b,
            b.ip4,
            8080,
            "--src",
            a.ip4,
            "--sport",
            "40000",
            "--mark",
            str(0x539),
            "--size",
            str(MB),
        )

    clients = [s1(), s5()] if first == "app" else [s5(), s1()]
    flows = {f.rule: f for f in dp.sockinfo.flows()}
    assert set(flows) == {layout.Rule.CAPTURE, layout.Rule.NETNS_MIRROR}, dp.sockinfo.flows()
    for f in flows.values():
        assert f.local == f"{a.ip4}:40000" and f.active_netns == f.passive_netns
    assert flows[layout.Rule.CAPTURE].active_netns != flows[layout.Rule.NETNS_MIRROR].active_netns
    for c in clients:
        finish_hold(c, rounds=5)


# 7. ----------------------------------------------------------------------------


def test_unenrolled_addresses_are_never_paired(lab: Lab, dp: Dataplane) -> None:
    a, b, c = lab.add_pod(), lab.add_pod(), lab.add_pod()
    enroll(dp, c)  # only c: a<->b is out of scope, a->c has one end enrolled
    flowcheck_server(lab, b, 9000)
    flowcheck_server(lab, c, 9000)
    before = dp.counters.read()
    flowcheck_client(lab, a, b.ip4, 9000, "--conns", "6")
    flowcheck_client(lab, a, c.ip6, 9000, "--conns", "6")
    delta = counters_delta(before, dp.counters.read())
    assert delta.get("pairs", 0) == 0
    assert delta.get("msgs_redirected", 0) == 0
    assert delta["np_out_of_scope"] == 12  # both sockets of each a<->b connection
    assert delta["np_no_peer"] == 6  # c's passive side: a never published (a not enrolled)
    assert dp.sockinfo.flows() == []
    # a's sockets towards c had no peer: after their first byte they left the sockhash,
    # so a flow to anything that is not a local peer runs at plain TCP speed.
    assert delta["unspliced"] == 6


def test_kill_switch(lab: Lab, dp: Dataplane) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    hold_server(lab, b, "0.0.0.0", 9000)
    live = hold_client(lab, a, b.ip4, 9000, "--size", str(256 * 1024))
    (flow,) = dp.sockinfo.flows()

    dp.config.set_enabled(False)
    assert not dp.config.enabled
    before = dp.counters.read()
    late = hold_client(lab, a, b.ip4, 9000)
    delta = counters_delta(before, dp.counters.read())
    assert delta.get("pairs", 0) == 0 and delta["np_disabled"] == 2
    assert live.stdin is not None
    live.stdin.write(b"x\nx\n")
    live.stdin.flush()
    wait_line(live, "round 2")
    # Both sides fell back to TCP for good: no byte may be redirected again.
    states = {s.state for s in dp.sockinfo.sockets().values() if s.rule}
    assert states == {layout.SockState.TAINTED}

    dp.config.set_enabled(True)
    moved = dp.counters.read()["bytes_redirected"]
    finish_hold(live, rounds=3)
    assert dp.counters.read()["bytes_redirected"] == moved
    finish_hold(late, rounds=1)
    new = hold_client(lab, a, b.ip4, 9000)
    assert [f.rule for f in dp.sockinfo.flows()] == [layout.Rule.CROSS_MIRROR]
    assert flow.active_cookie not in {f.active_cookie for f in dp.sockinfo.flows()}
    finish_hold(new, rounds=1)


# 8. Pairing proof (issue 9) -----------------------------------------------------

HANDSHAKE = BPF_TOOLS / "handshake.py"
Proc = subprocess.Popen[bytes]


def _hs_client(lab: Lab, pod: Pod, host: str, port: int, *extra: str) -> tuple[Proc, int]:
    """A connection that waits for "send"/"rst" on stdin; returns it and its cookie."""
    proc = lab.spawn(
        pod,
        [PY, str(HANDSHAKE), "connect", host, str(port), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    return proc, int(wait_line(proc, "connected").split()[1])


def _hs_say(proc: Proc, command: str, want: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(f"{command}\n".encode())
    proc.stdin.flush()
    wait_line(proc, want)


def _hs_finish(proc: Proc) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, f"handshake client failed (rc={proc.returncode})"


def _ack_rule(lab: Lab, pod: Pod, action: str, host: str, port: int) -> None:
    """Drop (-A) or pass again (-D) everything but SYNs from `pod` to host:port: the
    client gets established, its peer stays in SYN_RECV until its next SYN-ACK after -D."""
    lab.exec(pod.name, "iptables", action, "OUTPUT", "-p", "tcp", "-d", host,
             "--dport", str(port), "!", "--syn", "-j", "DROP")  # fmt: skip


def _cross_key(src: str, sport: int, dst: str, dport: int) -> layout.IndexKey:
    return layout.IndexKey(
        netns=0,
        local=layout.Addr.of(src),
        remote=layout.Addr.of(dst),
        local_port=sport,
        remote_port=dport,
        kind=layout.IndexKind.CROSS_MIRROR,
    )


def _index_entry(dp: Dataplane, key: layout.IndexKey) -> layout.IndexValue | None:
    raw = syscalls.map_lookup(dp.maps["ez_index"], bytes(key), ctypes.sizeof(layout.IndexValue))
    return None if raw is None else layout.IndexValue.from_buffer_copy(raw)


def _index_size(dp: Dataplane) -> int:
    return len(syscalls.map_keys(dp.maps["ez_index"], ctypes.sizeof(layout.IndexKey)))


def _put_sockinfo(dp: Dataplane, cookie: int, info: layout.SockInfo) -> None:
    syscalls.map_update(dp.maps["ez_sockinfo"], struct.pack("=Q", cookie), bytes(info))


def test_capture_pairs_a_nat_remapped_client_never_the_idle_owner_of_its_port(
    lab: Lab, dp: Dataplane
) -> None:
    # NAT gives the captured connection the source port of an idle in-scope socket W
    # (A:50000). The proxy's socket then sees W's endpoint as its client: pairing by
    # endpoint took W (each got the other's bytes); pairing by handshake takes S1.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    hold_server(lab, b, "0.0.0.0", 9000)
    hold_server(lab, a, "0.0.0.0", 15001)  # the capture listener (S2)
    idle = hold_client(lab, a, b.ip4, 9000, "--sport", "50000")  # W, owns A:50000
    lab.exec(a.name, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", b.ip4,
             "--dport", "8080", "-j", "REDIRECT", "--to-ports", "15001")  # fmt: skip
    lab.exec(a.name, "iptables", "-t", "nat", "-A", "POSTROUTING", "-p", "tcp", "-d",
             "127.0.0.1", "--dport", "15001", "-j", "SNAT", "--to-source",
             f"{a.ip4}:50000")  # fmt: skip
    app = hold_client(lab, a, b.ip4, 8080, "--sport", "40000", "--size", str(MB))  # S1
    # The remap happened: the proxy's socket has W's endpoint as its client.
    ss = lab.exec(a.name, "ss", "-Htn", "state", "established", "sport", "= :15001").stdout
    assert f"{a.ip4}:50000" in ss, ss

    flows = {f.rule: f for f in dp.sockinfo.flows()}
    assert set(flows) == {layout.Rule.CAPTURE, layout.Rule.CROSS_MIRROR}, dp.sockinfo.flows()
    capture, w = flows[layout.Rule.CAPTURE], flows[layout.Rule.CROSS_MIRROR]
    assert capture.local == f"{a.ip4}:40000" and capture.remote == f"{b.ip4}:8080"
    assert capture.active_netns == capture.passive_netns
    assert dp.sockinfo.sockets()[capture.passive_cookie].remote_port == 50000
    assert w.local == f"{a.ip4}:50000" and w.active_netns != w.passive_netns
    assert capture.passive_cookie != w.passive_cookie
    for c in (idle, app):
        finish_hold(c, rounds=5)  # random payload per round: a crossed wire fails here


def test_handshake_mismatch_is_never_paired(lab: Lab, dp: Dataplane) -> None:
    # SYNPROXY in B answers A's SYN itself and opens its own handshake to the server:
    # the tuples mirror exactly (rule 3 finds A) but the server's sequence number is
    # not the one A got, so this is not proof of one connection: no pair, TCP works.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    lab.exec(b.name, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
    lab.exec(b.name, "iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp",
             "--dport", "9000", "--syn", "-j", "CT", "--notrack")  # fmt: skip
    lab.exec(b.name, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9000", "-m",
             "conntrack", "--ctstate", "INVALID,UNTRACKED", "-j", "SYNPROXY",
             "--sack-perm", "--timestamp", "--wscale", "7", "--mss", "1460")  # fmt: skip
    lab.exec(b.name, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9000", "-m",
             "conntrack", "--ctstate", "INVALID", "-j", "DROP")  # fmt: skip
    hold_server(lab, b, "0.0.0.0", 9000)
    before = dp.counters.read()
    client = hold_client(lab, a, b.ip4, 9000, "--size", str(MB))
    finish_hold(client, rounds=3)
    delta = counters_delta(before, dp.counters.read())
    assert delta["np_handshake_mismatch"] == 1, delta
    assert delta.get("pairs", 0) == 0 and delta.get("msgs_redirected", 0) == 0
    assert delta["active_registered"] == 1  # A was a candidate, refused by the proof
    assert dp.sockinfo.flows() == []


def test_a_claimed_socket_is_never_taken_by_another_passive_one(lab: Lab, dp: Dataplane) -> None:
    # A passive socket that finds its peer CLAIMED (another one won it and is writing
    # the pair) must not touch it; and a first byte on a CLAIMED socket goes to TCP
    # for good (CLAIMED -> TAINTED), so the winner's last step fails.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    hold_server(lab, b, "0.0.0.0", 9000)
    _ack_rule(lab, a, "-A", b.ip4, 9000)
    client, cookie = _hs_client(lab, a, b.ip4, 9000)
    info = dp.sockinfo.sockets()[cookie]
    assert info.state == layout.SockState.UNPAIRED and info.active
    info.state = layout.SockState.CLAIMED  # as if a first passive socket had won it
    _put_sockinfo(dp, cookie, info)
    before = dp.counters.read()
    _ack_rule(lab, a, "-D", b.ip4, 9000)
    wait_for(lambda: dp.counters.read()["np_peer_taken"] > before["np_peer_taken"], timeout=20,
             what="the server's socket established and refused")  # fmt: skip
    delta = counters_delta(before, dp.counters.read())
    assert delta.get("pairs", 0) == 0, delta
    after = dp.sockinfo.sockets()
    assert set(after) == {cookie}  # the late passive socket registered nothing
    mine = after[cookie]
    assert mine.state == layout.SockState.CLAIMED
    assert (mine.peer_cookie, mine.peer_sk_addr, mine.rule) == (0, 0, layout.Rule.NONE)

    before = dp.counters.read()
    _hs_say(client, "send", "echoed")  # intact, through TCP
    assert dp.sockinfo.sockets()[cookie].state == layout.SockState.TAINTED
    delta = counters_delta(before, dp.counters.read())
    assert delta.get("msgs_redirected", 0) == 0 and delta["msgs_passed"] >= 1
    _hs_finish(client)


def test_a_peer_whose_state_is_gone_has_its_own_reason(lab: Lab, dp: Dataplane) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    hold_server(lab, b, "0.0.0.0", 9000)
    _ack_rule(lab, a, "-A", b.ip4, 9000)
    client, cookie = _hs_client(lab, a, b.ip4, 9000)
    assert syscalls.map_delete(dp.maps["ez_sockinfo"], struct.pack("=Q", cookie))
    before = dp.counters.read()
    _ack_rule(lab, a, "-D", b.ip4, 9000)
    wait_for(lambda: dp.counters.read()["np_peer_missing"] > before["np_peer_missing"], timeout=20,
             what="the server's socket established and refused")  # fmt: skip
    delta = counters_delta(before, dp.counters.read())
    assert delta.get("pairs", 0) == 0 and delta.get("np_tainted", 0) == 0, delta
    assert dp.sockinfo.sockets() == {}
    _hs_say(client, "send", "echoed")
    _hs_finish(client)


def test_ambiguity_survives_its_owner_closing(lab: Lab, dp: Dataplane) -> None:
    # O (netns C) and L (pod A) carry the same tuple A:40000 -> B:9000. O publishes it
    # first, L makes it ambiguous. O closes, then T (netns D) publishes the same tuple:
    # had O's close deleted the entry, T's would be clean and L's late passive socket in
    # B would find T, a socket in another netns. The entry stays ambiguous instead.
    a, b, c, d = (lab.add_pod() for _ in range(4))
    enroll(dp, a, b)
    for twin in (c, d):  # A's and B's addresses are local there: the tuple stays inside
        for ip in (a.ip4, b.ip4):
            lab.ip(twin.name, "addr", "add", f"{ip}/32", "dev", "lo")
        hold_server(lab, twin, b.ip4, 9000)
    hold_server(lab, b, "0.0.0.0", 9000)
    key = _cross_key(a.ip4, 40000, b.ip4, 9000)
    twin_args = ("--src", a.ip4, "--sport", "40000")

    owner, owner_cookie = _hs_client(lab, c, b.ip4, 9000, *twin_args)
    _ack_rule(lab, a, "-A", b.ip4, 9000)
    late, late_cookie = _hs_client(lab, a, b.ip4, 9000, "--sport", "40000")
    entry = _index_entry(dp, key)
    assert entry is not None
    assert (entry.cookie, entry.ambiguous, entry.claims) == (owner_cookie, 1, 2)

    _hs_say(owner, "rst", "closed")
    wait_for(lambda: owner_cookie not in dp.sockinfo.sockets(), what="the owner's close")
    entry = _index_entry(dp, key)
    assert entry is not None and (entry.ambiguous, entry.claims) == (1, 1)

    third, third_cookie = _hs_client(lab, d, b.ip4, 9000, *twin_args)
    entry = _index_entry(dp, key)
    assert entry is not None and (entry.ambiguous, entry.claims) == (1, 2)

    before = dp.counters.read()
    _ack_rule(lab, a, "-D", b.ip4, 9000)
    wait_for(lambda: dp.counters.read()["np_ambiguous"] > before["np_ambiguous"], timeout=20,
             what="L's passive socket established and refused")  # fmt: skip
    assert counters_delta(before, dp.counters.read()).get("pairs", 0) == 0
    # Only T's own loopback pair inside D exists; L and its peer are on plain TCP.
    (flow,) = dp.sockinfo.flows()
    assert flow.active_cookie == third_cookie and flow.rule is layout.Rule.NETNS_MIRROR
    assert late_cookie not in {flow.active_cookie, flow.passive_cookie}
    for proc in (late, third):
        _hs_say(proc, "send", "echoed")
        _hs_finish(proc)
    # The last claimant's close removes the entry: nothing is left behind.
    wait_for(lambda: _index_size(dp) == 0, what="index entries removed on close")


def test_a_tcp_repair_socket_is_never_registered(lab: Lab, dp: Dataplane) -> None:
    # TCP_REPAIR "connects" without a handshake, with sequence numbers of its choosing
    # (a forged proof): such a socket is never registered, so nothing can find it.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    before = dp.counters.read()
    proc = lab.spawn(
        a,
        [PY, str(HANDSHAKE), "repair", a.ip4, "40000", b.ip4, "9000", "1000", "2000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    cookie = int(wait_line(proc, "connected").split()[1])
    delta = counters_delta(before, dp.counters.read())
    assert delta["np_tcp_repair"] == 1 and delta["sockets_seen"] == 1, delta
    assert delta.get("active_registered", 0) == 0
    assert cookie not in dp.sockinfo.sockets() and _index_size(dp) == 0
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


@pytest.fixture
def small_dp(lab: Lab, tmp_path: Path) -> Iterator[Dataplane]:
    """The data plane with room for two sockets in its sockhash."""
    obj = build_object(tmp_path / "small.bpf.o", "BPF_DEFINES=-DEZ_SOCKHASH_ENTRIES=2")
    plane = loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=obj)
    yield plane
    plane.close()


def test_a_socket_left_out_of_a_full_sockhash_runs_no_ack_callbacks(
    lab: Lab, small_dp: Dataplane
) -> None:
    # Not in the sockhash, a socket can neither pair nor leave the sockhash, so the
    # per-ACK callback would be pure cost for its whole life, exactly when maps are full.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(small_dp, a, b)
    hold_server(lab, b, "0.0.0.0", 9000)
    first = hold_client(lab, a, b.ip4, 9000)  # takes both sockhash slots, then idles
    assert [f.rule for f in small_dp.sockinfo.flows()] == [layout.Rule.CROSS_MIRROR]
    before = small_dp.counters.read()
    # 1 MiB rounds: the tool sends a round whole before it reads the echo, which larger
    # rounds can deadlock on buffers that have not grown yet.
    second = hold_client(lab, a, b.ip4, 9000, "--size", str(MB))
    finish_hold(second, rounds=15)  # some 32 MB over TCP: thousands of ACKs
    delta = counters_delta(before, small_dp.counters.read())
    assert delta["np_map_full"] == 1 and delta["np_no_peer"] == 1, delta
    assert delta.get("pairs", 0) == 0
    assert delta.get("ack_callbacks", 0) == 0
    finish_hold(first, rounds=1)
