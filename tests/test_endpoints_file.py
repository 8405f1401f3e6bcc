"""--endpoints-file: strict parsing, bounded errors, and a watcher no edit can stop."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from eztunnel_lab.netlab import Lab
from eztunnel_plugin import endpoints_file
from eztunnel_plugin.endpoints_file import (
    MAX_BYTES,
    MAX_ENDPOINTS,
    MAX_ERROR,
    StaticEndpoints,
    load,
    parse,
)
from eztunnel_plugin.errors import EndpointsFileError
from eztunnel_plugin.reconciler import MemorySink, Reconciler
from tests.conftest import wait_for
from tests.test_agent import AgentProc
from tests.xds.testlib import run

# 305 bytes that expand to 9**8 (43 million) strings when constructed.
ALIAS_BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    + "".join(
        f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg", strict=True)
    )
    + f"endpoints: [{','.join(['*g'] * 9)}]\n"
)


def error(text: str) -> str:
    with pytest.raises(EndpointsFileError) as e:
        parse(text)
    message = str(e.value)
    assert len(message) <= MAX_ERROR and "\n" not in message
    return message


def write(path: Path, content: str | bytes) -> Path:
    """Replace the file atomically, as kubectl and editors do (a new inode each time)."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        tmp.write_bytes(content)
    tmp.replace(path)
    return path


def test_canonical_addresses() -> None:
    got = parse('endpoints: ["10.0.0.1", "::ffff:10.0.0.2", "FD00:0::1", 10.0.0.3, "fd00::1"]')
    assert got == {"10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.3"}
    assert parse("endpoints: []") == frozenset()
    assert parse("# a comment\n---\nendpoints: [10.0.0.1]  # one\n...\n") == {"10.0.0.1"}
    assert parse(json.dumps({"endpoints": ["2001:db8::a"]})) == {"2001:db8::a"}  # JSON is YAML


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.1", "reserved"),
        ("240.1.2.3", "reserved"),
    ],
)
def test_non_pod_addresses_are_refused(ip: str, reason: str) -> None:
    message = error(f'endpoints: ["10.0.0.1", "{ip}"]')
    assert f"endpoints[1]: {ip.removeprefix('::ffff:')} is {reason}" in message


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", 'a list "endpoints"'),
        ("- 10.0.0.1", 'a list "endpoints"'),
        ("endpoints: 10.0.0.1", 'a list "endpoints"'),
        ("endpoints:", 'a list "endpoints"'),
        ('endpoints: ["10.0.0.1"]\nextra: 1', "unknown key 'extra'"),
        ('endpoints: ["10.0.0.1"]\nendpoints: ["10.0.0.2"]', "key 'endpoints' repeated"),
        ("endpoints: [167772161]", "endpoints[0] is not a string but int"),
        ("endpoints: [true]", "endpoints[0] is not a string but bool"),
        ("endpoints: [null]", "is not a string but NoneType"),
        ("endpoints: [!!binary CgAAAQ==]", "is not a string but bytes"),
        ("endpoints: [[10.0.0.1]]", "nested too deeply"),
        ("endpoints: [{ip: 10.0.0.1}]", "nested too deeply"),
        ("endpoints: [10.0.0.1/24]", "'10.0.0.1/24' is not an IP address"),
        ("endpoints: [fe80::1%eth0]", "is not an IP address"),
        ("endpoints: [010.0.0.1]", "is not an IP address"),
        ("endpoints: !!python/object:os.system [id]", "not valid YAML"),
        ("endpoints: [\x07]", "not valid YAML"),
        ("endpoints: [a]\n---\nendpoints: [b]", "one YAML document only"),
        ('endpoints: &eps ["10.0.0.1"]', "anchors and aliases are not allowed"),
        ("[" * 200_000, "not valid YAML"),
    ],
)
def test_strict_types_and_syntax(text: str, want: str) -> None:
    assert want in error(text)


@pytest.mark.timeout(10)  # the old parser spent 20 s and 945 MB here
def test_alias_bomb_is_refused_before_construction() -> None:
    assert len(ALIAS_BOMB) < 400
    message = error(ALIAS_BOMB)
    assert message == "endpoints file: line 1: YAML anchors and aliases are not allowed"


def test_error_messages_are_bounded() -> None:
    message = error(f'endpoints: ["{"x" * 100_000}"]')
    assert "not an IP address" in message
    message = error("endpoints: [" + "10.0.0.1, " * 50_000 + "'" + "y" * 10_000 + "]")
    assert message.startswith("endpoints file: not valid YAML")


