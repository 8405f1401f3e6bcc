"""Benchmark section `resume`: bulk flows with resumable splice, plain vs spliced.

    eztunnel-lab bench resume

Rows:
- pod -> pod iperf3, one flow, 10 s: throughput, and the share of bytes spliced;
- the TCP phase: iperf3 with every message sent through TCP while the pair stays spliced
  (a backlog limit of one byte), against plain TCP: what a fallback costs while it lasts;
- bulk then chat: one keep-alive connection alternating 64 MiB bursts with 1 KiB
  ping-pongs: the share of its bytes spliced, and the ping-pong latency after the bursts
  against before them (and against plain TCP after the same bursts);
- a reader that never reads: the kernel memory the connection holds (both sockets, skmem
  r + w + f), plugin vs plain;
- Python bulk: a writer that never pauses (1 MiB sendall) into a plain Python reader
  (256 KiB recv_into), slower than a redirect but not than TCP: throughput, with a reader
  that waits in poll (a socket timeout) and with one that blocks in recv.

The bulk-then-chat and Python bulk traffic is this module's own
(`python -m eztunnel_lab.bench.resume`).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from eztunnel_lab import counters, netlab
from eztunnel_lab.bench.metric import Metric
from eztunnel_lab.measure import agent_skb_verdict, iperf3_client, spawn_servers
from eztunnel_lab.netlab import Lab, Pod
from eztunnel_plugin.bpf import layout, loader
from eztunnel_plugin.bpf.maps import Dataplane

CHAT_PORT = 14100
NEVER_PORT = 14200
IPERF_PORT = 14300
PYBULK_PORT = 14400
MB = 1 << 20


# ---- traffic: bulk then chat (run inside the pods) ----------------------------------------


def _recv_exact(s: socket.socket, buf: memoryview, n: int) -> None:
    have = 0
    while have < n:
        got = s.recv_into(buf[have:n], n - have)
        if not got:
            raise EOFError("peer closed")
        have += got


def chat_server(port: int, rounds: int, burst: int, pings: int, msg: int) -> None:
    """Per round: `pings` answers of `msg` bytes, then a burst of `burst` bytes read; and
    a last series of pings after the last burst."""
    ls = socket.create_server(("0.0.0.0", port))
    print("listening", flush=True)
    ls.settimeout(60)
    conn, _ = ls.accept()
    conn.settimeout(120)  # event-driven (poll) reads, as ztunnel's
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(1 << 20))
    answer = b"a" * msg
    for r in range(rounds + 1):
        for _ in range(pings):
            _recv_exact(conn, buf, msg)
            conn.sendall(answer)
        if r == rounds:
            break
        left = burst
        while left:
            got = conn.recv_into(buf, min(len(buf), left))
            if not got:
                raise EOFError("peer closed mid-burst")
            left -= got
    conn.close()


def chat_client(host: str, port: int, rounds: int, burst: int, pings: int, msg: int) -> None:
    """Prints one JSON line: p50 ping-pong round trip (us) before the first burst and
    after each burst."""
    s = socket.create_connection((host, port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chunk = b"b" * (1 << 20)
    request = b"q" * msg
    buf = memoryview(bytearray(msg))
    p50s = []
    for r in range(rounds + 1):
        rtts = []
        for _ in range(pings):
            t = time.perf_counter()
            s.sendall(request)
            _recv_exact(s, buf, msg)
            rtts.append(time.perf_counter() - t)
        p50s.append(statistics.median(rtts) * 1e6)
        if r == rounds:
            break
        left = burst
        while left:
            n = min(len(chunk), left)
            s.sendall(chunk[:n])
            left -= n
    s.close()
    print(json.dumps({"p50_us": p50s}), flush=True)


# ---- measurements -----------------------------------------------------------------------


def _split(dp: Dataplane, before: dict[str, int]) -> tuple[float, int, int]:
    """Share of the bytes since `before` that were spliced, fallbacks, resumes."""
    d = counters.delta(before, dp.counters.read())
    moved = d["bytes_redirected"] + d["bytes_tcp_paired"]
    share = d["bytes_redirected"] / moved if moved else 0.0
    return share, d["backlog_fallbacks"], d["resumes"]


def _split_text(dp: Dataplane, before: dict[str, int]) -> str:
    """_split as a run's note says it: share spliced (fallbacks, resumes)."""
    s, fb, rs = _split(dp, before)
    return f"{s:.2f} ({fb} fallbacks, {rs} resumes)"


