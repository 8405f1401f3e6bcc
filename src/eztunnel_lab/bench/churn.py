"""Benchmark section `churn`: new connections per second pod -> pod (no ztunnel stand-in),
and what the plugin's per-connection work costs.

    eztunnel-lab bench churn

One lab, two pods, three ways of running the same `conns churn` (traffic/conns.py: 16
workers connect, exchange one byte, close): in a cgroup with no program of ours
(baseline), in the cgroup the programs are attached to with both pods enrolled (plugin),
and there with no endpoint enrolled (sock_ops runs on every socket but pairs nothing).
Rounds interleave them and alternate who goes first. Per connection it also reports the
CPU time of the pods' cgroup and, in one extra run with BPF_ENABLE_STATS, the run time
of every program of ours (the stats cost a clock read per run, so they are never on
during the rate measurements).

The helpers (cgroup CPU, BPF run time) serve the ambient churn rows (bench/ambient.py) too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eztunnel_lab import counters, netlab, traffic
from eztunnel_lab.bench.metric import Metric
from eztunnel_lab.measure import agent_skb_verdict
from eztunnel_lab.netlab import Lab, Pod
from eztunnel_plugin.bpf import layout, loader, syscalls
from eztunnel_plugin.bpf.maps import Dataplane

PLAIN_PORT, SPLICED_PORT = 9300, 9301
CONCURRENCY = 16  # as the ambient churn row

# bpf(2) commands and struct bpf_prog_info offsets this module alone needs
_ENABLE_STATS = 32
_STATS_RUN_TIME = 0
_INFO_SIZE = 232
_RUN_TIME_OFF, _RUN_CNT_OFF = 192, 200


# ---- cost probes (also used by bench/ambient.py) -------------------------------------------


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME) for the block: the kernel times every program
    run while the returned fd is open, and stops when it closes (even if we crash)."""
    attr = ctypes.create_string_buffer(struct.pack("=I", _STATS_RUN_TIME), 128)
    fd: int = syscalls.libc().syscall(321, _ENABLE_STATS, attr, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    try:
        yield
    finally:
        os.close(fd)


def prog_runs(bpffs: Path) -> dict[str, tuple[int, int]]:
    """Program name -> (run_time_ns, run_cnt) of every pinned program of the data plane."""
    runs: dict[str, tuple[int, int]] = {}
    for pin, name in ((loader.PROG_PINS[k], v) for k, v in loader.PROGRAMS.items()):
        if not (bpffs / pin).exists():
            continue
        with syscalls.pin_fd(bpffs / pin) as fd:
            buf = ctypes.create_string_buffer(_INFO_SIZE)
            attr = ctypes.create_string_buffer(128)
            addr = ctypes.cast(buf, ctypes.c_void_p).value or 0
            struct.pack_into("=IIQ", attr, 0, fd, _INFO_SIZE, addr)
            if syscalls.libc().syscall(321, syscalls.OBJ_GET_INFO_BY_FD, attr, 128) < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"info of {pin}: {os.strerror(err)}")
            ns, cnt = struct.unpack_from("=QQ", buf.raw, _RUN_TIME_OFF)
            runs[name] = (ns, cnt)
    return runs


@dataclass
class BpfCost:
    """BPF time per connection over one churn run, and its split per program."""

    us_per_conn: float
    per_prog: dict[str, tuple[float, float]]  # name -> (runs per connection, ns per run)
    rtt_callbacks: float = 0.0  # sock_ops RTT (per-ACK) callbacks per connection

    def text(self) -> str:
        parts = [f"{n} {r:.1f} runs x {ns:.0f} ns" for n, (r, ns) in self.per_prog.items()]
        acks = f", {self.rtt_callbacks:.1f} of the sock_ops runs per-ACK RTT callbacks"
        return f"{self.us_per_conn:.1f} us of BPF per connection ({', '.join(parts)}{acks})"


def bpf_cost(
    before: dict[str, tuple[int, int]],
    after: dict[str, tuple[int, int]],
    conns: int,
    moved: dict[str, int],
) -> BpfCost:
    """From prog_runs before and after `conns` connections, and the data plane's counters'
    moves meanwhile."""
    per: dict[str, tuple[float, float]] = {}
    total_ns = 0
    for name, (ns1, cnt1) in after.items():
        ns0, cnt0 = before.get(name, (0, 0))
        runs, ns = cnt1 - cnt0, ns1 - ns0
        total_ns += ns
        per[name] = (runs / conns if conns else 0.0, ns / runs if runs else 0.0)
    if not conns:
        return BpfCost(0.0, per)
    return BpfCost(total_ns / conns / 1000, per, moved.get("ack_callbacks", 0) / conns)


