"""The splicing data plane on the real kernel (issue 2, tests 1-7 and 9).

Every test runs in its own lab: pod network namespaces on a bridge inside a
private node netns, one cgroup the programs attach to, one bpffs directory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from eztunnel_plugin import bpfsys, dataplane, layout
from eztunnel_plugin.netlab import Lab, Pod

from .conftest import (
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

pytestmark = pytest.mark.kernel

MB = 1 << 20


def counters_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# 1. ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ip4", "ip6"])
def test_spliced_flow_is_observed_and_intact(
    lab: Lab, dp: dataplane.Dataplane, family: str
) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    b_ip = getattr(b, family)
    hold_server(lab, b, "::" if family == "ip6" else "0.0.0.0", 9000)
    before = dp.counters()
    client = hold_client(lab, a, b_ip, 9000, "--size", str(MB))

    flows = dp.flows()
    assert len(flows) == 1, flows
    flow = flows[0]
    assert flow.rule is layout.Rule.CROSS_MIRROR
    assert flow.active_netns != flow.passive_netns
    assert flow.remote.endswith(":9000") and b_ip in flow.remote
    assert flow.bytes_active_to_passive >= MB and flow.bytes_passive_to_active >= MB

    finish_hold(client, rounds=3)
    delta = counters_delta(before, dp.counters())
    assert delta["pairs"] == 1 and delta["pairs_cross_mirror"] == 1
    assert delta["bytes_redirected"] >= 8 * MB  # 4 rounds of 1 MB each way
    assert delta.get("msgs_passed", 0) == 0
    wait_for(lambda: not dp.sockets(), what="side tables cleaned on close")


# 2. ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ip4", "ip6"])
def test_integrity_under_stress(lab: Lab, dp: dataplane.Dataplane, family: str) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    flowcheck_server(lab, b, 9000)
    before = dp.counters()
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
    delta = counters_delta(before, dp.counters())
    assert delta["pairs"] == 80
    # A flow whose reader lags by more than TCP's own buffer falls back to TCP.
    redirected_or_fell_back = delta["bytes_redirected"] >= result["bytes"]  # type: ignore[operator]
    assert redirected_or_fell_back or delta.get("backlog_fallbacks", 0) > 0
    wait_for(lambda: not dp.sockets(), what="side tables cleaned on close")


def test_integrity_when_flows_fall_back_mid_stream(lab: Lab, dp: dataplane.Dataplane) -> None:
    # A tiny backlog limit makes most flows switch from redirection to TCP part-way,
    # in both directions, under concurrency: the switch must never reorder a byte.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    dp.set_backlog_limit(64 * 1024)
    flowcheck_server(lab, b, 9000, "--read-delay", "0.0005", "--read-chunk", "65536")
    before = dp.counters()
    flowcheck_client(
        lab, a, b.ip4, 9000,
        "--conns", "48", "--concurrency", "48", "--min-size", str(256 * 1024),
        "--max-size", str(8 * MB), "--read-delay", "0.0005", "--read-chunk", "65536",
    )  # fmt: skip
    delta = counters_delta(before, dp.counters())
    assert delta["pairs"] == 48
    assert delta["backlog_fallbacks"] > 10 and delta["bytes_redirected"] > 0


# 3. ----------------------------------------------------------------------------


def test_half_close_then_peer_keeps_sending(lab: Lab, dp: dataplane.Dataplane) -> None:
    # flowcheck half-closes after sending, then reads the server's 4 MB and checks
    # the EOF comes exactly after the trailer, once.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    flowcheck_server(lab, b, 9000)
    before = dp.counters()
    flowcheck_client(
        lab, a, b.ip4, 9000, "--conns", "8", "--min-size", "1", "--max-size", str(4 * MB)
    )
    assert counters_delta(before, dp.counters())["pairs"] == 8


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


def test_abrupt_close_behaves_like_plain_tcp(lab: Lab, dp: dataplane.Dataplane) -> None:
    a, b, c, d = (lab.add_pod() for _ in range(4))
    enroll(dp, a, b)  # a->b spliced, c->d plain
    before = dp.counters()
    spliced = _rst_outcome(lab, b, a, b.ip4, 9001)
    assert counters_delta(before, dp.counters())["pairs"] == 1
    plain = _rst_outcome(lab, d, c, d.ip4, 9002)
    assert plain == "reset"
    assert spliced == plain


# 4. ----------------------------------------------------------------------------


def test_nginx_sendfile_to_curl(lab: Lab, dp: dataplane.Dataplane, tmp_path: Path) -> None:
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
    before = dp.counters()
    out = tmp_path / "got"
    for _ in range(3):
        curl = lab.spawn(a, ["curl", "-sS", "--fail", "-o", str(out), f"http://{b.ip4}:8080/blob"])
        assert curl.wait(timeout=60) == 0
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()
    delta = counters_delta(before, dp.counters())
    assert delta["pairs"] == 3
    # sendfile went through the redirect: all of it, or at least up to the backlog
    # limit before a lagging curl made it fall back to TCP.
    assert delta["bytes_redirected"] >= 3 * layout.DEFAULT_BACKLOG_LIMIT
    assert nginx.poll() is None


# 5. ----------------------------------------------------------------------------


def test_asyncio_backpressure_does_not_stall(lab: Lab, dp: dataplane.Dataplane) -> None:
    # Both readers take 16 KB per 1 ms, so 32 MB writes stay far beyond the socket
    # buffers for seconds each way: every EPOLLIN and EPOLLOUT wakeup must come
    # (the kernel's lost-wakeup bug, design.md section 4, would stall here).
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    slow = ("--read-delay", "0.001", "--read-chunk", "16384")
    flowcheck_server(lab, b, 9000, *slow)
    before = dp.counters()
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
    delta = counters_delta(before, dp.counters())
    assert delta["pairs"] == 6 and delta["bytes_redirected"] > 0


def test_stalled_reader_holds_the_writer_back(lab: Lab, dp: dataplane.Dataplane) -> None:
    # The kernel does not bound what a redirect queues on its peer; without our
    # backlog check the writer would queue until the node's TCP memory is exhausted
    # and then get ENOMEM. With it, TCP's flow control takes over, in order.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    dp.set_backlog_limit(MB)
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
    counters = dp.counters()
    assert counters["pairs"] == 1 and counters["backlog_fallbacks"] == 1
    assert counters["bytes_redirected"] >= MB
    wait_for(lambda: not dp.sockets(), what="side tables cleaned on close")


def test_fallen_back_sockets_leave_the_sockhash(lab: Lab, dp: dataplane.Dataplane) -> None:
    # On TCP for good, a socket still pays for the sk_msg path while it is in the
    # sockhash; it leaves once nothing can arrive on its redirect queue any more (a
    # second after its peer stopped redirecting), and no byte is lost on the way.
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    dp.set_backlog_limit(64 * 1024)
    slow = ("--read-delay", "0.002", "--read-chunk", "65536")
    flowcheck_server(lab, b, 9000, *slow)
    flowcheck_client(lab, a, b.ip4, 9000, "--conns", "2", "--min-size", str(48 * MB),
                     "--max-size", str(48 * MB), *slow)  # fmt: skip
    counters = dp.counters()
    assert counters["backlog_fallbacks"] >= 2
    assert counters["unspliced"] >= 2


# 6. ----------------------------------------------------------------------------


def test_loopback_tuples_in_two_pods_stay_apart(lab: Lab, dp: dataplane.Dataplane) -> None:
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
    flows = [f for f in dp.flows() if f.remote == "127.0.0.1:9100"]
    assert len(flows) == 2, dp.flows()
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
def test_ambient_s1_s5_tuple_collision(lab: Lab, dp: dataplane.Dataplane, first: str) -> None:
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
    flows = {f.rule: f for f in dp.flows()}
    assert set(flows) == {layout.Rule.CAPTURE, layout.Rule.NETNS_MIRROR}, dp.flows()
    for f in flows.values():
        assert f.local == f"{a.ip4}:40000" and f.active_netns == f.passive_netns
    assert flows[layout.Rule.CAPTURE].active_netns != flows[layout.Rule.NETNS_MIRROR].active_netns
    for c in clients:
        finish_hold(c, rounds=5)


# 7. ----------------------------------------------------------------------------


def test_unenrolled_addresses_are_never_paired(lab: Lab, dp: dataplane.Dataplane) -> None:
    a, b, c = lab.add_pod(), lab.add_pod(), lab.add_pod()
    enroll(dp, c)  # only c: a<->b is out of scope, a->c has one end enrolled
    flowcheck_server(lab, b, 9000)
    flowcheck_server(lab, c, 9000)
    before = dp.counters()
    flowcheck_client(lab, a, b.ip4, 9000, "--conns", "6")
    flowcheck_client(lab, a, c.ip6, 9000, "--conns", "6")
    delta = counters_delta(before, dp.counters())
    assert delta.get("pairs", 0) == 0
    assert delta.get("msgs_redirected", 0) == 0
    assert delta["np_out_of_scope"] == 12  # both sockets of each a<->b connection
    assert delta["np_no_peer"] == 6  # c's passive side: a never published (a not enrolled)
    assert dp.flows() == []
    # a's sockets towards c had no peer: after their first byte they left the sockhash,
    # so a flow to anything that is not a local peer runs at plain TCP speed.
    assert delta["unspliced"] == 6


def test_kill_switch(lab: Lab, dp: dataplane.Dataplane) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    hold_server(lab, b, "0.0.0.0", 9000)
    live = hold_client(lab, a, b.ip4, 9000, "--size", str(256 * 1024))
    (flow,) = dp.flows()

    dp.set_enabled(False)
    assert not dp.enabled
    before = dp.counters()
    late = hold_client(lab, a, b.ip4, 9000)
    delta = counters_delta(before, dp.counters())
    assert delta.get("pairs", 0) == 0 and delta["np_disabled"] == 2
    assert live.stdin is not None
    live.stdin.write(b"x\nx\n")
    live.stdin.flush()
    wait_line(live, "round 2")
    # Both sides fell back to TCP for good: no byte may be redirected again.
    states = {s.state for s in dp.sockets().values() if s.rule}
    assert states == {layout.SockState.TAINTED}

    dp.set_enabled(True)
    moved = dp.counters()["bytes_redirected"]
    finish_hold(live, rounds=3)
    assert dp.counters()["bytes_redirected"] == moved
    finish_hold(late, rounds=1)
    new = hold_client(lab, a, b.ip4, 9000)
    assert [f.rule for f in dp.flows()] == [layout.Rule.CROSS_MIRROR]
    assert flow.active_cookie not in {f.active_cookie for f in dp.flows()}
    finish_hold(new, rounds=1)


# 9. ----------------------------------------------------------------------------


def _attached_prog_ids(dp: dataplane.Dataplane) -> set[int]:
    return {info.prog_id for info in dp.attachments().values()}


def _prog_exists(prog_id: int) -> bool:
    return (
        subprocess.run(
            ["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True, check=False
        ).returncode
        == 0
    )


def test_uninstall_during_live_flows(lab: Lab, dp: dataplane.Dataplane) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    flowcheck_server(lab, b, 9000, "--read-delay", "0.0005")
    hold_server(lab, b, "0.0.0.0", 9001)
    held = hold_client(lab, a, b.ip4, 9001, "--size", str(MB))
    prog_ids = _attached_prog_ids(dp)
    assert len(prog_ids) == 2
    bulk = lab.spawn(
        a,
        [
            PY,
            "-m",
            "eztunnel_plugin.flowcheck",
            "client",
            "--connect",
            b.ip4,
            "--port",
            "9000",
            "--conns",
            "8",
            "--min-size",
            str(24 * MB),
            "--max-size",
            str(24 * MB),
            "--timeout",
            "90",
        ],
        stdout=subprocess.PIPE,
    )
    wait_for(lambda: len(dp.flows()) >= 5, what="bulk flows spliced")
    dp.close()

    report = dataplane.uninstall(lab.bpffs)
    assert report.paired_sockets >= 2
    assert not lab.bpffs.exists()
    cg = subprocess.run(
        ["bpftool", "cgroup", "show", str(lab.cgroup)], capture_output=True, text=True, check=True
    )
    assert "ez_sockops" not in cg.stdout

    out, _ = bulk.communicate(timeout=100)
    assert b'"ok": true' in out, out
    finish_hold(held, rounds=3)
    # Once the last spliced socket closed, nothing of ours is left in the kernel.
    wait_for(
        lambda: not any(_prog_exists(p) for p in prog_ids),
        timeout=15,
        what="programs released after the last paired socket closed",
    )


def test_layout_mismatch_is_a_clear_error(lab: Lab, dp: dataplane.Dataplane) -> None:
    cfg = dp.config()
    cfg.layout_version = layout.LAYOUT_VERSION + 1
    bpfsys.map_update(dp.maps["ez_config"], bytes(4), bytes(cfg))
    with pytest.raises(
        dataplane.DataplaneError, match=rf"layout version {layout.LAYOUT_VERSION + 1}.*uninstall"
    ):
        dataplane.Dataplane.install_or_reuse(lab.bpffs, lab.cgroup)


def test_reuse_over_pins_attaches_nothing_twice(lab: Lab, dp: dataplane.Dataplane) -> None:
    again = dataplane.Dataplane.install_or_reuse(lab.bpffs, lab.cgroup)
    try:
        assert again.reused
        assert _attached_prog_ids(again) == _attached_prog_ids(dp)
        cg = subprocess.run(
            ["bpftool", "cgroup", "show", str(lab.cgroup)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert cg.stdout.count("ez_sockops") == 1
    finally:
        again.close()
