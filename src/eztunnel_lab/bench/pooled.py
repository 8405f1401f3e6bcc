"""The ambient rows that only the HBONE stand-in can show (pooled tunnels), plus churn.

- endurance: short flows and periodic bulk bursts share one pooled tunnel for >= 30 s;
  the share of the tunnel's bytes that the splice moved, per second and overall, and the
  short-flow FCT before and after the bursts;
- churn: new connections per second through the ambient path;
- many connections: 2,000 concurrent long-lived connections with light traffic: the
  agent's RSS, the kernel's TCP memory, the share spliced.

Each function measures one node (a Side) and returns plain numbers; bench/ambient.py
turns them into metrics for both nodes.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from eztunnel_lab import counters, traffic
from eztunnel_lab.measure import CONNS_PORT, Side, fct, iperf3, settle, tcp_memory_pages
from eztunnel_lab.sim import AmbientNode, SimError, check_path
from eztunnel_lab.traffic import report

SHORT = 10240  # the short flows' size


def tunnel_spliced_bytes(node: AmbientNode) -> int:
    """Bytes the agent moved on the client pod's tunnels to the server pod's 15008 (both
    directions of every cross_mirror pair; 0 without the agent)."""
    if node.agent_proc is None or not (node.lab.bpffs / "ez_sockinfo").exists():
        return 0
    dst = f"{node.pods[1].ip}:15008"
    with node.dataplane() as dp:
        flows = dp.sockinfo.flows()
    return sum(
        f.bytes_active_to_passive + f.bytes_passive_to_active
        for f in flows
        if f.remote == dst and str(f.rule.name).lower() == "cross_mirror"
    )


def tunnel_wire_bytes(node: AmbientNode) -> int:
    t = node.tunnels(node.pods[0].name, node.pods[1].name)
    if t is None:
        raise SimError("endurance needs the hbone stand-in")
    return t.wire_bytes


@dataclass
class Endurance:
    share: float  # % of the tunnel's bytes spliced over the whole run
    series: list[float] = field(default_factory=list)  # % per second
    fct_before_us: float = 0.0
    fct_after_us: float = 0.0
    tunnels_opened: int = 0
    bursts: int = 0
    errors: list[str] = field(default_factory=list)


def endurance(side: Side, seconds: float = 32.0) -> Endurance:
    """Quarter 1: short flows; quarters 2-3: short flows + a 2 s bulk burst every 4 s;
    quarter 4: short flows again. All on the same pooled tunnel (one key: client pod,
    its IP, the server's identity and address)."""
    node = side.node
    a, b = node.pods[0].name, node.pods[1].name
    quarter = seconds / 4
    settle()
    t0 = node.tunnels(a, b)
    wire0, spliced0 = tunnel_wire_bytes(node), tunnel_spliced_bytes(node)
    series: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        last = (tunnel_wire_bytes(node), tunnel_spliced_bytes(node))
        while not stop.wait(1.0):
            now = (tunnel_wire_bytes(node), tunnel_spliced_bytes(node))
            wire = now[0] - last[0]
            if wire > 0:
                series.append(round(100.0 * min(now[1] - last[1], wire) / wire, 1))
            last = now

    result = Endurance(0.0)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result.fct_before_us = fct(node, 100_000, quarter, (SHORT,))[str(SHORT)]["p50_us"]

        def bursts() -> None:
            end = time.monotonic() + 2 * quarter - 2
            while time.monotonic() < end:
                bulk = iperf3(node, 2, 1)
                result.bursts += 1
                if bulk.error:
                    result.errors.append(bulk.error)
                stop.wait(2.0)

        burster = threading.Thread(target=bursts, daemon=True)
        burster.start()
        fct(node, 100_000, 2 * quarter, (SHORT,))
        burster.join(timeout=4 * quarter + 30)
        result.fct_after_us = fct(node, 100_000, quarter, (SHORT,))[str(SHORT)]["p50_us"]
    finally:
        stop.set()
        sampler.join(timeout=10)
    wire = tunnel_wire_bytes(node) - wire0
    spliced = tunnel_spliced_bytes(node) - spliced0
    t1 = node.tunnels(a, b)
    result.tunnels_opened = t1.opened - t0.opened if t0 and t1 else 0
    result.share = 100.0 * min(spliced, wire) / wire if wire else 0.0
    result.series = series
    return result


def _conns_client(node: AmbientNode, mode: str, *args: str, timeout: float) -> dict[str, object]:
    cli, srv = node.pods[0], node.pods[1]
    argv = traffic.command("conns", mode, "--connect", srv.ip, "--port", str(CONNS_PORT), *args)
    proc = node.spawn(cli, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    try:
        return report(out)
    except ValueError:
        tail = err.decode(errors="replace").strip()[-300:]
        return {"ok": False, "error": f"conns {mode} printed no report: {tail}"}


def churn(side: Side, seconds: float, concurrency: int = 16) -> float:
    """New connections per second (connect, 1 byte each way, close), proven on every hop."""
    node = side.node
    settle()
    before = node.standin_stats()
    result = _conns_client(
        node,
        "churn",
        *("--seconds", str(seconds), "--concurrency", str(concurrency)),
        timeout=seconds + 60,
    )
    if not result.get("ok"):
        raise SimError(f"churn client: {result}")
    conns = int(result["conns"])  # type: ignore[call-overload]
    # Proven on every hop; not added to side.connections (no splice counts are taken here).
    check_path(before, node.standin_stats(), side.client, side.server, conns)
    return float(result["per_second"])  # type: ignore[arg-type]


@dataclass
class Many:
    held: int
    intact: int
    agent_rss_mb: float
    tcp_memory_mb: float  # the kernel's TCP buffers while they are held (sockstat)
    tunnels: int
    spliced: dict[str, int]  # pairs per hop rule made for them
    error: str = ""


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024


def many_connections(side: Side, conns: int = 2000, seconds: float = 10.0) -> Many:
    node = side.node
    settle()
    page_mb = 4096 / (1 << 20)
    mem0, c0 = tcp_memory_pages(), node.counters()
    t0 = node.tunnels(side.client, side.server)
    cli, srv = node.pods[0], node.pods[1]
    argv = traffic.command(
        "conns",
        "hold",
        "--connect",
        srv.ip,
        "--port",
        str(CONNS_PORT),
        "--conns",
        str(conns),
        "--seconds",
        str(seconds),
    )
    proc = node.spawn(cli, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # {"held": N} once every connection is open
    time.sleep(min(3.0, seconds / 2))
    rss = _rss_mb(node.agent_proc.pid) if node.agent_proc is not None else 0.0
    mem = (tcp_memory_pages() - mem0) * page_mb
    t1 = node.tunnels(side.client, side.server)
    out, err = proc.communicate(timeout=seconds + 120)
    try:
        result = report(first + out)
    except ValueError:
        result = {"ok": False, "error": err.decode(errors="replace")[-300:]}
    moved = counters.delta(c0, node.counters())
    return Many(
        held=int(result.get("held", 0)),
        intact=int(result.get("intact", 0)),
        agent_rss_mb=rss,
        tcp_memory_mb=mem,
        tunnels=t1.opened - t0.opened if t0 and t1 else conns,
        spliced={k: moved.get(k, 0) for k in counters.HOP_RULES},
        error="" if result.get("ok") else str(result)[-300:],
    )
