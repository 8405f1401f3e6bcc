"""What every benchmark section produces: named metrics, baseline vs plugin samples.

The sections (dataplane, xds, ambient) build them, the runner (bench/cli.py) records
and prints them, bench/plot.py draws them; this module imports none of those.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field


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


# A benchmark section: parsed command line in, its metrics out.
Section = Callable[[argparse.Namespace], list[Metric]]
