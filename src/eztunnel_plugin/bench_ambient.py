"""`make bench` ambient section: a simulated ambient node without the plugin vs with it.

Two identical simulated nodes (sim.py) live side by side: the baseline node has no
BPF program of ours anywhere (no agent was ever started there); the plugin node runs
the agent against the fake istiod. Rounds alternate between them (and alternate who
goes first). Every measurement must show new connections on every hop of the ztunnel
stand-in (HAProxy's counters) or the run fails; on the plugin node the splices per hop
(capture, cross-netns mirror, same-netns mirror) and the reasons for any hop left on
TCP are added up and reported with the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from eztunnel_plugin import bpfsys, layout
from eztunnel_plugin.bench import Metric, sockperf
from eztunnel_plugin.sim import PY, AmbientNode, SimError, check_path, set_affinity

SOCKPERF_PORT, IPERF_PORT, FCT_PORT = 11111, 5201, 9100
FCT_SIZES = (1024, 10240, 102400, 1048576)
ALL_CPUS = set(range(os.cpu_count() or 1))
CPU_RATE = "2G"  # paced load for CPU per GB: below what either side can carry
T = TypeVar("T")


@dataclass
class Side:
    name: str  # "baseline" or "plugin"
    node: AmbientNode
    connections: int = 0  # application connections measured (each crossed every hop)
    splices: Counter[str] = field(default_factory=Counter)  # pairs per rule, np_* reasons

    @property
    def client(self) -> str:
        return self.node.pods[0].name

    @property
    def server(self) -> str:
        return self.node.pods[1].name


def start_servers(node: AmbientNode) -> None:
    srv = node.pods[1]
    node.spawn(
        srv,
        ["sockperf", "server", "--tcp", "-i", srv.ip, "-p", str(SOCKPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node.spawn(
        srv,
        ["iperf3", "-s", "-B", srv.ip, "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node.spawn(
        srv,
        [PY, "-m", "eztunnel_plugin.fct", "server", "--port", str(FCT_PORT)],
        stdout=subprocess.DEVNULL,
    )
    ports = (SOCKPERF_PORT, IPERF_PORT, FCT_PORT)
    node.wait_until(
        lambda: all(f":{p} " in node.lab.exec(srv.netns, "ss", "-ltnH").stdout for p in ports),
        15,
        "benchmark servers",
    )


@dataclass
class Bulk:
    gbps: float
    bytes: int
    error: str = ""  # the run failed (e.g. the sender got ENOMEM): recorded as 0 Gbit/s


def iperf3(node: AmbientNode, seconds: int, streams: int, rate: str = "") -> Bulk:
    """Client pod -> server pod; `rate` paces each stream (iperf3 -b), "" for unlimited."""
    cli, srv = node.pods[0], node.pods[1]
    proc = node.spawn(
        cli,
        [
            "iperf3",
            "-c",
            srv.ip,
            "-p",
            str(IPERF_PORT),
            "-t",
            str(seconds),
            "-P",
            str(streams),
            "-J",
            *(["-b", rate] if rate else []),
        ],
        stdout=subprocess.PIPE,
    )
    out, _ = proc.communicate(timeout=seconds + 30)
    try:
        report = json.loads(out)
    except ValueError:
        return Bulk(0.0, 0, f"iperf3 printed no report (exit {proc.returncode})")
    if "error" in report:
        return Bulk(0.0, 0, f"iperf3: {report['error']}")
    rx = report["end"]["sum_received"]
    return Bulk(float(rx["bits_per_second"]) / 1e9, int(rx["bytes"]))


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
    cli, srv = node.pods[0], node.pods[1]
    proc = node.spawn(
        cli,
        [
            PY,
            "-m",
            "eztunnel_plugin.fct",
            "client",
            "--connect",
            srv.ip,
            "--port",
            str(FCT_PORT),
            "--sizes",
            ",".join(map(str, sizes)),
            "--count",
            str(count),
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
    )
    out, _ = proc.communicate(timeout=len(sizes) * (seconds + 30))
    result = json.loads(out.decode().strip().splitlines()[-1])
    if not result["ok"]:
        raise SimError(f"fct client: {result['error']}")
    per_size: dict[str, dict[str, float]] = result["sizes"]
    return per_size


HOP_RULES = ("pairs_capture", "pairs_cross_mirror", "pairs_netns_mirror")


def proven(side: Side, conns: int, run: Callable[[], T]) -> T:
    """Run one measurement and prove its path: every stand-in hop saw >= conns new
    connections; on the plugin node something was spliced (a hop the plugin fails to
    pair stays on TCP: that is its real behaviour, kept in the sample and counted per
    reason in side.splices, never retried away); the baseline node has no programs."""
    node = side.node
    settle()
    before, c0 = node.standin_stats(), node.counters()
    result = run()
    hops = check_path(before, node.standin_stats(), side.client, side.server, conns)
    side.connections += min(hops.values())
    if side.name == "baseline":
        if node.lab.bpffs.exists() or node.counters():
            raise SimError("the baseline node has eztunnel programs attached")
        return result
    c1 = node.counters()
    delta = {k: c1[k] - c0.get(k, 0) for k in c1}
    side.splices.update(
        {k: v for k, v in delta.items() if v and (k in HOP_RULES or k.startswith("np_"))}
    )
    if delta.get("pairs", 0) < 1 or delta.get("bytes_redirected", 0) <= 0:
        raise SimError(f"plugin node: nothing spliced in a measurement; counters moved by {delta}")
    return result


def spliced_percent(side: Side) -> float:
    """Share of measured connections spliced on every hop (the least-spliced hop)."""
    if not side.connections:
        return 0.0
    return 100.0 * min(side.splices[k] for k in HOP_RULES) / side.connections


def agent_rss_mb(node: AmbientNode) -> float:
    assert node.agent_proc is not None
    status = Path(f"/proc/{node.agent_proc.pid}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024


def bpf_map_memory_mb(node: AmbientNode) -> float:
    """memlock of every pinned map of the agent (what the kernel charges for them)."""
    total = 0
    for name in layout.MAPS:
        fd = bpfsys.obj_get(node.lab.bpffs / name)
        try:
            for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("memlock:"):
                    total += int(line.split()[1])
        finally:
            os.close(fd)
    return total / (1 << 20)


def bench_ambient(rounds: int, seconds: int) -> list[Metric]:
    m = {
        "lat_pin": Metric("ambient_latency_p50_pinned", "us", "<= 0.8"),
        "lat_pin99": Metric("ambient_latency_p99_pinned", "us", ""),
        "lat": Metric("ambient_latency_p50_unpinned", "us", ""),
        "lat99": Metric("ambient_latency_p99_unpinned", "us", ""),
        "tput": Metric("ambient_throughput_1_flow", "Gbit/s", ">= 1.6"),
        "tput8": Metric("ambient_throughput_8_flows", "Gbit/s", ""),
        "cpu": Metric("ambient_cpu_per_gb", "CPU s/GB", "<= 1.0"),
    }
    for size in FCT_SIZES:
        m[f"fct{size}"] = Metric(
            f"ambient_fct_{_size_name(size)}_p50", "us", "<= 0.7" if size == 1 << 20 else ""
        )
    rss = Metric("ambient_agent_rss", "MB", "< 60", absolute=True)
    maps = Metric("ambient_bpf_map_memory", "MB", "", absolute=True)
    spliced = Metric("ambient_connections_spliced", "%", "", absolute=True)
    print("  building two simulated ambient nodes (baseline, plugin)", flush=True)
    with AmbientNode(agent=False) as base, AmbientNode(agent=True) as plug:
        sides = [Side("baseline", base), Side("plugin", plug)]
        for side in sides:
            start_servers(side.node)
        for r in range(rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                _round(side, m, seconds)
            print(
                f"  round {r + 1}/{rounds}: pinned p50 {m['lat_pin'].baseline[-1]:.1f} -> "
                f"{m['lat_pin'].plugin[-1]:.1f} us, 1 flow {m['tput'].baseline[-1]:.2f} -> "
                f"{m['tput'].plugin[-1]:.2f} Gbit/s, 1 MB FCT "
                f"{m[f'fct{1 << 20}'].baseline[-1] / 1000:.2f} -> "
                f"{m[f'fct{1 << 20}'].plugin[-1] / 1000:.2f} ms",
                flush=True,
            )
        rss.plugin.append(agent_rss_mb(plug))
        maps.plugin.append(bpf_map_memory_mb(plug))
        spliced.plugin.append(spliced_percent(sides[1]))
        reasons = {
            k: v
            for k, v in sides[1].splices.items()
            if k.startswith("np_") and k != "np_out_of_scope"
        }
        pairs = {k: sides[1].splices[k] for k in HOP_RULES}
        spliced.note = (
            f"{sides[1].connections} connections measured; pairs per hop {pairs}; "
            f"sockets not paired: {reasons or 'none'}"
        )
        print(f"  plugin node: {spliced.note}", flush=True)
    return [*m.values(), rss, maps, spliced]


def _size_name(size: int) -> str:
    return f"{size >> 20}MB" if size >= 1 << 20 else f"{size >> 10}KB"


def latency(node: AmbientNode, pin: bool, seconds: int) -> dict[str, float]:
    """sockperf 64-byte ping-pong client pod -> server pod: p50/p99 one-way, in us.
    Pinned: the client (taskset), the server, the stand-in and the agent all on CPU 0."""
    cli, srv = node.pods[0], node.pods[1]
    set_affinity(node.node_pids(), {0} if pin else ALL_CPUS)
    try:
        return sockperf(node.lab, cli.pod, cli.cgroup, srv.ip, SOCKPERF_PORT, pin, seconds)
    finally:
        set_affinity(node.node_pids(), ALL_CPUS)


def paced_cpu(node: AmbientNode, seconds: int) -> tuple[float, Bulk]:
    """CPU seconds of the whole node while one flow moves data at CPU_RATE."""
    cpu0 = node.cpu_usage_s()
    bulk = iperf3(node, seconds, 1, CPU_RATE)
    return node.cpu_usage_s() - cpu0, bulk


def _round(side: Side, m: dict[str, Metric], seconds: int) -> None:
    node, name = side.node, side.name
    pin = proven(side, 1, lambda: latency(node, True, seconds))
    unpin = proven(side, 1, lambda: latency(node, False, seconds))
    t1 = proven(side, 2, lambda: iperf3(node, seconds, 1))  # control + data connection
    t8 = proven(side, 9, lambda: iperf3(node, seconds, 8))
    cpu, paced = proven(side, 2, lambda: paced_cpu(node, seconds))
    flows = proven(side, 5 * len(FCT_SIZES), lambda: fct(node, 400, seconds / 2))
    values = {
        "lat_pin": pin["p50"],
        "lat_pin99": pin["p99"],
        "lat": unpin["p50"],
        "lat99": unpin["p99"],
        "tput": t1.gbps,
        "tput8": t8.gbps,
        "cpu": cpu / (paced.bytes / 1e9) if paced.bytes else -1.0,
    }
    values |= {f"fct{size}": flows[str(size)]["p50_us"] for size in FCT_SIZES}
    for key, bulk in (("tput", t1), ("tput8", t8), ("cpu", paced)):
        if bulk.error:
            m[key].failures.append(f"{name}: {bulk.error}")
    if values["cpu"] < 0:
        del values["cpu"]  # no bytes moved: no CPU per GB (never a free 0 for the plugin)
    for key, value in values.items():
        getattr(m[key], name).append(value)