# ---- pod -> pod churn ----------------------------------------------------------------------


@dataclass
class Churn:
    per_second: float
    conns: int
    cpu_us_per_conn: float  # CPU of the cgroup the client and the server run in
    pairs: int  # pairs the data plane made meanwhile
    moved: dict[str, int]  # every counter's move


class ChurnError(RuntimeError):
    """A churn run failed or took the wrong path."""


def reuse_time_wait(lab: Lab, netns: str) -> None:
    """tcp_tw_reuse=1 in a netns of the lab: every churned connection leaves a TIME_WAIT
    socket for 60 s, and without reuse they fill the client's ephemeral ports towards the
    one server within a few runs, until connect()'s port search is what is measured."""
    lab.exec(netns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")


def flush_time_wait(lab: Lab, netns: str) -> None:
    """Destroy the netns' TIME_WAIT sockets (SOCK_DESTROY), so every churn run starts from
    the same state: left to live their 60 s, those of earlier runs (and of every other
    measurement) make the next run's port searches longer, more so for whichever side ran
    more connections just before. Established sockets are not touched."""
    lab.exec(netns, "ss", "-K", "-tanH", "state", "time-wait")


def run_churn(
    lab: Lab, client: Pod, cgroup: Path, host: str, port: int, seconds: float
) -> dict[str, Any]:
    """`conns churn` from the client pod in `cgroup` to host:port: its JSON report."""
    argv = traffic.command(
        "conns", "churn", "--connect", host, "--port", str(port),
        "--seconds", str(seconds), "--concurrency", str(CONCURRENCY),
    )  # fmt: skip
    proc = lab.spawn(client, argv, cgroup=cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=seconds + 60)
    try:
        result = traffic.report(out)
    except ValueError:
        raise ChurnError(
            f"churn printed no report: {err.decode(errors='replace')[-300:]}"
        ) from None
    if not result.get("ok"):
        raise ChurnError(f"churn client: {result}")
    return result


def _measure(
    lab: Lab, dp: Dataplane, client: Pod, cgroup: Path, host: str, port: int, seconds: float
) -> Churn:
    for pod in lab.pods:
        flush_time_wait(lab, pod.name)
    c0, cpu0 = dp.counters.read(), netlab.cgroup_cpu_us(cgroup)
    result = run_churn(lab, client, cgroup, host, port, seconds)
    cpu = netlab.cgroup_cpu_us(cgroup) - cpu0
    conns = int(result["conns"])
    moved = counters.delta(c0, dp.counters.read())
    per_conn = cpu / conns if conns else 0.0
    return Churn(float(result["per_second"]), conns, per_conn, moved.get("pairs", 0), moved)


SLICES = 3  # per round each kind runs in this many slices, interleaved with the others


def _interleaved(
    one: Callable[[str, float], Churn], kinds: list[str], seconds: float
) -> dict[str, Churn]:
    """`seconds` of churn per kind, cut in SLICES slices taken in turn (a b c a b c ...):
    load from outside the lab that comes and goes hits every kind alike."""
    runs: dict[str, list[Churn]] = {k: [] for k in kinds}
    for _ in range(SLICES):
        for kind in kinds:
            runs[kind].append(one(kind, seconds / SLICES))
    out = {}
    for kind, cs in runs.items():
        conns = sum(c.conns for c in cs)
        elapsed = sum(c.conns / c.per_second for c in cs if c.per_second)
        cpu = sum(c.cpu_us_per_conn * c.conns for c in cs)
        moved: dict[str, int] = {}
        for c in cs:
            for k, v in c.moved.items():
                moved[k] = moved.get(k, 0) + v
        out[kind] = Churn(
            conns / elapsed if elapsed else 0.0,
            conns,
            cpu / conns if conns else 0.0,
            sum(c.pairs for c in cs),
            moved,
        )
    return out


def bench_churn(rounds: int, seconds: int) -> list[Metric]:
    rate = Metric("churn_pod_to_pod", "conn/s", ">= 0.95")
    unenrolled = Metric("churn_pod_to_pod_unenrolled", "conn/s", "")
    cpu = Metric("churn_pod_to_pod_cpu_per_conn", "us", "")
    cpu_un = Metric("churn_pod_to_pod_unenrolled_cpu_per_conn", "us", "")
    bpf = Metric("churn_pod_to_pod_bpf_time_per_conn", "us", "", absolute=True)
    with Lab() as lab:
        a, b = lab.add_pod(), lab.add_pod()
        for pod in (a, b):
            reuse_time_wait(lab, pod.name)
        plain, spliced = lab.child_cgroup("plain"), lab.child_cgroup("spliced")
        with loader.install_or_reuse(lab.bpffs, spliced, skb_verdict=agent_skb_verdict()) as dp:
            for cg, port in ((plain, PLAIN_PORT), (spliced, SPLICED_PORT)):
                argv = traffic.command("conns", "server", "--port", str(port))
                lab.spawn(b, argv, cgroup=cg, stdout=subprocess.DEVNULL)
            netlab.wait_listening(b.name, [PLAIN_PORT, SPLICED_PORT], 10)

            def enroll(on: bool) -> None:
                for pod in (a, b):
                    if on:
                        dp.endpoints.put(pod.ip4, layout.EP_ENROLLED)
                    else:
                        dp.endpoints.delete(pod.ip4)

            def one(kind: str, secs: float) -> Churn:
                cg, port = (plain, PLAIN_PORT) if kind == "baseline" else (spliced, SPLICED_PORT)
                enroll(kind == "plugin")
                c = _measure(lab, dp, a, cg, b.ip4, port, secs)
                # Prove the path: only the enrolled run pairs, and it pairs its connections.
                if (c.pairs > 0) != (kind == "plugin"):
                    raise ChurnError(f"{kind} churn made {c.pairs} pairs for {c.conns} conns")
                return c

            kinds = ["baseline", "plugin", "unenrolled"]
            share: list[float] = []
            for r in range(rounds):
                try:
                    got = _interleaved(one, kinds if r % 2 == 0 else kinds[::-1], seconds)
                except (ChurnError, subprocess.TimeoutExpired) as e:
                    rate.failures.append(f"round {r + 1}: {str(e)[:200]}")
                    continue
                rate.baseline.append(got["baseline"].per_second)
                rate.plugin.append(got["plugin"].per_second)
                unenrolled.baseline.append(got["baseline"].per_second)
                unenrolled.plugin.append(got["unenrolled"].per_second)
                cpu.baseline.append(got["baseline"].cpu_us_per_conn)
                cpu.plugin.append(got["plugin"].cpu_us_per_conn)
                cpu_un.baseline.append(got["baseline"].cpu_us_per_conn)
                cpu_un.plugin.append(got["unenrolled"].cpu_us_per_conn)
                share.append(100.0 * got["plugin"].pairs / max(1, got["plugin"].conns))
                print(
                    f"  round {r + 1}/{rounds}: {got['baseline'].per_second:.0f} -> "
                    f"{got['plugin'].per_second:.0f} conn/s (unenrolled "
                    f"{got['unenrolled'].per_second:.0f}); CPU per connection "
                    f"{got['baseline'].cpu_us_per_conn:.0f} -> "
                    f"{got['plugin'].cpu_us_per_conn:.0f} us",
                    flush=True,
                )
            if share:
                rate.note = f"connections paired: {min(share):.1f}..{max(share):.1f}%"
            costs = []
            for kind in ("plugin", "unenrolled"):
                enroll(kind == "plugin")
                try:
                    with bpf_stats():
                        r0 = prog_runs(lab.bpffs)
                        c = _measure(lab, dp, a, spliced, b.ip4, SPLICED_PORT, seconds)
                        cost = bpf_cost(r0, prog_runs(lab.bpffs), c.conns, c.moved)
                except (ChurnError, OSError, subprocess.TimeoutExpired) as e:
                    bpf.failures.append(f"{kind}: {str(e)[:200]}")
                    continue
                costs.append(f"{kind}: {cost.text()}")
                if kind == "plugin":
                    bpf.plugin.append(cost.us_per_conn)
            enroll(True)
            bpf.note = "; ".join(costs)
            print(f"  {bpf.note}", flush=True)
    return [rate, unenrolled, cpu, cpu_un, bpf]


def section(args: argparse.Namespace) -> list[Metric]:
    return bench_churn(args.rounds, args.seconds)
