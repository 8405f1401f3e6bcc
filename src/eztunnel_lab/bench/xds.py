"""Control-plane benchmark: decode, first snapshot -> sink, one change -> sink, agent RSS.

Runs FakeIstiod in-process on 127.0.0.1 and the real client, state and reconciler
against it. Pass a sink factory to measure the real BPF endpoint map instead of the
in-memory one. Timings are wall clock on this machine; nothing here asserts on them.

    python -m eztunnel_lab.bench.xds [--workloads 10000] [--local 1000] [--changes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from eztunnel_lab.bench.metric import Metric
from eztunnel_lab.fake_istiod import FakeIstiod, authorization_resource, workload_resource
from eztunnel_lab.netlab import Lab  # a private cgroup and bpffs dir for the agent
from eztunnel_plugin import log
from eztunnel_plugin.aio import cancel_all
from eztunnel_plugin.bpf import loader
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2
from eztunnel_plugin.pb.istio.security import authorization_pb2 as authz_pb
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl_pb
from eztunnel_plugin.reconciler import EndpointSink, MemorySink, Reconciler
from eztunnel_plugin.state.workloads import WorkloadState
from eztunnel_plugin.xds import decode
from eztunnel_plugin.xds.client import Watch, XdsClient, XdsConfig
from eztunnel_plugin.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE
from eztunnel_plugin.xds.updater import AddressHandler, state_watches

NODE = "bench-node"


def _ip(i: int) -> bytes:
    return bytes([10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])


def make_workload(i: int, local: bool, ip_index: int | None = None) -> Any:
    """A pod shaped like istiod's: uid, names, one IP, service ports, SA, node."""
    w = wl_pb.Workload(
        uid=f"Kubernetes//Pod/ns-{i % 50}/pod-{i}",
        name=f"pod-{i}",
        namespace=f"ns-{i % 50}",
        addresses=[_ip(ip_index if ip_index is not None else i)],
        node=NODE if local else f"node-{i % 97}",
        tunnel_protocol=wl_pb.HBONE,
        service_account=f"sa-{i % 20}",
        canonical_name=f"app-{i % 200}",
        canonical_revision="v1",
        workload_type=wl_pb.POD,
        workload_name=f"app-{i % 200}",
        cluster_id="Kubernetes",
        status=wl_pb.HEALTHY,
    )
    w.services[f"ns-{i % 50}/svc-{i % 200}.ns-{i % 50}.svc.cluster.local"].ports.add(
        service_port=80, target_port=8080
    )
    return w