def bulk_then_chat(
    lab: Lab, a: Pod, b: Pod, cgroup: Path, port: int, rounds: int
) -> tuple[float, float]:
    """One run: (p50 round trip before the bursts, after the last burst), in us."""
    args = [str(rounds), str(64 * MB), "200", "1024"]
    me = [sys.executable, "-m", "eztunnel_lab.bench.resume"]
    srv = lab.spawn(b, [*me, "chat-server", str(port), *args], cgroup=cgroup,
                    stdout=subprocess.PIPE)  # fmt: skip
    assert srv.stdout is not None
    if b"listening" not in srv.stdout.readline():
        raise RuntimeError("chat server did not start")
    cli = lab.spawn(a, [*me, "chat-client", b.ip4, str(port), *args], cgroup=cgroup,
                    stdout=subprocess.PIPE)  # fmt: skip
    out, _ = cli.communicate(timeout=180)
    srv.wait(timeout=30)
    if cli.returncode or srv.returncode:
        raise RuntimeError(f"bulk-then-chat failed (client {cli.returncode}, server "
                           f"{srv.returncode})")  # fmt: skip
    p50s = json.loads(out.decode().splitlines()[-1])["p50_us"]
    return float(p50s[0]), float(p50s[-1])


def bulk_reader(port: int, blocking: bool) -> None:
    """Read to EOF in 256 KiB reads, waiting in poll (a timeout) or asleep in recv
    (`blocking`); print the rate."""
    ls = socket.create_server(("0.0.0.0", port))
    print("listening", flush=True)
    ls.settimeout(60)
    conn, _ = ls.accept()
    conn.settimeout(None if blocking else 60)
    buf, got, start = bytearray(256 << 10), 0, time.monotonic()
    while n := conn.recv_into(buf):
        got += n
    print(json.dumps({"gbps": got * 8 / (time.monotonic() - start) / 1e9}), flush=True)


def bulk_writer(host: str, port: int, seconds: float) -> None:
    """Write 1 MiB at a time, without a pause, for `seconds`."""
    s = socket.create_connection((host, port), timeout=60)
    chunk, end = b"x" * MB, time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(chunk)
    s.close()


def python_bulk(
    lab: Lab, a: Pod, b: Pod, cgroup: Path, port: int, seconds: int, blocking: bool
) -> float:
    """One Python bulk run: the reader's Gbit/s."""
    me = [sys.executable, "-m", "eztunnel_lab.bench.resume"]
    mode = "blocking" if blocking else "poll"
    srv = lab.spawn(b, [*me, "bulk-reader", str(port), mode], cgroup=cgroup,
                    stdout=subprocess.PIPE)  # fmt: skip
    assert srv.stdout is not None
    if b"listening" not in srv.stdout.readline():
        raise RuntimeError("bulk reader did not start")
    cli = lab.spawn(a, [*me, "bulk-writer", b.ip4, str(port), str(seconds)], cgroup=cgroup)
    cli.wait(timeout=seconds + 60)
    out, _ = srv.communicate(timeout=60)
    if cli.returncode or srv.returncode:
        raise RuntimeError(f"Python bulk failed (writer {cli.returncode}, reader "
                           f"{srv.returncode})")  # fmt: skip
    return float(json.loads(out.decode().splitlines()[-1])["gbps"])


def _skmem(lab: Lab, pod: Pod, port: int) -> int:
    """r + w + f of every established socket on `port` (either end) in the pod.

    `ss` prints f (sk_forward_alloc, an int) as unsigned: a socket whose reserve the
    kernel overdrew (seen with a verdict program) shows about 4 GiB. Read it signed."""
    out = lab.exec(pod.name, "ss", "-tnmH", "state", "established",
                   f"( sport = :{port} or dport = :{port} )").stdout  # fmt: skip
    total = 0
    for m in re.finditer(r"skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f(\d+),w(\d+)", out):
        fwd = int(m.group(2))
        total += int(m.group(1)) + (fwd - (1 << 32) if fwd >= 1 << 31 else fwd) + int(m.group(3))
    return total


