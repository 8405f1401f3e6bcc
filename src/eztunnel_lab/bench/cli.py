"""`make bench`: plain vs spliced, measured side by side, interleaved, in one run.

    eztunnel-lab bench dataplane          # pod -> pod, no mesh
    eztunnel-lab bench all                # every section
    python -m eztunnel_lab.bench all      # the same

Results go to bench-results/<timestamp>/ (results.json, results.md, charts) with
bench-results/latest pointing at the newest run. Benchmarks never gate tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eztunnel_lab.bench import ambient, churn, dataplane, plot, resume, xds
from eztunnel_lab.bench.metric import Metric, Section

SECTIONS: dict[str, Section] = {
    "dataplane": dataplane.section,
    "churn": churn.section,
    "xds": xds.section,
    "ambient": ambient.section,
    "resume": resume.section,
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sections", nargs="+", choices=[*SECTIONS, "all"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=3, help="per measurement")
    p.add_argument("--out", type=Path, default=Path("bench-results"))


def run(args: argparse.Namespace) -> int:
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
        charts = plot.write_all(sections, out)
    print(markdown(metrics))
    if charts:
        print(f"charts: {', '.join(charts)}")
    targets = [m for m in metrics if m.met is not None]
    met = sum(1 for m in targets if m.met)
    print(f"bench: {met}/{len(targets)} targets met; results in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eztunnel-lab bench")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