def build_resources(n: int, local: int) -> dict[str, dict[str, Any]]:
    step = max(1, n // max(1, local))
    addrs = {}
    for i in range(n):
        res = workload_resource(make_workload(i, local=i % step == 0 and i // step < local))
        addrs[res.name] = res
    auth = authorization_resource(
        authz_pb.Authorization(name="allow", namespace="istio-system", scope=authz_pb.GLOBAL)
    )
    return {ADDRESS_TYPE: addrs, AUTHORIZATION_TYPE: {auth.name: auth}}


def bench_decode(n: int = 10_000, rounds: int = 20) -> dict[str, float]:
    """Decode of one n-resource DeltaDiscoveryResponse, and decode + validate + apply."""
    res = build_resources(n, n // 10)[ADDRESS_TYPE]
    resp = discovery_pb2.DeltaDiscoveryResponse(
        type_url=ADDRESS_TYPE, nonce="n", resources=list(res.values())
    )
    raw = resp.SerializeToString()
    parse = []
    for _ in range(rounds):
        t = time.perf_counter()
        discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
        parse.append(time.perf_counter() - t)
    apply = []
    decoded = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
    for _ in range(max(3, rounds // 4)):
        watch = Watch(decode.ADDRESS, AddressHandler(WorkloadState(NODE)))
        t = time.perf_counter()
        result = watch.apply(decoded.resources, ())
        apply.append(time.perf_counter() - t)
        if result.rejected:
            raise RuntimeError(f"benchmark data rejected: {result.rejected[:3]}")
    return {
        "response_bytes": len(raw),
        "decode_ms_median": statistics.median(parse) * 1000,
        "decode_validate_apply_ms_median": statistics.median(apply) * 1000,
    }


class _TimedSink:
    """Wraps a sink: remembers when each IP was last written and wakes a waiter."""

    def __init__(self, inner: EndpointSink) -> None:
        self.inner = inner
        self.count = 0
        self.last_write = 0.0
        self.written: dict[str, float] = {}
        self.changed = asyncio.Event()

    def read_all(self) -> dict[str, int]:
        return self.inner.read_all()

    def put(self, ip: str, flags: int) -> None:
        self.inner.put(ip, flags)
        self.count += 1
        self.last_write = self.written[ip] = time.perf_counter()
        self.changed.set()

    def delete(self, ip: str) -> None:
        self.inner.delete(ip)
        self.count += 1
        self.last_write = self.written[ip] = time.perf_counter()
        self.changed.set()


class _TimedFake(FakeIstiod):
    """Stamps each response just before the server writes it."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.sent_at: dict[str, float] = {}  # nonce -> perf_counter
        self.last_sent_at = 0.0

    def _send(self, st: Any, type_url: str, res: list[Any], removed: list[str]) -> None:
        super()._send(st, type_url, res, removed)
        self.last_sent_at = self.sent_at[st.last_nonce[type_url]] = time.perf_counter()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def bench_pipeline(
    n: int = 10_000,
    local: int = 1_000,
    changes: int = 200,
    sink_factory: Callable[[], EndpointSink] | None = None,
) -> dict[str, float]:
    fake = _TimedFake(build_resources(n, local))
    await fake.start("127.0.0.1:0")
    state = WorkloadState(NODE)
    cfg = XdsConfig(
        node_id="ztunnel~127.0.0.1~bench.ns~ns.svc.cluster.local",
        node_metadata={"NODE_NAME": NODE},
        address=fake.address,
        plaintext=True,
        token_file=None,
    )
    client = XdsClient(cfg, state_watches(state))
    sink = _TimedSink(sink_factory() if sink_factory else MemorySink())
    rec = Reconciler(state, sink)
    tasks = [asyncio.create_task(client.run()), asyncio.create_task(rec.run())]
    out: dict[str, float] = {}
    try:
        await asyncio.wait_for(client.synced.wait(), 30)
        await asyncio.wait_for(rec.wait_applied(state.version), 30)
        first = fake.records[0].responses[0]
        if first.type_url != ADDRESS_TYPE or len(sink.read_all()) != local:
            raise RuntimeError("first snapshot did not land as expected")
        out["first_snapshot_to_sink_ms"] = (sink.last_write - fake.sent_at[first.nonce]) * 1000
        out["first_snapshot_received_to_sink_ms"] = (
            sink.last_write - client.stats.first_response_at
        ) * 1000

        # One local workload changes its IP per push: delete old + put new in the map.
        lat = []
        step = max(1, n // max(1, local))
        for k in range(changes):
            i = (k % local) * step
            new_ip = n + 1 + k
            res = workload_resource(make_workload(i, local=True, ip_index=new_ip))
            ip_text = ".".join(str(b) for b in _ip(new_ip))
            sink.changed.clear()
            fake.update(ADDRESS_TYPE, add=[res])
            for _ in range(1000):  # bounded: 1000 * 10 ms
                if ip_text in sink.written:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sink.changed.wait(), 0.01)
                sink.changed.clear()
            else:
                raise RuntimeError(f"change {k} never reached the sink")
            lat.append(sink.written[ip_text] - fake.last_sent_at)
        out["change_to_sink_p50_ms"] = _pct(lat, 50) * 1000
        out["change_to_sink_p99_ms"] = _pct(lat, 99) * 1000
        out["change_to_sink_max_ms"] = max(lat) * 1000
    finally:
        await cancel_all(tasks)
        await fake.stop()
    return out


async def bench_agent_rss(n: int = 10_000, local: int = 1_000) -> dict[str, float]:
    """RSS of the real agent (`eztunnel-plugin run`: BPF, xDS, API, the metrics and health
    listeners as the chart runs it) once it is ready."""
    fake = FakeIstiod(build_resources(n, local))
    await fake.start("127.0.0.1:0")
    try:
        with Lab() as lab:
            return await _agent_rss(lab.cgroup, lab.bpffs, fake.address, local)
    finally:
        await fake.stop()


async def _agent_rss(cgroup: Path, bpffs: Path, xds: str, local: int) -> dict[str, float]:
    # The agent's admin socket lives in a directory of the bench's own, never the host's.
    with tempfile.TemporaryDirectory(prefix="ezbench-") as tmp:
        return await _run_agent_rss(cgroup, bpffs, xds, local, Path(tmp) / "admin.sock")


def _free_loopback_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def _run_agent_rss(
    cgroup: Path, bpffs: Path, xds: str, local: int, admin: Path
) -> dict[str, float]:
    api, metrics, health = (_free_loopback_port() for _ in range(3))
    # The chart's defaults: the metrics and health listeners are on.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eztunnel_plugin", "run",
        "--xds-address", xds, "--xds-plaintext",
        "--node-name", NODE, "--cgroup", str(cgroup), "--bpffs", str(bpffs),
        "--grpc-listen", api, "--metrics-listen", metrics, "--health-listen", health,
        "--admin-socket", str(admin), "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(600):  # bounded: 60 s
            check = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "eztunnel_plugin", "health", "--grpc-addr", api,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            if await check.wait() == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the agent never became ready")
        # As the chart's Prometheus and kubelet would: one scrape and one readiness probe
        # (and both prove the listeners are on).
        families = await asyncio.to_thread(_metric_families, metrics)
        ready = await asyncio.to_thread(_http_status, health, "/healthz/ready")
        await asyncio.sleep(1.0)  # settle: the first snapshot is the peak
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        )
        kb = {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    return {"agent_rss_mb": kb["VmRSS"] / 1024, "agent_peak_rss_mb": kb["VmHWM"] / 1024,
            "agent_local_endpoints": float(local), "agent_metric_families": float(families),
            "agent_ready_status": float(ready)}  # fmt: skip


def _http_get(listen: str, path: str) -> tuple[int, bytes]:
    host, port = listen.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def _http_status(listen: str, path: str) -> int:
    return _http_get(listen, path)[0]


def _metric_families(listen: str) -> int:
    status, body = _http_get(listen, "/stats/prometheus")
    if status != 200:
        raise RuntimeError(f"the agent's metrics answered {status}")
    return sum(1 for _ in text_string_to_metric_families(body.decode()))


def run(
    n: int = 10_000,
    local: int = 1_000,
    changes: int = 200,
    sink_factory: Callable[[], EndpointSink] | None = None,
    rss: bool = True,
) -> dict[str, float]:
    """Everything, printed one metric per line; returns the numbers."""
    results: dict[str, float] = {}
    results.update(bench_decode(n))
    results.update(asyncio.run(bench_pipeline(n, local, changes, sink_factory)))
    if rss:
        results.update(asyncio.run(bench_agent_rss(n, local)))
    print(f"xds control plane: {n} workloads, {local} on this node, {changes} single changes")
    for key, value in results.items():
        print(f"  {key:40s} {value:10.2f}")
    return results


def section(args: argparse.Namespace) -> list[Metric]:
    """10,000 workloads (1,000 on this node) from the fake istiod into the real BPF map."""
    with Lab() as lab, loader.install_or_reuse(lab.bpffs, lab.cgroup) as dp:
        got = run(sink_factory=lambda: dp.endpoints, rss=False)
    rss = asyncio.run(bench_agent_rss())
    print(f"  agent RSS with 10,000 workloads: {rss['agent_rss_mb']:.1f} MB "
          f"(peak {rss['agent_peak_rss_mb']:.1f} MB)", flush=True)  # fmt: skip

    def absolute(name: str, unit: str, target: str, value: float, note: str = "") -> Metric:
        return Metric(name, unit, target, plugin=[value], absolute=True, note=note)

    return [
        absolute("xds_decode_10k_resources", "ms", "< 50", got["decode_ms_median"]),
        absolute("xds_first_snapshot_to_bpf_map", "ms", "< 1000",
                 got["first_snapshot_received_to_sink_ms"],
                 "first 10,000-workload response received -> 1,000 entries in the BPF map"),
        absolute("xds_change_to_bpf_map_p99", "ms", "< 10", got["change_to_sink_p99_ms"],
                 "one workload's IP changes at istiod -> visible in the BPF map"),
        absolute("agent_rss_10k_workloads", "MB", "< 50", rss["agent_rss_mb"],
                 f"the real agent (BPF, xDS, API, metrics and health listeners: the chart's "
                 f"defaults) after its first snapshot; peak "
                 f"{rss['agent_peak_rss_mb']:.1f} MB"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_xds")
    p.add_argument("--workloads", type=int, default=10_000)
    p.add_argument("--local", type=int, default=1_000)
    p.add_argument("--changes", type=int, default=200)
    p.add_argument("--no-rss", action="store_true")
    args = p.parse_args(argv)
    log.configure(level="warning")
    run(args.workloads, args.local, args.changes, rss=not args.no_rss)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
