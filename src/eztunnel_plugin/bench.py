"""`make bench`: plain vs spliced, measured side by side, interleaved, in one run.

    python -m eztunnel_plugin.bench dataplane   # pod -> pod, no mesh
    python -m eztunnel_plugin.bench all         # every section

Results go to bench-results/<timestamp>/ (results.json, results.md) with
bench-results/latest pointing at the newest run. Benchmarks never gate tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from eztunnel_plugin import dataplane, layout
from eztunnel_plugin.netlab import Lab, Pod


@dataclass
class Metric:
    name: str
    unit: str
    target: str  # e.g. "<= 0.55" on the ratio plugin/baseline; "" for information only
    baseline: list[float] = field(default_factory=list)
    plugin: list[float] = field(default_factory=list)
    absolute: bool = False  # target on the plugin's own value (e.g. "< 60" MB), no baseline
    failures: list[str] = field(default_factory=list)  # runs that failed (recorded as 0)
    note: str = ""  # context a reader needs (e.g. what was not spliced and why)

    @property
    def ratio(self) -> float | None:
        if self.absolute or not self.baseline or not self.plugin:
            return None
        return statistics.median(self.plugin) / statistics.median(self.baseline)

    @property
    def met(self) -> bool | None:
        """None when the metric has no target (information only). A run that failed
        never meets a target, whatever the median of the others says."""
        if not self.target:
            return None
        op, _, text = self.target.partition(" ")
        value = statistics.median(self.plugin) if self.absolute else self.ratio
        if value is None or self.failures:
            return False
        limit = float(text)
        return {"<=": value <= limit, "<": value < limit, ">=": value >= limit, ">": value > limit}[
            op
        ]

    def as_json(self) -> dict[str, object]:
        ratio = self.ratio
        return {
            "unit": self.unit,
            "baseline": statistics.median(self.baseline) if self.baseline else None,
            "plugin": statistics.median(self.plugin),
            "ratio": round(ratio, 3) if ratio is not None else None,
            "target": self.target or None,
            "met": self.met,
            "baseline_samples": self.baseline,
            "plugin_samples": self.plugin,
            "failures": self.failures,
            "note": self.note,
        }


# ---- measuring tools -------------------------------------------------------------

_PCT = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")


def sockperf(
    lab: Lab, pod: Pod, cgroup: Path, host: str, port: int, pin: bool, seconds: int
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
        (["taskset", "-c", "0"] if pin else []) + argv,
        cgroup=cgroup,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = proc.communicate(timeout=seconds + 30)
    pcts = {float(p): float(v) for p, v in _PCT.findall(out.decode())}
    if 50.0 not in pcts:
        raise RuntimeError(f"sockperf printed no percentiles:\n{out.decode()[-1500:]}")
    return {"p50": pcts[50.0], "p99": pcts[99.0]}


def iperf3(
    lab: Lab, pod: Pod, cgroup: Path, host: str, port: int, seconds: int, streams: int = 1
) -> float:
    """Throughput in Gbit/s (receiver side)."""
    proc = lab.spawn(
        pod,
        ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
        cgroup=cgroup,
        stdout=subprocess.PIPE,
    )
    out, _ = proc.communicate(timeout=seconds + 30)
    report = json.loads(out)
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9


def start_servers(lab: Lab, pod: Pod, cgroup: Path, host: str, base: int) -> None:
    """sockperf pinned (base), sockperf unpinned (base+1), iperf3 (base+2)."""
    lab.spawn(
        pod,
        ["taskset", "-c", "0", "sockperf", "server", "--tcp", "-i", host, "-p", str(base)],
        cgroup=cgroup,
        stdout=subprocess.DEVNULL,
    )
    lab.spawn(
        pod,
        ["sockperf", "server", "--tcp", "-i", host, "-p", str(base + 1)],
        cgroup=cgroup,
        stdout=subprocess.DEVNULL,
    )
    lab.spawn(
        pod,
        ["iperf3", "-s", "-B", host, "-p", str(base + 2)],
        cgroup=cgroup,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ss = lab.exec(pod.name, "ss", "-ltnH").stdout
        if all(f":{base + i} " in ss for i in range(3)):
            return
        time.sleep(0.05)
    raise RuntimeError("benchmark servers did not start")


# ---- sections -----------------------------------------------------------------------


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
        with dataplane.Dataplane.install_or_reuse(lab.bpffs, spliced) as dp:
            for pod in (a, b):
                dp.endpoints.put(pod.ip4, layout.EP_ENROLLED)
            start_servers(lab, b, plain, b.ip4, 12000)
            start_servers(lab, b, spliced, b.ip4, 13000)
            for r in range(rounds):
                for cg, base, side in ((plain, 12000, "baseline"), (spliced, 13000, "plugin")):
                    before = dp.counters()["pairs"]
                    pin = sockperf(lab, a, cg, b.ip4, base, True, seconds)
                    unpin = sockperf(lab, a, cg, b.ip4, base + 1, False, seconds)
                    gbps = iperf3(lab, a, cg, b.ip4, base + 2, seconds)
                    pairs = dp.counters()["pairs"] - before
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


def _ambient(args: argparse.Namespace) -> list[Metric]:
    from eztunnel_plugin.bench_ambient import bench_ambient  # imports this module

    return bench_ambient(args.rounds, args.seconds)


def bench_xds_section(args: argparse.Namespace) -> list[Metric]:
    """10,000 workloads (1,000 on this node) from the fake istiod into the real BPF map."""
    import asyncio

    from eztunnel_plugin import bench_xds

    with Lab() as lab, dataplane.Dataplane.install_or_reuse(lab.bpffs, lab.cgroup) as dp:
        got = bench_xds.run(sink_factory=lambda: dp.endpoints, rss=False)
    rss = asyncio.run(bench_xds.bench_agent_rss())
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
        absolute("agent_rss_10k_workloads", "MB", "< 60", rss["agent_rss_mb"],
                 f"the real agent (BPF, xDS, API) after its first snapshot; peak "
                 f"{rss['agent_peak_rss_mb']:.1f} MB"),
    ]  # fmt: skip


SECTIONS: dict[str, Callable[[argparse.Namespace], list[Metric]]] = {
    "dataplane": lambda a: bench_dataplane(a.rounds, a.seconds),
    "xds": bench_xds_section,
    "ambient": _ambient,
}


# ---- results ------------------------------------------------------------------------


def machine() -> dict[str, object]:
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3g}" if values else "-"


def _spread(values: list[float]) -> str:
    return f"{min(values):.3g}..{max(values):.3g}" if len(values) > 1 else "-"


def markdown(metrics: list[Metric]) -> str:
    lines = [
        "| metric | unit | baseline | plugin | ratio | target | met | spread baseline "
        "| spread plugin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in metrics:
        ratio = m.ratio
        met = {None: "", True: "yes", False: "NO"}[m.met]
        lines.append(
            f"| {m.name} | {m.unit} | {_fmt(m.baseline)} | {_fmt(m.plugin)} | "
            f"{f'{ratio:.2f}' if ratio is not None else '-'} | {m.target or '-'} | "
            f"{met} | {_spread(m.baseline)} | {_spread(m.plugin)} |"
        )
    for m in metrics:
        if m.failures:
            failed = "; ".join(sorted(set(m.failures)))
            lines.append(f"\n{m.name}: {len(m.failures)} failed run(s), recorded as 0: {failed}")
        if m.note:
            lines.append(f"\n{m.name}: {m.note}")
    return "\n".join(lines) + "\n"


@contextmanager
def results_dir(root: Path) -> Iterator[Path]:
    out = root / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    yield out
    latest = root / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(out.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eztunnel-plugin bench")
    p.add_argument("sections", nargs="+", choices=[*SECTIONS, "all"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=3, help="per measurement")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    names = list(SECTIONS) if "all" in args.sections else args.sections
    sections: dict[str, list[Metric]] = {}
    started = time.monotonic()
    for name in names:
        print(f"== {name}", flush=True)
        sections[name] = SECTIONS[name](args)
    metrics = [m for ms in sections.values() for m in ms]
    with results_dir(args.out) as out:
        doc = {
            "machine": machine() | {"bench_seconds": round(time.monotonic() - started)},
            "metrics": {m.name: m.as_json() for m in metrics},
        }
        (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "results.md").write_text(markdown(metrics))
        charts = _charts(sections, out)
    print(markdown(metrics))
    if charts:
        print(f"charts: {', '.join(charts)}")
    targets = [m for m in metrics if m.met is not None]
    met = sum(1 for m in targets if m.met)
    print(f"bench: {met}/{len(targets)} targets met; results in {out}")
    return 0


def _charts(sections: dict[str, list[Metric]], out: Path) -> list[str]:
    try:
        from eztunnel_plugin import benchplot
    except ImportError as e:  # matplotlib is a dev extra; results stay valid without it
        print(f"no charts: {e}", file=sys.stderr)
        return []
    return benchplot.write_all(sections, out)


if __name__ == "__main__":
    sys.exit(main())
