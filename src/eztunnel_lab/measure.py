"""Measurements on lab nodes, shared by the demo and the benchmarks.

sockperf (latency), iperf3 (throughput), flow completion times (traffic/fct.py) and
node CPU, each proven to have crossed every hop of the ztunnel stand-in (`proven`).
Nothing here records results: the benchmarks (bench/) and the demo do.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from eztunnel_lab import counters, netlab, traffic
from eztunnel_lab.netlab import Lab, Pod
from eztunnel_lab.sim import AmbientNode, SimError, check_path, set_affinity
from eztunnel_plugin import selftest

SOCKPERF_PORT, IPERF_PORT, FCT_PORT = 11111, 5201, 9100
PINGPONG6_PORT, IPERF6_PORT, CONNS_PORT = 11112, 5202, 9200  # IPv6 servers, conns (dual stack)
FCT_SIZES = (1024, 10240, 102400, 1048576)
ALL_CPUS = set(range(os.cpu_count() or 1))
CPU_RATE = "2G"  # paced load for CPU per GB: below what either side can carry
T = TypeVar("T")
_PCT = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")


def _cpu0(pin: bool) -> list[str]:
    return ["taskset", "-c", "0"] if pin else []


def spawn_servers(
    lab: Lab,
    pod: Pod,
    cgroup: Path | None,
    host: str,
    sockperf: Sequence[int] = (),
    pinned: Sequence[int] = (),
    iperf3: Sequence[int] = (),
) -> list[int]:
    """Start sockperf servers (`pinned` ones on CPU 0) and iperf3 servers on host, in the
    pod and `cgroup` (None: the pod's), output discarded. Their ports, to wait for."""

    def sockperf_server(port: int, pin: bool) -> list[str]:
        return [*_cpu0(pin), "sockperf", "server", "--tcp", "-i", host, "-p", str(port)]

    argvs = [sockperf_server(p, True) for p in pinned]
    argvs += [sockperf_server(p, False) for p in sockperf]
    argvs += [["iperf3", "-s", "-B", host, "-p", str(p)] for p in iperf3]
    for argv in argvs:
        lab.spawn(pod, argv, cgroup=cgroup, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [*pinned, *sockperf, *iperf3]


def sockperf(
    lab: Lab, pod: Pod, cgroup: Path | None, host: str, port: int, pin: bool, seconds: int
) -> dict[str, float]:
    """64-byte TCP ping-pong: p50 and p99 one-way latency in microseconds."""
    argv = [
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        host,
        "-p",
        str(port),
        "-t",
        str(seconds),
        "-m",
        "64",
    ]
    proc = lab.spawn(
        pod,
        _cpu0(pin) + argv,
        cgroup=cgroup,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = proc.communicate(timeout=seconds + 30)
    pcts = {float(p): float(v) for p, v in _PCT.findall(out.decode())}
    if 50.0 not in pcts:
        raise RuntimeError(f"sockperf printed no percentiles:\n{out.decode()[-1500:]}")
    return {"p50": pcts[50.0], "p99": pcts[99.0]}


@dataclass(frozen=True)
class Busy:
    """Where the CPU went during one run, in % of one CPU: per part of the node, and the
    busiest thread (a thread near 100% bounds a flow, however idle the other CPU is)."""

    parts: dict[str, float]
    busiest: tuple[str, float]  # (part/thread name, %)

    def text(self) -> str:
        parts = ", ".join(f"{k} {v:.0f}%" for k, v in self.parts.items())
        return f"{parts}; busiest thread {self.busiest[0]} {self.busiest[1]:.0f}%"

    @staticmethod
    def median(runs: Sequence[Busy]) -> Busy:
        """Per part and for the busiest thread, the median over runs."""
        parts = {k: statistics.median(r.parts[k] for r in runs) for k in runs[0].parts}
        name = Counter(r.busiest[0] for r in runs).most_common(1)[0][0]
        return Busy(parts, (name, statistics.median(r.busiest[1] for r in runs)))


@dataclass
class Side:
    name: str  # "baseline" or "plugin"
    node: AmbientNode
    connections: int = 0  # application connections measured (each crossed every hop)
    tunnels: int = 0  # pod-to-pod TLS connections they opened (HBONE pools: far fewer)
    splices: Counter[str] = field(default_factory=Counter)  # pairs per rule, np_* reasons
    busy: dict[str, list[Busy]] = field(default_factory=dict)  # per row, one per round

    @property
    def client(self) -> str:
        return self.node.pods[0].name

    @property
    def server(self) -> str:
        return self.node.pods[1].name


def start_servers(node: AmbientNode, ipv6: bool = False) -> None:
    """sockperf, iperf3, fct and conns servers in the server pod (with `ipv6`, also
    sockperf and iperf3 on its IPv6 address); returns once they listen."""
    srv = node.pods[1]
    ports = spawn_servers(
        node.lab, srv.pod, None, srv.ip, sockperf=[SOCKPERF_PORT], iperf3=[IPERF_PORT]
    )
    if ipv6:
        ports += spawn_servers(node.lab, srv.pod, None, srv.pod.ip6, iperf3=[IPERF6_PORT])
        # sockperf 3.7 has no IPv6: a Python ping-pong (pinned to CPU 0 like sockperf's)
        echo = traffic.command("conns", "echo", "--port", str(PINGPONG6_PORT))
        node.spawn(srv, [*_cpu0(True), *echo], stdout=subprocess.DEVNULL)
        ports.append(PINGPONG6_PORT)
    for tool, port in (("fct", FCT_PORT), ("conns", CONNS_PORT)):
        node.spawn(
            srv, traffic.command(tool, "server", "--port", str(port)), stdout=subprocess.DEVNULL
        )
    node.wait_listening(srv.netns, [*ports, FCT_PORT, CONNS_PORT], "benchmark servers")


@dataclass
class Bulk:
    gbps: float
    bytes: int
    error: str = ""  # the run failed (e.g. the sender got ENOMEM): recorded as 0 Gbit/s


def iperf3_argv(host: str, port: int, seconds: int, streams: int = 1, rate: str = "") -> list[str]:
    """An iperf3 client with a JSON report; `rate` paces each stream (-b), "" for unlimited."""
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"]
    return argv + (["-b", rate] if rate else [])


def iperf3_client(
    lab: Lab,
    pod: Pod,
    cgroup: Path | None,
    host: str,
    port: int,
    seconds: int,
    streams: int = 1,
    rate: str = "",
) -> Bulk:
    """iperf3 from the pod (in `cgroup`, None: the pod's) to host:port, received bytes."""
    argv = iperf3_argv(host, port, seconds, streams, rate)
    proc = lab.spawn(pod, argv, cgroup=cgroup, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=seconds + 30)
    try:
        report = json.loads(out)
    except ValueError:
        return Bulk(0.0, 0, f"iperf3 printed no report (exit {proc.returncode})")
    if "error" in report:
        return Bulk(0.0, 0, f"iperf3: {report['error']}")
    rx = report["end"]["sum_received"]
    return Bulk(float(rx["bits_per_second"]) / 1e9, int(rx["bytes"]))


def iperf3(
    node: AmbientNode, seconds: int, streams: int, rate: str = "", ipv6: bool = False
) -> Bulk:
    """Client pod -> server pod; `rate` paces each stream (iperf3 -b), "" for unlimited."""
    cli, srv = node.pods[0], node.pods[1]
    host, port = (srv.pod.ip6, IPERF6_PORT) if ipv6 else (srv.ip, IPERF_PORT)
    return iperf3_client(node.lab, cli.pod, None, host, port, seconds, streams, rate)


def tcp_memory_pages() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    return 0


def settle(timeout: float = 20.0) -> None:
    """Wait until the kernel's TCP memory is back near idle, so that a run that left
    queues behind (a failed plugin run) cannot put the next one under memory pressure."""
    limit = int(Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[0]) // 20
    deadline = time.monotonic() + timeout
    while tcp_memory_pages() > limit and time.monotonic() < deadline:
        time.sleep(0.1)


def fct(
    node: AmbientNode, count: int, seconds: float, sizes: tuple[int, ...] = FCT_SIZES
) -> dict[str, dict[str, float]]:
    """Short flows, one after another, per size: {size: {n, p50_us, p90_us, bytes}}."""
    result = node.run_client(
        "fct",
        node.pods[0],
        node.pods[1],
        FCT_PORT,
        *("--sizes", ",".join(map(str, sizes)), "--count", str(count), "--seconds", str(seconds)),
        timeout=len(sizes) * (seconds + 30),
    )
    if not result["ok"]:
        raise SimError(f"fct client: {result['error']}")
    per_size: dict[str, dict[str, float]] = result["sizes"]
    return per_size


def proven(side: Side, conns: int, run: Callable[[], T]) -> T:
    """Run one measurement and prove its path: every stand-in hop saw >= conns new
    connections; on the plugin node something was spliced (a hop the plugin fails to
    pair stays on TCP: that is its real behaviour, kept in the sample and counted per
    reason in side.splices, never retried away); the baseline node has no programs."""
    node = side.node
    settle()
    before, c0 = node.standin_stats(), node.counters()
    t0 = node.tunnels(side.client, side.server)
    result = run()
    hops = check_path(before, node.standin_stats(), side.client, side.server, conns)
    side.connections += min(hops.values())
    t1 = node.tunnels(side.client, side.server)
    side.tunnels += t1.opened - t0.opened if t0 and t1 else min(hops.values())
    if side.name == "baseline":
        if node.lab.bpffs.exists() or node.counters():
            raise SimError("the baseline node has eztunnel programs attached")
        return result
    delta = counters.delta(c0, node.counters())
    side.splices.update(
        {k: v for k, v in delta.items() if v and (k in counters.HOP_RULES or k.startswith("np_"))}
    )
    if delta.get("pairs", 0) < 1 or delta.get("bytes_redirected", 0) <= 0:
        raise SimError(f"plugin node: nothing spliced in a measurement; counters moved by {delta}")
    return result


def latency(node: AmbientNode, pin: bool, seconds: int, ipv6: bool = False) -> dict[str, float]:
    """sockperf 64-byte ping-pong client pod -> server pod: p50/p99 one-way, in us.
    Pinned: the client (taskset), the server, the stand-in and the agent all on CPU 0."""
    cli, srv = node.pods[0], node.pods[1]
    set_affinity(node.node_pids(), {0} if pin else ALL_CPUS)
    try:
        if ipv6:
            return _pingpong(node, pin, seconds)
        return sockperf(node.lab, cli.pod, cli.cgroup, srv.ip, SOCKPERF_PORT, pin, seconds)
    finally:
        set_affinity(node.node_pids(), ALL_CPUS)


def _pingpong(node: AmbientNode, pin: bool, seconds: int) -> dict[str, float]:
    """The IPv6 ping-pong (traffic/conns.py), to the server pod's IPv6 address."""
    cli, srv = node.pods[0], node.pods[1]
    argv = traffic.command(
        "conns",
        "pingpong",
        "--connect",
        srv.pod.ip6,
        "--port",
        str(PINGPONG6_PORT),
        "--seconds",
        str(seconds),
    )
    proc = node.spawn(cli, [*_cpu0(pin), *argv], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=seconds + 30)
    result = traffic.report(out)
    if not result.get("ok"):
        raise SimError(f"IPv6 ping-pong: {result}")
    return {"p50": float(result["p50"]), "p99": float(result["p99"])}


def paced_cpu(node: AmbientNode, seconds: int) -> tuple[float, Bulk]:
    """CPU seconds of the whole node while one flow moves data at CPU_RATE."""
    cpu0 = node.cpu_usage_s()
    bulk = iperf3(node, seconds, 1, CPU_RATE)
    return node.cpu_usage_s() - cpu0, bulk


def _threads_ns(groups: dict[str, Path]) -> dict[tuple[str, int], tuple[str, int]]:
    """(part, tid) -> (thread name, ns on CPU so far) for every live thread of every part."""
    out: dict[tuple[str, int], tuple[str, int]] = {}
    for part, cg in groups.items():
        for pid in netlab.cgroup_pids(cg):
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    ns = int((task / "schedstat").read_text().split()[0])
                    comm = (task / "comm").read_text().strip()
                except (OSError, ValueError, IndexError):
                    continue  # the thread ended meanwhile
                out[(part, int(task.name))] = (comm, ns)
    return out


def busy(node: AmbientNode, run: Callable[[], T]) -> tuple[T, Busy]:
    """Run `run` and measure the node's CPU meanwhile: per part from its cgroup (processes
    that ended count), the busiest thread among those alive at the end (schedstat).
    Softirq work counts for the task it interrupted; ksoftirqd is outside the node."""
    groups = node.parts()
    t0, c0, start = _threads_ns(groups), netlab.cgroups_cpu_us(groups), time.monotonic()
    result = run()
    t1, c1, wall = _threads_ns(groups), netlab.cgroups_cpu_us(groups), time.monotonic() - start
    parts = {part: 100 * (c1[part] - c0[part]) / 1e6 / wall for part in groups}
    used = {key: ns - t0.get(key, (name, 0))[1] for key, (name, ns) in t1.items()}
    top = max(used, key=lambda k: used[k], default=None)
    busiest = (f"{top[0]}/{t1[top][0]}", 100 * used[top] / 1e9 / wall) if top else ("-", 0.0)
    return result, Busy(parts, busiest)


def agent_skb_verdict() -> bool:
    """Whether the agent would attach the SK_SKB workaround on this kernel (its self-test
    table): benchmarks that load the programs themselves measure what production runs."""
    return selftest.lost_wakeup_listed(platform.release()) is not False
