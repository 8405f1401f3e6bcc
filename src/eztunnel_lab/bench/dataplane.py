"""Benchmark section `dataplane`: pod -> pod over a bridge, no mesh, plain vs spliced.

eztunnel-lab bench dataplane    # make bench-dataplane
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eztunnel_lab import counters, netlab
from eztunnel_lab.bench.metric import Metric
from eztunnel_lab.measure import agent_skb_verdict, iperf3_client, sockperf, spawn_servers
from eztunnel_lab.netlab import Lab, Pod
from eztunnel_plugin.bpf import layout, loader


def iperf3(lab: Lab, pod: Pod, cgroup: Path, host: str, port: int, seconds: int) -> float:
    """Throughput in Gbit/s (receiver side)."""
    bulk = iperf3_client(lab, pod, cgroup, host, port, seconds)
    if bulk.error:
        raise RuntimeError(bulk.error)
    return bulk.gbps


def start_servers(lab: Lab, pod: Pod, cgroup: Path, host: str, base: int) -> None:
    """sockperf pinned (base), sockperf unpinned (base+1), iperf3 (base+2)."""
    ports = spawn_servers(
        lab, pod, cgroup, host, pinned=[base], sockperf=[base + 1], iperf3=[base + 2]
    )
    netlab.wait_listening(pod.name, ports, 10)


def bench_dataplane(rounds: int, seconds: int) -> list[Metric]:
    """Pod -> pod over a bridge: plain kernel path vs the spliced one."""
    lat_pin = Metric("dataplane_latency_p50_pinned", "us", "<= 0.55")
    lat_pin99 = Metric("dataplane_latency_p99_pinned", "us", "<= 1.0")
    lat = Metric("dataplane_latency_p50_unpinned", "us", "<= 1.0")
    lat99 = Metric("dataplane_latency_p99_unpinned", "us", "<= 1.0")
    tput = Metric("dataplane_throughput", "Gbit/s", ">= 1.8")
    with Lab() as lab:
        a, b = lab.add_pod(), lab.add_pod()
        plain, spliced = lab.child_cgroup("plain"), lab.child_cgroup("spliced")
        with loader.install_or_reuse(lab.bpffs, spliced, skb_verdict=agent_skb_verdict()) as dp:
            for pod in (a, b):
                dp.endpoints.put(pod.ip4, layout.EP_ENROLLED)
            start_servers(lab, b, plain, b.ip4, 12000)
            start_servers(lab, b, spliced, b.ip4, 13000)
            for r in range(rounds):
                for cg, base, side in ((plain, 12000, "baseline"), (spliced, 13000, "plugin")):
                    c0 = dp.counters.read()
                    pin = sockperf(lab, a, cg, b.ip4, base, True, seconds)
                    unpin = sockperf(lab, a, cg, b.ip4, base + 1, False, seconds)
                    gbps = iperf3(lab, a, cg, b.ip4, base + 2, seconds)
                    pairs = counters.delta(c0, dp.counters.read())["pairs"]
                    # Prove the path: the plugin side spliced, the baseline did not.
                    if (pairs > 0) != (side == "plugin"):
                        raise RuntimeError(f"round {r}: {side} made {pairs} pairs")
                    for metric, value in (
                        (lat_pin, pin["p50"]),
                        (lat_pin99, pin["p99"]),
                        (lat, unpin["p50"]),
                        (lat99, unpin["p99"]),
                        (tput, gbps),
                    ):
                        getattr(metric, side).append(value)
                print(
                    f"  round {r + 1}/{rounds}: pinned p50 {lat_pin.baseline[-1]:.2f} -> "
                    f"{lat_pin.plugin[-1]:.2f} us, throughput {tput.baseline[-1]:.1f} -> "
                    f"{tput.plugin[-1]:.1f} Gbit/s",
                    flush=True,
                )
    return [lat_pin, lat_pin99, lat, lat99, tput]


def section(args: argparse.Namespace) -> list[Metric]:
    return bench_dataplane(args.rounds, args.seconds)