def never_reads(lab: Lab, a: Pod, b: Pod, cgroup: Path, port: int) -> int:
    """Bytes of kernel memory a connection holds once its writer is blocked by a reader
    that never reads (both sockets)."""
    hold = (f"import socket,time; ls=socket.create_server(('0.0.0.0',{port})); "
            "print('listening',flush=True); c,_=ls.accept(); time.sleep(6)")  # fmt: skip
    srv = lab.spawn(b, [sys.executable, "-c", hold], cgroup=cgroup, stdout=subprocess.PIPE)
    assert srv.stdout is not None
    srv.stdout.readline()
    write = (f"import socket; s=socket.create_connection(('{b.ip4}',{port})); s.settimeout(8)\n"
             "try:\n  while True: s.sendall(b'x' * (1 << 20))\nexcept OSError: pass")  # fmt: skip
    cli = lab.spawn(a, [sys.executable, "-c", write], cgroup=cgroup)
    time.sleep(3)  # the writer is blocked by now
    held = _skmem(lab, a, port) + _skmem(lab, b, port)
    srv.wait(timeout=30)
    cli.wait(timeout=30)
    return held


def bench_resume(rounds: int, seconds: int) -> list[Metric]:
    one_flow = Metric("resume_iperf3_one_flow_10s", "Gbit/s", ">= 1.8")
    tcp_phase = Metric("resume_tcp_phase_iperf3", "Gbit/s", "")
    share = Metric("bulk_then_chat_spliced_share", "fraction", "", absolute=True)
    after = Metric("bulk_then_chat_p50_after_vs_before", "us", "")
    chat_plain = Metric("bulk_then_chat_p50_after_bursts", "us", "")
    memory = Metric("never_reading_reader_memory", "KB", "")
    py_bulk = {
        False: Metric("resume_python_bulk_poll_reader", "Gbit/s", ">= 1.0"),
        True: Metric("resume_python_bulk_blocking_reader", "Gbit/s", ">= 1.0"),
    }
    long_rounds = max(1, min(rounds, 3))  # 10 s each, both sides
    with Lab() as lab:
        a, b = lab.add_pod(), lab.add_pod()
        plain, spliced = lab.child_cgroup("plain"), lab.child_cgroup("spliced")
        with loader.install_or_reuse(lab.bpffs, spliced, skb_verdict=agent_skb_verdict()) as dp:
            for pod in (a, b):
                dp.endpoints.put(pod.ip4, layout.EP_ENROLLED)
            ports = spawn_servers(lab, b, plain, b.ip4, iperf3=[IPERF_PORT])
            ports += spawn_servers(lab, b, spliced, b.ip4, iperf3=[IPERF_PORT + 1])
            netlab.wait_listening(b.name, ports, 10)
            shares: list[str] = []
            for r in range(long_rounds):
                for cg, port, side in ((plain, IPERF_PORT, "baseline"),
                                       (spliced, IPERF_PORT + 1, "plugin")):  # fmt: skip
                    c0 = dp.counters.read()
                    bulk = iperf3_client(lab, a, cg, b.ip4, port, 10)
                    if bulk.error:
                        one_flow.failures.append(bulk.error)
                    getattr(one_flow, side).append(bulk.gbps)
                    if side == "plugin":
                        shares.append(_split_text(dp, c0))
                print(f"  iperf3 10 s round {r + 1}/{long_rounds}: {one_flow.baseline[-1]:.1f}"
                      f" -> {one_flow.plugin[-1]:.1f} Gbit/s, spliced {shares[-1]}",
                      flush=True)  # fmt: skip
            one_flow.note = "share of bytes spliced per run: " + ", ".join(shares)

            # The TCP phase: nothing fits a one-byte queue, so every message goes through
            # TCP while the pair stays in the sockhash (and keeps checking for a resume).
            for r in range(rounds):
                tcp_phase.baseline.append(
                    iperf3_client(lab, a, plain, b.ip4, IPERF_PORT, seconds).gbps
                )
                dp.config.set_backlog_limit(1)
                c0 = dp.counters.read()
                tcp_phase.plugin.append(
                    iperf3_client(lab, a, spliced, b.ip4, IPERF_PORT + 1, seconds).gbps
                )
                dp.config.set_backlog_limit(layout.DEFAULT_BACKLOG_LIMIT)
                s, _, _ = _split(dp, c0)
                if s > 0.01:
                    tcp_phase.failures.append(f"round {r}: {s:.2f} of the bytes were spliced")
            tcp_phase.note = "plugin: backlog limit 1 byte (the whole run in a TCP phase)"

            for r in range(rounds):
                port = CHAT_PORT + 2 * r
                c0 = dp.counters.read()
                before, last = bulk_then_chat(lab, a, b, spliced, port, 10)
                s, fb, rs = _split(dp, c0)
                share.plugin.append(s)
                after.baseline.append(before)
                after.plugin.append(last)
                _, plain_last = bulk_then_chat(lab, a, b, plain, port + 1, 10)
                chat_plain.baseline.append(plain_last)
                chat_plain.plugin.append(last)
                print(f"  bulk then chat {r + 1}/{rounds}: {s:.2f} spliced ({fb} fallbacks, "
                      f"{rs} resumes), p50 {before:.1f} us before, {last:.1f} us after "
                      f"(plain {plain_last:.1f} us)", flush=True)  # fmt: skip
            share.note = "10 x (64 MiB burst, 200 ping-pongs of 1 KiB), Python peers"
            after.note = "spliced: p50 before the first burst (baseline) vs after the last"
            chat_plain.note = "p50 after the last burst: plain TCP vs spliced"

            for blocking, row in py_bulk.items():
                py_shares = []
                for r in range(rounds):
                    port = PYBULK_PORT + 20 * blocking + 2 * r
                    row.baseline.append(python_bulk(lab, a, b, plain, port, seconds, blocking))
                    c0 = dp.counters.read()
                    row.plugin.append(python_bulk(lab, a, b, spliced, port + 1, seconds, blocking))
                    py_shares.append(_split_text(dp, c0))
                    print(f"  {row.name} {r + 1}/{rounds}: {row.baseline[-1]:.1f} -> "
                          f"{row.plugin[-1]:.1f} Gbit/s, spliced {py_shares[-1]}",
                          flush=True)  # fmt: skip
                row.note = "share of bytes spliced per run: " + ", ".join(py_shares)

            for r in range(max(1, rounds // 2)):
                port = NEVER_PORT + 2 * r
                memory.baseline.append(never_reads(lab, a, b, plain, port) / 1024)
                memory.plugin.append(never_reads(lab, a, b, spliced, port + 1) / 1024)
            memory.note = (
                f"both sockets' skmem r+w+f; the bound is plain + the backlog limit "
                f"({layout.DEFAULT_BACKLOG_LIMIT // 1024} KB)"
            )
    return [one_flow, tcp_phase, share, after, chat_plain, memory, *py_bulk.values()]


def section(args: argparse.Namespace) -> list[Metric]:
    return bench_resume(args.rounds, args.seconds)


def main(argv: list[str]) -> int:
    role, *rest = argv
    if role == "chat-server":
        port, rounds, burst, pings, msg = (int(x) for x in rest)
        chat_server(port, rounds, burst, pings, msg)
    elif role == "bulk-reader":
        bulk_reader(int(rest[0]), rest[1] == "blocking")
    elif role == "bulk-writer":
        bulk_writer(rest[0], int(rest[1]), float(rest[2]))
    elif role == "chat-client":
        host, *nums = rest
        port, rounds, burst, pings, msg = (int(x) for x in nums)
        chat_client(host, port, rounds, burst, pings, msg)
    else:
        print(f"unknown role {role!r}: chat-server | chat-client | bulk-reader | bulk-writer",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
