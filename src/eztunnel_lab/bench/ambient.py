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

import argparse
import os
from pathlib import Path

from eztunnel_lab.bench.metric import Metric
from eztunnel_lab.counters import HOP_RULES
from eztunnel_lab.measure import (
    FCT_SIZES,
    Side,
    fct,
    iperf3,
    latency,
    paced_cpu,
    proven,
    start_servers,
)
from eztunnel_lab.sim import AmbientNode
from eztunnel_plugin.bpf import layout, syscalls


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
        fd = syscalls.obj_get(node.lab.bpffs / name)
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


def section(args: argparse.Namespace) -> list[Metric]:
    return bench_ambient(args.rounds, args.seconds)
