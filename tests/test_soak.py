"""eztunnel-lab soak and its traffic (traffic/mesh.py): runs through the real data plane
count as intact only when every byte arrived in order, a wrong byte is caught and named,
and bad options get one clear line. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eztunnel_lab import traffic
from eztunnel_lab.measure import agent_skb_verdict
from eztunnel_lab.netlab import Lab
from tests.conftest import require_root, wait_line

LAB = [sys.executable, "-m", "eztunnel_lab"]


@pytest.mark.kernel
def test_a_short_soak_goes_through_every_shape_intact() -> None:
    require_root()
    done = subprocess.run(
        [*LAB, "soak", "--minutes", "5", "--runs", "3", "--scale", "0.02"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    runs, summary = lines[:-1], lines[-1]
    assert [r["shape"] for r in runs] == ["bulk", "many", "switching"]
    assert all(r["ok"] and r["client"]["ok_conns"] == r["client"]["conns"] for r in runs)
    # Through the data plane: every connection paired, and the 16 KiB limit switched.
    assert [r["counters"]["pairs"] for r in runs] == [8, 32, 64]
    assert runs[2]["counters"]["backlog_fallbacks"] > 0
    assert summary["runs"] == summary["intact"] == 3 and summary["tainted"] == 0
    want = "with the SK_SKB verdict" if agent_skb_verdict() else "sk_msg only"
    assert summary["data_plane"] == want
    assert done.stdout.rstrip().endswith(f"soak: 3 of 3 runs intact ({want})")


def test_bad_options_get_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [*LAB, "soak", "--scale", "0"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "eztunnel-lab soak: --minutes and --runs must be >= 0, --scale in (0, 16]"
    )


@pytest.mark.kernel
def test_the_mesh_names_a_wrong_byte(lab: Lab) -> None:
    # A client that writes bytes outside the pattern: the server's reader must say so.
    pod = lab.add_pod()
    opts = ["--conns", "1", "--size", "4096", "--burst", "4096", "--timeout", "20"]
    srv = lab.spawn(pod, traffic.command("mesh", "server", "9500", *opts), stdout=subprocess.PIPE)
    wait_line(srv, '{"listening"')
    forge = (
        "import socket; s = socket.create_connection(('127.0.0.1', 9500)); "
        "s.sendall(bytes(4096)); s.shutdown(socket.SHUT_WR); "
        "exec('while s.recv(65536): pass')"
    )
    lab.spawn(pod, [sys.executable, "-c", forge]).wait(timeout=30)
    out, _ = srv.communicate(timeout=30)
    result = traffic.report(out)
    assert result["ok"] is False and result["ok_conns"] == 0, result
    assert "wrong byte at stream offset 0" in result["why"][0], result
    assert "bytes that are not in the pattern" in result["why"][0], result
