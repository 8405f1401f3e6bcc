"""The ambient rows that only the HBONE stand-in can show (pooled tunnels), plus churn.

- endurance: short flows and periodic bulk bursts share one pooled tunnel for >= 30 s;
  the share of the tunnel's bytes that the splice moved, per second and overall, and the
  short-flow FCT before and after the bursts;
- churn: new connections per second through the ambient path, the CPU per connection
  of each part of the node, and (bench/churn.py's probes) the BPF run time;
- many connections: 2,000 concurrent long-lived connections with light traffic: the
  agent's RSS, the kernel memory they hold (their sockets' buffers and the BPF maps'
  entries), the share spliced.

Each function measures one node (a Side) and returns plain numbers; bench/ambient.py
turns them into metrics for both nodes.
"""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from eztunnel_lab import counters, netlab, traffic
from eztunnel_lab.bench import churn as churn_mod
from eztunnel_lab.measure import CONNS_PORT, Side, fct, iperf3, settle
from eztunnel_lab.netlab import Lab
from eztunnel_lab.sim import AmbientNode, SimError, check_path
from eztunnel_lab.traffic import report
from eztunnel_plugin.bpf import layout, syscalls

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


@dataclass
class Churn:
    per_second: float
    conns: int
    cpu_us: dict[str, float]  # CPU per connection per part of the node (us)
    pairs: int  # pairs the data plane made meanwhile
    bpf: churn_mod.BpfCost | None = None  # with bpf_stats: BPF run time per connection


@contextlib.contextmanager
def unenrolled(node: AmbientNode) -> Iterator[None]:
    """Every endpoint out of the agent's map for the block, then back as it was: sock_ops
    still runs on every socket but pairs nothing. The agent only rewrites the map when
    istiod's state changes, which the fake istiod's does not during a run."""
    with node.dataplane() as dp:
        held = dp.endpoints.read_all()
        for ip in held:
            dp.endpoints.delete(ip)
        try:
            yield
        finally:
            for ip, flags in held.items():
                dp.endpoints.put(ip, flags)


def churn(side: Side, seconds: float, concurrency: int = 16, bpf_stats: bool = False) -> Churn:
    """New connections per second (connect, 1 byte each way, close), proven on every hop,
    with the CPU each part of the node spent per connection."""
    node = side.node
    settle()
    for pod in node.pods:  # both nodes start alike, whatever ran before (flush_time_wait)
        churn_mod.flush_time_wait(node.lab, pod.netns)
    before, c0, cpu0 = node.standin_stats(), node.counters(), netlab.cgroups_cpu_us(node.parts())
    with churn_mod.bpf_stats() if bpf_stats else contextlib.nullcontext():
        r0 = churn_mod.prog_runs(node.lab.bpffs) if bpf_stats else {}
        result = _conns_client(
            node,
            "churn",
            *("--seconds", str(seconds), "--concurrency", str(concurrency)),
            timeout=seconds + 60,
        )
        r1 = churn_mod.prog_runs(node.lab.bpffs) if bpf_stats else {}
    if not result.get("ok"):
        raise SimError(f"churn client: {result}")
    conns = int(result["conns"])  # type: ignore[call-overload]
    cpu = {k: (v - cpu0[k]) / max(1, conns) for k, v in netlab.cgroups_cpu_us(node.parts()).items()}
    # Proven on every hop; not added to side.connections (no splice counts are taken here).
    check_path(before, node.standin_stats(), side.client, side.server, conns)
    moved = counters.delta(c0, node.counters())
    cost = churn_mod.bpf_cost(r0, r1, conns, moved) if bpf_stats else None
    return Churn(float(result["per_second"]), conns, cpu, moved.get("pairs", 0), cost)  # type: ignore[arg-type]


@dataclass
class Many:
    held: int
    intact: int
    agent_rss_mb: float
    kernel: Kernel  # what the kernel holds for them: held minus before
    tunnels: int
    spliced: dict[str, int]  # pairs per hop rule made for them
    error: str = ""


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024


# ss -tnmH state established: "<recv-q> <send-q> <local> <peer>\n\t skmem:(r..,rb..,t..,
# tb..,f..,w..,...)"; an IPv6 (or dual-stack) socket's local address is in brackets
_SKMEM = re.compile(
    r"^\S+\s+\S+\s+(\S+)\s+\S+\s+skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f(\d+),w(\d+)", re.M
)


