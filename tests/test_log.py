"""Structured logging: one JSON object per event on stderr, levels filtered, secrets
never written."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from eztunnel_plugin import log


@pytest.fixture(autouse=True)
def fresh_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines()]


def test_json_events_carry_level_time_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("json", "info")
    log.get("t").info("agent.ready", endpoints=3)
    out, err = capsys.readouterr()
    assert out == ""
    (event,) = lines(err)
    assert event["event"] == "agent.ready" and event["endpoints"] == 3
    assert event["level"] == "info"
    assert str(event["timestamp"]).endswith("Z")  # ISO, UTC


def test_levels_below_the_configured_one_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("json", "warning")
    logger = log.get("t")
    logger.debug("a")
    logger.info("b")
    logger.warning("c")
    logger.error("d")
    assert [e["event"] for e in lines(capsys.readouterr().err)] == ["c", "d"]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secrets_are_redacted(fmt: log.LogFormat, capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(fmt, "info")
    log.get("t").info("xds.connect", token="s3cr3t-1", authorization="Bearer s3cr3t-2",
                      password="s3cr3t-3", address="istiod:15012")  # fmt: skip
    err = capsys.readouterr().err
    assert "s3cr3t" not in err
    assert err.count("<redacted>") == 3 and "istiod:15012" in err


def test_an_exception_is_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("json", "info")
    try:
        raise ValueError("bad value")
    except ValueError:
        log.get("t").exception("failed")
    (event,) = lines(capsys.readouterr().err)
    assert event["event"] == "failed" and "bad value" in json.dumps(event["exception"])


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        log.configure("json", "loud")
