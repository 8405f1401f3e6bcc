"""The waiter of the chart's uninstall hooks (charts/eztunnel/files/uninstall_wait.py), unit by
unit. test_chart.py runs it end to end, as the rendered Jobs call it, against a fake API server.
"""

from __future__ import annotations

import importlib.util
import sys
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "charts" / "eztunnel" / "files" / "uninstall_wait.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("uninstall_wait", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.dont_write_bytecode, saved = True, sys.dont_write_bytecode  # keep the chart dir clean
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


uw = _load()


def ds(generation: int = 1, **status: int) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": status}


@pytest.mark.parametrize(
    ("daemonset", "done"),
    [
        ({"metadata": {"generation": 1}}, False),  # no status yet
        (ds(2, observedGeneration=1, desiredNumberScheduled=0), False),  # stale status
        (ds(observedGeneration=1, desiredNumberScheduled=0), True),  # no node to clean
        (
            ds(
                observedGeneration=1,
                desiredNumberScheduled=3,
                numberReady=2,
                updatedNumberScheduled=3,
                numberUnavailable=1,
            ),
            False,
        ),
        (
            ds(
                observedGeneration=1,
                desiredNumberScheduled=3,
                numberReady=3,
                updatedNumberScheduled=2,
            ),
            False,
        ),
        (
            ds(
                observedGeneration=1,
                desiredNumberScheduled=3,
                numberReady=3,
                updatedNumberScheduled=3,
            ),
            True,
        ),
        (
            ds(
                observedGeneration=1,
                desiredNumberScheduled=3,
                numberReady=3,
                updatedNumberScheduled=3,
                numberUnavailable=0,
            ),
            True,
        ),
    ],
)
def test_daemonset_ready(daemonset: dict[str, Any], done: bool) -> None:
    assert uw.daemonset_ready(daemonset)[0] is done


def test_pods_gone() -> None:
    assert uw.pods_gone({"items": []}) == (True, "no agent pod left")
    assert uw.pods_gone({"items": None})[0] is True
    done, progress = uw.pods_gone(
        {"items": [{"metadata": {"name": "b"}}, {"metadata": {"name": "a"}}]}
    )
    assert not done
    assert progress == "2 agent pod(s) still present: a, b"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_retries_api_errors_and_logs_each_change_once() -> None:
    answers: list[Any] = [
        urllib.error.URLError("connection refused"),
        {"items": [{"metadata": {"name": "a"}}]},
        {"items": [{"metadata": {"name": "a"}}]},
        {"items": []},
    ]

    def fetch() -> Mapping[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        result: Mapping[str, Any] = answer
        return result

    clock, logged = Clock(), list[str]()
    assert uw.wait(
        fetch,
        uw.pods_gone,
        timeout=60,
        interval=2,
        log=logged.append,
        clock=clock,
        sleep=clock.sleep,
    )
    assert logged == [
        "API error: <urlopen error connection refused>",
        "1 agent pod(s) still present: a",
        "no agent pod left",
    ]
    assert clock.now == 6


def test_wait_times_out() -> None:
    clock, logged = Clock(), list[str]()
    ok = uw.wait(
        lambda: {"items": [{"metadata": {"name": "a"}}]},
        uw.pods_gone,
        timeout=10,
        interval=3,
        log=logged.append,
        clock=clock,
        sleep=clock.sleep,
    )
    assert not ok
    assert logged[-1].startswith("timed out after 10 s")
    assert clock.now == 12


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["pods-gone", "--namespace=x"], ["daemonset-ready", "--namespace=x"], []):
        with pytest.raises(SystemExit) as e:
            uw.main(argv)
        assert e.value.code == 2
    assert "needs --selector" in capsys.readouterr().err


def test_in_cluster_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    assert uw.in_cluster_server() == "https://[fd00::1]:6443"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(SystemExit):
        uw.in_cluster_server()


def test_script_uses_only_the_standard_library() -> None:
    """The Job runs it with the image's python3 and nothing installed for it."""
    for line in SCRIPT.read_text().splitlines():
        if line.startswith(("import ", "from ")):
            module = line.split()[1].split(".")[0]
            assert module == "__future__" or module in sys.stdlib_module_names, line
