"""`eztunnel-lab soak`: byte-checked traffic through the data plane until a deadline.

Two pods in a lab of their own (netns on a bridge, a cgroup, a bpffs directory), the
packaged object attached as the agent attaches it on this kernel (with the SK_SKB verdict
where the self-test's table lists the kernel), both pods enrolled. Then mesh runs
(traffic/mesh.py: many connections writing in bursts both ways, every byte checked) in
turn through three shapes until the time is up: bulk flows at the default backlog limit,
many flows at the default limit, and bursty flows through a 16 KiB limit that makes every
direction fall back and resume thousands of times. One JSON line per run, a summary line,
exit 1 if any run lost, repeated or reordered a byte. This is the soak that preceded the
SK_SKB workaround's default; run it on a kernel before trusting the plugin on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from eztunnel_lab import counters, traffic
from eztunnel_lab.measure import agent_skb_verdict
from eztunnel_lab.netlab import Lab, Pod
from eztunnel_plugin.bpf import layout, loader

KB, MB = 1 << 10, 1 << 20
PORT = 9400
COUNTED = ("pairs", "backlog_fallbacks", "resumes", "tainted")


@dataclass(frozen=True)
class Shape:
    name: str
    limit: int  # backlog limit, bytes
    conns: int
    size: int  # bytes each way per connection
    burst: int
    pause_ms: float


SHAPES = (
    Shape("bulk", layout.DEFAULT_BACKLOG_LIMIT, 8, 256 * MB, 1 * MB, 0.0),
    Shape("many", layout.DEFAULT_BACKLOG_LIMIT, 32, 16 * MB, 256 * KB, 0.5),
    Shape("switching", 16 * KB, 64, 8 * MB, 64 * KB, 2.0),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    p.add_argument(
        "--runs", type=int, default=0, help="stop after this many runs too (0: no limit)"
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every run's bytes per connection (default 1; 0.01 for a quick look)",
    )


def one_run(lab: Lab, a: Pod, b: Pod, port: int, shape: Shape, scale: float) -> dict[str, Any]:
    """Server in pod b, client in pod a (each in its pod's cgroup); both sides' results."""
    size = max(shape.burst, int(shape.size * scale))
    opts = ["--conns", str(shape.conns), "--size", str(size), "--burst", str(shape.burst)]
    opts += ["--pause-ms", str(shape.pause_ms), "--timeout", "300"]
    srv = lab.spawn(b, traffic.command("mesh", "server", str(port), *opts), stdout=subprocess.PIPE)
    assert srv.stdout is not None
    if b'"listening"' not in srv.stdout.readline():
        srv.kill()
        srv.wait(timeout=10)
        return {side: {"ok": False, "why": ["the mesh server did not start"]}
                for side in ("client", "server")}  # fmt: skip
    cli = lab.spawn(
        a, traffic.command("mesh", "client", b.ip4, str(port), *opts), stdout=subprocess.PIPE
    )
    out: dict[str, Any] = {}
    for side, proc in (("client", cli), ("server", srv)):
        try:
            raw, _ = proc.communicate(timeout=330)
        except subprocess.TimeoutExpired:
            proc.kill()
            raw, _ = proc.communicate(timeout=10)
        try:
            out[side] = traffic.report(raw)
        except ValueError as e:
            out[side] = {"ok": False, "why": [str(e)[:200]]}
    return out


def main(args: argparse.Namespace) -> int:
    if args.minutes < 0 or args.runs < 0 or not 0 < args.scale <= 16:
        print(
            "eztunnel-lab soak: --minutes and --runs must be >= 0, --scale in (0, 16]",
            file=sys.stderr,
        )
        return 2
    deadline = time.monotonic() + 60 * args.minutes
    runs = intact = 0
    totals = dict.fromkeys(COUNTED, 0)
    with_verdict = agent_skb_verdict()
    with Lab() as lab:
        a, b = lab.add_pod(), lab.add_pod()
        dp = loader.install_or_reuse(lab.bpffs, lab.cgroup, skb_verdict=with_verdict)
        try:
            for pod in (a, b):
                dp.endpoints.put(pod.ip4, layout.EP_ENROLLED)
            # At least one run; then until the time is up or --runs are done.
            while runs == 0 or (runs != args.runs and time.monotonic() < deadline):
                shape = SHAPES[runs % len(SHAPES)]
                dp.config.set_backlog_limit(shape.limit)
                c0 = dp.counters.read()
                got = one_run(lab, a, b, PORT + runs % 500, shape, args.scale)
                moved = counters.delta(c0, dp.counters.read())
                runs += 1
                ok = bool(got["client"].get("ok")) and bool(got["server"].get("ok"))
                intact += ok
                for k in COUNTED:
                    totals[k] += moved.get(k, 0)
                print(json.dumps({"run": runs, "shape": shape.name, "ok": ok, **got,
                                  "counters": {k: moved.get(k, 0) for k in COUNTED}}),
                      flush=True)  # fmt: skip
        finally:
            dp.close()
    verdict = "with the SK_SKB verdict" if with_verdict else "sk_msg only"
    print(json.dumps({"runs": runs, "intact": intact, "data_plane": verdict, **totals}))
    print(f"soak: {intact} of {runs} runs intact ({verdict})", flush=True)
    return 0 if intact == runs else 1
