"""measure.busy: the CPU a run used, per part of the node and for its busiest thread, read
from the threads' schedstat. No timing is asserted: a thread that spins is seen spinning."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import cast

from eztunnel_lab import measure
from eztunnel_lab.measure import Busy
from eztunnel_lab.sim import AmbientNode


class FakeNode:
    """A node whose parts are directories with a cgroup.procs (this process in one, the
    others empty) and a cpu.stat the test writes."""

    def __init__(self, tmp_path: Path, spinner_in: str) -> None:
        self.dirs = {}
        for part in ("client", "server", "ztunnel", "agent"):
            d = tmp_path / part
            d.mkdir()
            (d / "cgroup.procs").write_text(f"{os.getpid()}\n" if part == spinner_in else "")
            self.dirs[part] = d
            self.usage(part, 0)

    def usage(self, part: str, usec: int) -> None:
        (self.dirs[part] / "cpu.stat").write_text(f"usage_usec {usec}\nuser_usec {usec}\n")

    def parts(self) -> dict[str, Path]:
        return self.dirs


def test_a_spinning_thread_is_the_busiest_of_its_part(tmp_path: Path) -> None:
    fake = FakeNode(tmp_path, "ztunnel")
    node = cast(AmbientNode, fake)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    def nap() -> str:
        # A client that ran and ended during the run: only its cgroup still counts it.
        time.sleep(0.3)
        fake.usage("client", 150_000)
        return "done"

    spinner = threading.Thread(target=spin, name="spinner")
    spinner.start()
    try:
        # The run itself sleeps: the CPU seen is the spinner's (bounded, 0.3 s).
        result, cpu = measure.busy(node, nap)
    finally:
        stop.set()
        spinner.join(timeout=5)
    assert result == "done"
    assert set(cpu.parts) == {"client", "server", "ztunnel", "agent"}
    assert cpu.parts["server"] == cpu.parts["agent"] == cpu.parts["ztunnel"] == 0.0
    assert 10.0 < cpu.parts["client"] <= 50.0, cpu  # 0.15 s of CPU over >= 0.3 s
    # The spinner is this process's busiest thread (Python leaves the thread's comm as the
    # process's), and it belongs to the ztunnel part.
    assert cpu.busiest[0].startswith("ztunnel/"), cpu
    assert cpu.busiest[1] > 10.0, cpu


def test_the_median_of_runs_is_per_part() -> None:
    runs = [
        Busy({"client": 10.0, "ztunnel": 90.0}, ("ztunnel/worker", 80.0)),
        Busy({"client": 30.0, "ztunnel": 70.0}, ("ztunnel/worker", 60.0)),
        Busy({"client": 20.0, "ztunnel": 50.0}, ("client/iperf3", 40.0)),
    ]
    med = Busy.median(runs)
    assert med.parts == {"client": 20.0, "ztunnel": 70.0}
    assert med.busiest == ("ztunnel/worker", 60.0)
    assert med.text() == "client 20%, ztunnel 70%; busiest thread ztunnel/worker 60%"