@functools.cache
def psock_bytes() -> int:
    """What one sk_psock costs: its size from the kernel's BTF (696 bytes on 6.18), rounded
    up to the kmalloc cache it comes from (kzalloc: powers of two above 192 bytes)."""
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    m = re.search(r"STRUCT 'sk_psock' size=(\d+)", out)
    if m is None:
        raise SimError("the kernel's BTF has no struct sk_psock")
    return 1 << (int(m.group(1)) - 1).bit_length()


@dataclass
class Kernel:
    """Kernel memory held by the established sockets of a node's pods (the apps' and the
    stand-in's: they live in the pods' netns) and by the data plane for them, in bytes."""

    sockets: int = 0
    buffers: int = 0  # skmem r + w + f
    objects: int = 0  # the socket structs: count x the TCP / TCPv6 slab's object size
    maps: int = 0  # the agent's pinned maps' memlock
    psocks: int = 0  # one sk_psock per socket in the SOCKHASH

    def __sub__(self, o: Kernel) -> Kernel:
        return Kernel(*(a - b for a, b in zip(self.fields(), o.fields(), strict=True)))

    def fields(self) -> tuple[int, int, int, int, int]:
        return self.sockets, self.buffers, self.objects, self.maps, self.psocks

    @property
    def total_mb(self) -> float:
        return (self.buffers + self.objects + self.maps + self.psocks) / (1 << 20)

    def text(self) -> str:
        mb = 1 << 20
        return (
            f"{self.sockets} sockets: buffers {self.buffers / mb:.2f} MB, socket structs "
            f"{self.objects / mb:.2f} MB, BPF maps {self.maps / mb:.2f} MB, psocks "
            f"{self.psocks / mb:.2f} MB"
        )


def _slab_sizes() -> dict[str, int]:
    sizes = {}
    for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
        f = line.split()
        if f and f[0] in ("TCP", "TCPv6"):
            sizes[f[0]] = int(f[3])  # objsize
    return sizes


def parse_skmem(out: str, slab: dict[str, int]) -> tuple[int, int, int]:
    """(sockets, skmem r + w + f bytes, socket struct bytes) of `ss -tnmH state
    established` output. `ss` prints f (sk_forward_alloc, an int) unsigned: a reserve the
    kernel overdrew shows as about 4 GiB, so it is read signed."""
    count = buffers = objects = 0
    for m in _SKMEM.finditer(out):
        fwd = int(m.group(3))
        buffers += int(m.group(2)) + (fwd - (1 << 32) if fwd >= 1 << 31 else fwd)
        buffers += int(m.group(4))
        objects += slab["TCPv6" if m.group(1).startswith("[") else "TCP"]
        count += 1
    return count, buffers, objects


def socket_memory(lab: Lab, netns: Iterable[str]) -> tuple[int, int, int]:
    """parse_skmem over the established sockets of every netns given."""
    slab = _slab_sizes()
    total = (0, 0, 0)
    for ns in netns:
        got = parse_skmem(lab.exec(ns, "ss", "-tnmH", "state", "established").stdout, slab)
        total = (total[0] + got[0], total[1] + got[1], total[2] + got[2])
    return total


def kernel_memory(lab: Lab, netns: Iterable[str]) -> Kernel:
    """What the sockets of these netns and the data plane in the lab's bpffs hold."""
    count, buffers, objects = socket_memory(lab, netns)
    k = Kernel(count, buffers, objects, map_memory(lab.bpffs))
    if (lab.bpffs / "ez_socks").exists():
        with syscalls.pin_fd(lab.bpffs / "ez_socks") as fd:
            k.psocks = psock_bytes() * len(syscalls.map_keys(fd, 8))
    return k


def map_memory(bpffs: Path) -> int:
    """memlock of every pinned map of the data plane (what the kernel charges for them; for
    maps allocated on demand it follows their entries); 0 without one."""
    total = 0
    for name in layout.MAPS:
        if not (bpffs / name).exists():
            continue
        with syscalls.pin_fd(bpffs / name) as fd:
            for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("memlock:"):
                    total += int(line.split()[1])
    return total


def many_connections(side: Side, conns: int = 2000, seconds: float = 10.0) -> Many:
    node = side.node
    settle()
    netns = [p.netns for p in node.pods]
    k0, c0 = kernel_memory(node.lab, netns), node.counters()
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
    k1 = kernel_memory(node.lab, netns)
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
        kernel=k1 - k0,
        tunnels=t1.opened - t0.opened if t0 and t1 else conns,
        spliced={k: moved.get(k, 0) for k in counters.HOP_RULES},
        error="" if result.get("ok") else str(result)[-300:],
    )
