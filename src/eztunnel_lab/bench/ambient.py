"""`make bench` ambient section: a simulated ambient node without the plugin vs with it,
on each ztunnel stand-in (metrics `ambient_hbone_*`, then `ambient_haproxy_*`).

Two identical simulated nodes (sim.py) live side by side: the baseline node has no
BPF program of ours anywhere (no agent was ever started there); the plugin node runs
the agent against the fake istiod. Rounds alternate between them (and alternate who
goes first). Every measurement must show new connections on every hop of the ztunnel
stand-in (its counters; HBONE: streams) or the run fails; on the plugin node the splices
per hop (capture, cross-netns mirror, same-netns mirror) and the reasons for any hop
left on TCP are added up and reported with the results. With HBONE the cross-netns hop
is one pooled tunnel for many connections: its share is counted per tunnel, and the
rows of bench/pooled.py (endurance, churn, many connections) and IPv6 are added. The
churn rows say what a connection costs: the plugin node's churn with nothing enrolled,
the CPU per connection of each part of the node, and the BPF run time (bench/churn.py).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import time
from pathlib import Path

from eztunnel_lab.bench import pooled
from eztunnel_lab.bench.metric import Metric
from eztunnel_lab.counters import HOP_RULES
from eztunnel_lab.measure import (
    FCT_SIZES,
    Busy,
    Side,
    busy,
    fct,
    iperf3,
    latency,
    paced_cpu,
    proven,
    start_servers,
)
from eztunnel_lab.sim import AmbientNode, SimError


def spliced_percent(side: Side) -> float:
    """Share spliced on every hop (the least-spliced hop): the app hops per connection,
    the pod-to-pod hop per TLS connection (one per flow with HAProxy, pooled with HBONE)."""
    if not side.connections:
        return 0.0
    shares = [side.splices[k] / side.connections for k in HOP_RULES if k != "pairs_cross_mirror"]
    if side.tunnels:
        shares.append(side.splices["pairs_cross_mirror"] / side.tunnels)
    return 100.0 * min(shares)


# Targets on plugin / baseline (or on the plugin's own value), per stand-in. HAProxy keeps
# the first version's; HBONE has the pooled-tunnel issue's; the resumable-splice issue adds
# one flow >= 1.8, 8 flows >= 1.7 and every other throughput >= 1.0 on both (never lowered).
TARGETS = {
    "hbone": {
        "lat_pin": "<= 0.6",
        "tput": ">= 1.8",
        "tput8": ">= 1.7",
        "tput6": ">= 1.0",
        "cpu": "<= 0.6",
        "fct1MB": "<= 0.6",
        "rss": "< 50",
        "churn": ">= 0.95",
        "endurance": ">= 95",
    },
    "haproxy": {
        "lat_pin": "<= 0.8",
        "tput": ">= 1.8",
        "tput8": ">= 1.7",
        "cpu": "<= 1.0",
        "fct1MB": "<= 0.7",
        "rss": "< 60",
        "churn": "",
    },
}


def agent_rss_mb(node: AmbientNode) -> float:
    assert node.agent_proc is not None
    status = Path(f"/proc/{node.agent_proc.pid}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024


def bpf_map_memory_mb(node: AmbientNode) -> float:
    """memlock of every pinned map of the agent (what the kernel charges for them)."""
    return pooled.map_memory(node.lab.bpffs) / (1 << 20)


def bench_ambient(rounds: int, seconds: int, standin: str = "hbone") -> list[Metric]:
    t, pre, hb = TARGETS[standin], f"ambient_{standin}_", standin == "hbone"
    m = {
        "lat_pin": Metric(pre + "latency_p50_pinned", "us", t["lat_pin"]),
        "lat_pin99": Metric(pre + "latency_p99_pinned", "us", ""),
        "lat": Metric(pre + "latency_p50_unpinned", "us", ""),
        "lat99": Metric(pre + "latency_p99_unpinned", "us", ""),
        "tput": Metric(pre + "throughput_1_flow", "Gbit/s", t["tput"]),
        "tput8": Metric(pre + "throughput_8_flows", "Gbit/s", t["tput8"]),
        "cpu": Metric(pre + "cpu_per_gb", "CPU s/GB", t["cpu"]),
    }
    for size in FCT_SIZES:
        m[f"fct{size}"] = Metric(
            f"{pre}fct_{_size_name(size)}_p50", "us", t["fct1MB"] if size == 1 << 20 else ""
        )
    if hb:
        m["lat6"] = Metric(pre + "ipv6_latency_p50_pinned", "us", "")
        m["tput6"] = Metric(pre + "ipv6_throughput_1_flow", "Gbit/s", t["tput6"])
        m["churn"] = Metric(pre + "connection_churn", "conn/s", t["churn"])
        # What the churn costs and why (the target is on the row above only).
        m["churn_un"] = Metric(pre + "connection_churn_unenrolled", "conn/s", "")
        m["churn_cpu"] = Metric(pre + "churn_cpu_per_conn", "us", "")
    rss = Metric(pre + "agent_rss", "MB", t["rss"], absolute=True)
    maps = Metric(pre + "bpf_map_memory", "MB", "", absolute=True)
    spliced = Metric(pre + "connections_spliced", "%", "", absolute=True)
    churn_bpf = Metric(pre + "churn_bpf_time_per_conn", "us", "", absolute=True)
    parts: dict[str, list[dict[str, float]]] = {"baseline": [], "plugin": [], "unenrolled": []}
    print(
        f"  building two simulated ambient nodes (baseline, plugin), {standin} stand-in", flush=True
    )
    with (
        AmbientNode(agent=False, standin=standin, ipv6_workloads=hb) as base,
        AmbientNode(agent=True, standin=standin, ipv6_workloads=hb) as plug,
    ):
        sides = [Side("baseline", base), Side("plugin", plug)]
        for side in sides:
            start_servers(side.node, ipv6=hb)
        for r in range(rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                _round(side, m, seconds, parts if hb else None)
            mb = m[f"fct{1 << 20}"]
            print(
                f"  round {r + 1}/{rounds}: pinned p50 {_last(m['lat_pin'])} us, 1 flow "
                f"{_last(m['tput'])} Gbit/s, 1 MB FCT {_last(mb)} us",
                flush=True,
            )
        for key, row, what in (
            ("tput", "tput", "one flow"),
            ("fct", f"fct{1 << 20}", "short flows"),
        ):
            split = (
                f"{s.name}: {Busy.median(s.busy[key]).text()}" for s in sides if s.busy.get(key)
            )
            m[row].note = f"CPU during the {what}: " + "; ".join(split)
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
        if hb:
            spliced.note += (
                f"; {sides[1].tunnels} HBONE tunnels for {sides[1].connections} connections"
            )
        print(f"  plugin node: {spliced.note}", flush=True)
        extra = _pooled_rows(sides, pre, t, seconds) if hb else []
        if hb:
            _churn_cost(sides[1], seconds, churn_bpf)
            m["churn_cpu"].note = _churn_parts_note(parts)
            m["churn_un"].note = (
                "plugin node with every endpoint out of the map (sock_ops runs, pairs "
                "nothing) vs the baseline node"
            )
            extra.append(churn_bpf)
    return _filled([*m.values(), rss, maps, spliced, *extra])


def _churn_cost(side: Side, seconds: int, metric: Metric) -> None:
    """Two more churn runs on the plugin node with BPF_ENABLE_STATS: BPF run time per
    connection, endpoints enrolled and not (stats on cost a clock read per run: never
    during the rate rows)."""
    notes = []
    for kind in ("enrolled", "unenrolled"):
        try:
            with pooled.unenrolled(side.node) if kind == "unenrolled" else contextlib.nullcontext():
                c = pooled.churn(side, seconds, bpf_stats=True)
        except (SimError, OSError, subprocess.TimeoutExpired) as err:
            metric.failures.append(f"{kind}: {str(err)[:200]}")
            _recover(side.node)
            continue
        assert c.bpf is not None
        if kind == "enrolled":
            metric.plugin.append(c.bpf.us_per_conn)
        notes.append(f"{kind}: {c.bpf.text()}")
    metric.note = "; ".join(notes)
    print(f"  churn BPF cost: {metric.note}", flush=True)


def _churn_parts_note(parts: dict[str, list[dict[str, float]]]) -> str:
    """Median CPU per connection of each part of the node, per run kind."""
    out = []
    for kind, runs in parts.items():
        if runs:
            split = ", ".join(f"{k} {statistics.median(r[k] for r in runs):.0f}" for k in runs[0])
            out.append(f"{kind}: {split}")
    return "CPU us per connection by cgroup (median of rounds): " + "; ".join(out)


def _last(m: Metric) -> str:
    """'baseline -> plugin' of the latest round ('-' for a failed run)."""
    b = f"{m.baseline[-1]:.3g}" if m.baseline else "-"
    p = f"{m.plugin[-1]:.3g}" if m.plugin else "-"
    return f"{b} -> {p}"


def _filled(metrics: list[Metric]) -> list[Metric]:
    """A metric whose every plugin run failed is recorded as 0 with its failures."""
    for metric in metrics:
        if not metric.plugin:
            metric.plugin.append(0.0)
            if not metric.failures:
                metric.failures.append("plugin: no sample")
    return metrics


def _pooled_rows(sides: list[Side], pre: str, t: dict[str, str], seconds: int) -> list[Metric]:
    """Endurance on one pooled tunnel, then 2,000 held connections, on both nodes."""
    share = Metric(pre + "endurance_tunnel_bytes_spliced", "%", t["endurance"], absolute=True)
    before = Metric(pre + "endurance_fct_10KB_p50_before_bursts", "us", "")
    after = Metric(pre + "endurance_fct_10KB_p50_after_bursts", "us", "")
    held_rss = Metric(pre + "many_conns_agent_rss", "MB", "", absolute=True)
    kmem = Metric(pre + "many_conns_kernel_memory", "MB", "")
    kmaps = Metric(pre + "many_conns_bpf_map_memory", "MB", "", absolute=True)
    held_spliced = Metric(pre + "many_conns_spliced", "%", "", absolute=True)
    for side in sides:
        try:
            e = pooled.endurance(side, max(32.0, 8.0 * seconds))
        except SimError as err:
            share.failures.append(f"{side.name}: {str(err)[:200]}")
            _recover(side.node)
            continue
        getattr(before, side.name).append(e.fct_before_us)
        getattr(after, side.name).append(e.fct_after_us)
        share.failures += [f"{side.name}: {x}" for x in e.errors]
        if side.name == "plugin":
            share.plugin.append(e.share)
            share.note = (
                f"{e.bursts} bursts, {e.tunnels_opened} tunnel(s) opened during the run; "
                f"spliced % per second: {e.series}"
            )
        print(
            f"  endurance {side.name}: 10 KB FCT {e.fct_before_us:.0f} -> "
            f"{e.fct_after_us:.0f} us across {e.bursts} bursts; tunnel bytes spliced "
            f"{e.share:.1f}%",
            flush=True,
        )
    for side in sides:
        try:
            many = pooled.many_connections(side)
        except (SimError, subprocess.TimeoutExpired) as err:
            kmem.failures.append(f"{side.name}: {str(err)[:200]}")
            _recover(side.node)
            continue
        getattr(kmem, side.name).append(many.kernel.total_mb)
        kmem.note += f"{'; ' if kmem.note else ''}{side.name}: {many.kernel.text()}"
        if many.error:
            kmem.failures.append(f"{side.name}: {many.error}")
        if side.name == "plugin":
            held_rss.plugin.append(many.agent_rss_mb)
            kmaps.plugin.append(many.kernel.maps / (1 << 20))
            kmaps.note = f"{many.kernel.maps / max(1, many.held):.0f} bytes per held connection"
            pairs = many.spliced
            shares = [pairs["pairs_capture"], pairs["pairs_netns_mirror"]]
            app = min(shares) / many.held if many.held else 0.0
            tun = pairs["pairs_cross_mirror"] / many.tunnels if many.tunnels else 1.0
            held_spliced.plugin.append(100.0 * min(app, tun))
            held_spliced.note = f"{many.held} held, {many.tunnels} tunnels, pairs {pairs}"
        print(
            f"  many connections {side.name}: {many.intact}/{many.held} intact, "
            f"kernel memory {many.kernel.total_mb:.1f} MB ({many.kernel.text()}), agent RSS "
            f"{many.agent_rss_mb:.1f} MB, {many.tunnels} tunnels",
            flush=True,
        )
    return [share, before, after, held_rss, kmem, kmaps, held_spliced]


def _size_name(size: int) -> str:
    return f"{size >> 20}MB" if size >= 1 << 20 else f"{size >> 10}KB"


def _round(
    side: Side,
    m: dict[str, Metric],
    seconds: int,
    churn_parts: dict[str, list[dict[str, float]]] | None = None,
) -> None:
    """One round of every row on one node; `churn_parts` (HBONE only) collects the churn
    rows' CPU per connection by part of the node."""
    node, name, hb = side.node, side.name, churn_parts is not None
    pin = proven(side, 1, lambda: latency(node, True, seconds))
    unpin = proven(side, 1, lambda: latency(node, False, seconds))
    # control + data connection; where the CPU went says what bounds one flow
    t1, cpu1 = proven(side, 2, lambda: busy(node, lambda: iperf3(node, seconds, 1)))
    side.busy.setdefault("tput", []).append(cpu1)
    t8 = proven(side, 9, lambda: iperf3(node, seconds, 8))
    cpu, paced = proven(side, 2, lambda: paced_cpu(node, seconds))
    try:
        flows, cpu_fct = proven(
            side, 5 * len(FCT_SIZES), lambda: busy(node, lambda: fct(node, 400, seconds / 2))
        )
        side.busy.setdefault("fct", []).append(cpu_fct)
    except SimError as e:
        flows = {}
        for size in FCT_SIZES:
            m[f"fct{size}"].failures.append(f"{name}: {str(e)[:200]}")
        _recover(node)
    values = {
        "lat_pin": pin["p50"],
        "lat_pin99": pin["p99"],
        "lat": unpin["p50"],
        "lat99": unpin["p99"],
        "tput": t1.gbps,
        "tput8": t8.gbps,
        "cpu": cpu / (paced.bytes / 1e9) if paced.bytes else -1.0,
    }
    values |= {f"fct{size}": flows[str(size)]["p50_us"] for size in FCT_SIZES if flows}
    if hb:
        values["lat6"] = proven(side, 1, lambda: latency(node, True, seconds, ipv6=True))["p50"]
        t6 = proven(side, 2, lambda: iperf3(node, seconds, 1, ipv6=True))
        values["tput6"] = t6.gbps
        if t6.error:
            m["tput6"].failures.append(f"{name}: {t6.error}")
        _churn_round(side, m, values, churn_parts or {}, seconds)
    for key, bulk in (("tput", t1), ("tput8", t8), ("cpu", paced)):
        if bulk.error:
            m[key].failures.append(f"{name}: {bulk.error}")
    if values["cpu"] < 0:
        del values["cpu"]  # no bytes moved: no CPU per GB (never a free 0 for the plugin)
    for key, value in values.items():
        getattr(m[key], name).append(value)


