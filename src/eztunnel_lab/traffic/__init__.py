"""Traffic programs the lab runs inside its pods (`python -m eztunnel_lab.traffic.<name>`):
flowcheck (byte-for-byte integrity) and fct (flow completion times). Standard library only,
so they start fast in any netns."""

from __future__ import annotations

import json
import sys
from typing import Any


def command(tool: str, *args: str) -> list[str]:
    """The argv that runs traffic program `tool` (flowcheck, fct) in this interpreter."""
    return [sys.executable, "-m", f"eztunnel_lab.traffic.{tool}", *args]


def report(out: bytes) -> dict[str, Any]:
    """A client's result: the JSON object it printed last. ValueError if there is none."""
    lines = out.decode(errors="replace").strip().splitlines()
    result = json.loads(lines[-1]) if lines else None
    if not isinstance(result, dict):
        raise ValueError(f"no JSON report in {out[-500:]!r}")
    return result