def test_limits(tmp_path: Path) -> None:
    path = tmp_path / "eps.yaml"
    many = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(1, MAX_ENDPOINTS + 2)]
    assert "endpoints, the map holds" in error(json.dumps({"endpoints": many}))
    assert len(parse(json.dumps({"endpoints": many[:MAX_ENDPOINTS]}))) == MAX_ENDPOINTS
    write(path, "endpoints: []\n" + "#" * MAX_BYTES)
    with pytest.raises(EndpointsFileError, match=f"larger than {MAX_BYTES} bytes"):
        load(path)
    write(path, b"endpoints: [\xff\xfe10.0.0.1]")
    with pytest.raises(EndpointsFileError, match=r"not UTF-8 \(byte 12\)"):
        load(path)
    with pytest.raises(EndpointsFileError, match="not a regular file"):
        load(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(EndpointsFileError, match="not a regular file"):  # and no hang
        load(fifo)
    with pytest.raises(EndpointsFileError, match="No such file"):
        load(tmp_path / "absent")


class Recorder:
    def __init__(self, source: StaticEndpoints) -> None:
        self.versions: list[int] = []
        source.subscribe(self.versions.append)


def test_bad_edits_keep_the_last_good_set(tmp_path: Path, monkeypatch: Any) -> None:
    path = write(tmp_path / "eps.yaml", 'endpoints: ["10.0.0.1"]')
    src = StaticEndpoints(path)
    seen = Recorder(src)
    assert src.complete and src.endpoints == {"10.0.0.1"} and src.last_error == ""
    good = src.snapshot()

    def crash(text: str, origin: str = "") -> frozenset[str]:
        raise KeyError("a bug")

    bad_edits: list[tuple[str, Any]] = [
        ("not UTF-8", b"endpoints: [\xc3\x28]"),
        ("anchors and aliases", ALIAS_BOMB),
        ('a list "endpoints"', "endpoints: 1"),
        ("loopback", 'endpoints: ["127.0.0.1"]'),
        ("larger than", "#" * (MAX_BYTES + 1)),
        ("internal error: KeyError", crash),
    ]
    for i, (want, content) in enumerate(bad_edits, start=1):
        with monkeypatch.context() as m:
            if callable(content):
                m.setattr(endpoints_file, "parse", content)
                write(path, 'endpoints: ["10.0.0.9"]')
            else:
                write(path, content)
            with capture_logs() as logs:
                assert src.reload() is False
        assert want in src.last_error, (want, src.last_error)
        assert src.errors == i
        assert [e["log_level"] for e in logs] == ["error"]
        assert src.snapshot() == good and seen.versions == []
    path.unlink()
    for _ in range(3):  # a missing file: one error, not one per poll
        src.reload()
    assert "No such file" in src.last_error and src.errors == len(bad_edits) + 1
    path.mkdir()
    src.reload()
    assert "not a regular file" in src.last_error
    path.rmdir()

    write(path, 'endpoints: ["10.0.0.1", "10.0.0.2"]')
    with capture_logs() as logs:
        assert src.reload() is True
    assert src.last_error == "" and src.endpoints == {"10.0.0.1", "10.0.0.2"}
    assert seen.versions == [src.version] == [good.version + 1]
    assert {e["event"] for e in logs} == {"endpoints_file.recovered", "endpoints_file.reloaded"}


def test_same_size_edit_right_after_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text('endpoints: ["10.0.0.1"]')
    src = StaticEndpoints(path)
    path.write_text('endpoints: ["10.0.0.2"]')  # in place, same size, maybe the same mtime
    src.reload()
    assert src.endpoints == {"10.0.0.2"}


def test_starting_with_a_bad_file_fails_closed(tmp_path: Path) -> None:
    path = write(tmp_path / "eps.yaml", b"\xff")
    src = StaticEndpoints(path)
    sink = MemorySink({"10.9.9.9": 1})  # left by an earlier agent
    rec = Reconciler(src, sink)
    assert not src.complete and "not UTF-8" in src.last_error
    assert rec.reconcile() is False and sink.ops == []
    write(path, 'endpoints: ["10.0.0.1"]')
    src.reload()
    assert src.complete and rec.reconcile() is True
    assert sink.entries == {"10.0.0.1": 1}


def test_watcher_survives_every_bad_edit(tmp_path: Path) -> None:
    path = write(tmp_path / "eps.yaml", 'endpoints: ["10.0.0.1"]')

    async def body() -> None:
        src = StaticEndpoints(path)
        sink = MemorySink()
        rec = Reconciler(src, sink)
        tasks = [asyncio.create_task(src.watch(interval=0.01)), asyncio.create_task(rec.run())]
        try:
            await asyncio.wait_for(rec.wait_applied(src.version), 5)
            for i, bad in enumerate([b"\xff\xfe", ALIAS_BOMB.encode(), b"endpoints: [::1]"]):
                write(path, bad)
                for _ in range(500):
                    if src.errors > i:
                        break
                    await asyncio.sleep(0.01)
                assert src.errors == i + 1 and src.last_error
            write(path, 'endpoints: ["10.0.0.2"]')
            for _ in range(500):
                if sink.entries == {"10.0.0.2": 1}:
                    break
                await asyncio.sleep(0.01)
            assert sink.entries == {"10.0.0.2": 1} and src.last_error == ""
            assert not any(t.done() for t in tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    run(body())


@pytest.mark.kernel
def test_agent_reports_a_bad_edit_and_applies_the_next_good_one(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    eps = write(tmp_path / "eps.yaml", json.dumps({"endpoints": [a.ip4]}))
    agent = AgentProc(lab, "--endpoints-file", str(eps))
    try:
        agent.wait_serving()
        for bad, want in ((b"endpoints: [\xff]", "not UTF-8"), (ALIAS_BOMB, "aliases")):
            write(eps, bad)
            wait_for(
                lambda w=want: w in agent.cli_json("status")["source_error"],  # type: ignore[misc]
                what=f"source_error {want}",
            )
            assert want in agent.cli("status").stdout  # the "source error" row
            assert agent.cli("health", check=False).returncode == 0  # the last good set holds
            assert [e["ip"] for e in agent.cli_json("endpoints")["endpoints"]] == [a.ip4]
        write(eps, json.dumps({"endpoints": [a.ip4, b.ip4]}))
        wait_for(lambda: len(agent.cli_json("endpoints")["endpoints"]) == 2, what="the good edit")
        assert all(e["in_map"] for e in agent.cli_json("endpoints")["endpoints"])
        assert agent.cli_json("status")["source_error"] == ""
    finally:
        agent.stop()