def _churn_round(
    side: Side,
    m: dict[str, Metric],
    values: dict[str, float],
    parts: dict[str, list[dict[str, float]]],
    seconds: int,
) -> None:
    """Churn on this node; on the plugin node also with every endpoint unenrolled. The
    unenrolled row's baseline is the baseline node's churn."""
    runs = ["plugin", "unenrolled"] if side.name == "plugin" else ["baseline"]
    for kind in runs:
        key = "churn_un" if kind == "unenrolled" else "churn"
        try:
            with pooled.unenrolled(side.node) if kind == "unenrolled" else contextlib.nullcontext():
                c = pooled.churn(side, seconds)
            # Prove what ran: only the enrolled plugin run pairs (the app hops of its
            # connections); with nothing enrolled, sock_ops must pair nothing.
            if (c.pairs > 0) != (kind == "plugin"):
                raise SimError(f"{kind} churn made {c.pairs} pairs for {c.conns} connections")
        except SimError as e:
            m[key].failures.append(f"{kind}: {str(e)[:200]}")
            _recover(side.node)
            continue
        parts[kind].append(c.cpu_us)
        if kind == "unenrolled":
            m["churn_un"].plugin.append(c.per_second)
            continue
        values["churn"] = c.per_second
        values["churn_cpu"] = sum(c.cpu_us.values())
        if kind == "baseline":
            m["churn_un"].baseline.append(c.per_second)


def _recover(node: AmbientNode) -> None:
    """After a failed measurement: a pooled tunnel that stalled stays in the pool (its
    streams ended with their clients): close the idle ones so the next one starts fresh."""
    time.sleep(1.0)
    released = node.release_idle_tunnels()
    print(f"  measurement failed; released {released} pooled tunnel(s)", flush=True)


def section(args: argparse.Namespace) -> list[Metric]:
    """Both stand-ins: HBONE (the default, closer to ztunnel), then HAProxy."""
    return bench_ambient(args.rounds, args.seconds, "hbone") + bench_ambient(
        args.rounds, args.seconds, "haproxy"
    )
