"""`run` settings: every bad flag or variable is one ConfigError naming it, checked at start."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eztunnel_plugin import config
from eztunnel_plugin.bpf import paths
from eztunnel_plugin.config import from_args
from eztunnel_plugin.errors import ConfigError

PY = sys.executable
CGROUP = str(paths.cgroup2_root())
XDS = ["--xds-address", "127.0.0.1:15010", "--node-name", "n"]


def parse(*argv: str, env: dict[str, str] | None = None) -> config.AgentConfig:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return from_args(p.parse_args(["--cgroup", CGROUP, *argv]), env or {}, False)


def problem(*argv: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse(*argv, env=env)
    return e.value


# --- numeric flags ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--xds-stale-after", "nan"),
        ("--xds-stale-after", "inf"),
        ("--xds-stale-after", "-1"),
        ("--xds-stale-after", "0"),
        ("--xds-stale-after", "1e9"),
        ("--xds-stale-after", "soon"),
        ("--backlog-limit", "1000"),
        ("--backlog-limit", "4294967296"),
        ("--backlog-limit", "1e6"),
        ("--backlog-limit", "nan"),
        ("--capture-port", "0"),
        ("--capture-port", "65536"),
        ("--capture-port", "-5"),
        ("--capture-port", "http"),
    ],
)
def test_numeric_flags_are_range_checked(flag: str, value: str) -> None:
    e = problem(*XDS, "--xds-plaintext", flag, value)
    assert e.setting == flag and "\n" not in str(e)
    assert value[:40] in str(e)


def test_numeric_flags_in_range() -> None:
    cfg = parse(
        *XDS,
        "--xds-plaintext",
        "--xds-stale-after",
        "2.5",
        "--backlog-limit",
        "65536",
        "--capture-port",
        "15001",
        "--capture-port",
        "15006",
    )
    assert cfg.xds_stale_after_s == 2.5 and cfg.backlog_limit == 65536
    assert cfg.capture_ports == (15001, 15006)
    cfg = parse(*XDS, "--xds-plaintext")
    assert cfg.xds_stale_after_s == 60.0 and cfg.capture_ports == (15001,)
    assert cfg.backlog_limit == 4 << 20
    e = problem(
        *XDS, "--xds-plaintext", *[a for p in range(1, 66) for a in ("--capture-port", str(p))]
    )
    assert e.setting == "--capture-port" and "at most 64" in str(e)


# --- the cgroup ------------------------------------------------------------------
def test_the_workaround_is_allowed_unless_refused() -> None:
    assert parse(*XDS, "--xds-plaintext").allow_workaround is True
    assert parse(*XDS, "--xds-plaintext", "--refuse-workaround").allow_workaround is False
    # The flag of the releases that refused by default still parses, and means the default.
    assert parse(*XDS, "--xds-plaintext", "--allow-workaround").allow_workaround is True


def test_refusing_and_allowing_the_workaround_at_once_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*XDS, "--xds-plaintext", "--refuse-workaround", "--allow-workaround")
    assert e.value.code == 2
    assert "not allowed with argument --refuse-workaround" in capsys.readouterr().err


def test_cgroup_must_be_cgroup2(tmp_path: Path) -> None:
    e = problem("--cgroup", str(tmp_path), *XDS, "--xds-plaintext")
    assert e.setting == "--cgroup" and "not a cgroup v2 directory" in str(e)
    e = problem("--cgroup", str(tmp_path / "absent"), *XDS, "--xds-plaintext")
    assert e.setting == "--cgroup" and "not a directory" in str(e)
    assert parse(*XDS, "--xds-plaintext").cgroup == Path(CGROUP)


# --- xDS credentials -----------------------------------------------------------------
def test_empty_root_ca_is_an_error() -> None:
    e = problem(*XDS, env={"XDS_ROOT_CA": ""})
    assert e.setting == "XDS_ROOT_CA" and "SYSTEM" in str(e)
    e = problem(*XDS, "--xds-plaintext", env={"XDS_ROOT_CA": " "})
    assert e.setting == "XDS_ROOT_CA"


def test_token_path_typo_is_an_error_not_a_static_token(tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_text("x")
    typo = str(tmp_path / "istio-tokne")
    for plain in ([], ["--xds-plaintext"]):
        e = problem(*XDS, *plain, env={"XDS_ROOT_CA": str(root), "AUTH_TOKEN": typo})
        assert e.setting == "AUTH_TOKEN" and "not found" in str(e) and "static:" in str(e)
    cfg = parse(*XDS, env={"XDS_ROOT_CA": str(root), "AUTH_TOKEN": "static:s3cr3t"})
    assert cfg.xds is not None and cfg.xds.token == "s3cr3t" and cfg.xds.token_file is None
    e = problem(*XDS, env={"XDS_ROOT_CA": str(root), "AUTH_TOKEN": "static:"})
    assert e.setting == "AUTH_TOKEN" and "empty" in str(e)
    e = problem(*XDS, env={"XDS_ROOT_CA": str(root), "AUTH_TOKEN": "static:two words"})
    assert e.setting == "AUTH_TOKEN" and "two words" not in str(e)
    e = problem(*XDS, env={"XDS_ROOT_CA": str(root), "AUTH_TOKEN": ""})
    assert e.setting == "AUTH_TOKEN"
    # plaintext without AUTH_TOKEN: the default token is optional (local development)
    cfg = parse(*XDS, "--xds-plaintext")
    assert cfg.xds is not None and cfg.xds.token_file is None and cfg.xds.token is None


def test_empty_token_file_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_text("x")
    token = tmp_path / "istio-token"
    for content in ("", "\n  \n"):
        token.write_text(content)
        e = problem(*XDS, env={"XDS_ROOT_CA": str(root), "AUTH_TOKEN": str(token)})
        assert e.setting == "AUTH_TOKEN" and "is empty" in str(e)
    token.write_text("tok\n")
    cfg = parse(*XDS, env={"XDS_ROOT_CA": str(root), "AUTH_TOKEN": str(token)})
    assert cfg.xds is not None and cfg.xds.token_file == str(token)


def test_bad_endpoints_file_is_a_config_error(tmp_path: Path) -> None:
    eps = tmp_path / "eps.yaml"
    eps.write_bytes(b"endpoints: [\xff\xfe]")
    e = problem("--endpoints-file", str(eps))
    assert e.setting == "--endpoints-file" and "not UTF-8" in str(e)
    eps.write_text('endpoints: ["127.0.0.1"]')
    e = problem("--endpoints-file", str(eps))
    assert "loopback" in str(e)


# --- end to end: exit code 2, one line, no traceback ------------------------------------
def run_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("AUTH_TOKEN", "XDS_ROOT_CA")}
    return subprocess.run(
        [PY, "-m", "eztunnel_plugin", "run", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
        check=False,
    )


def test_cli_bad_settings_exit_2_with_one_line(tmp_path: Path) -> None:
    bad_utf8 = tmp_path / "eps.yaml"
    bad_utf8.write_bytes(b"endpoints:\n  - \xc3\x28\n")
    cases = [
        (["--xds-stale-after", "nan", *XDS, "--xds-plaintext"], {}, "--xds-stale-after"),
        (["--backlog-limit", "lots", *XDS, "--xds-plaintext"], {}, "--backlog-limit"),
        (["--capture-port", "99999", *XDS, "--xds-plaintext"], {}, "--capture-port"),
        (["--cgroup", str(tmp_path), *XDS, "--xds-plaintext"], {}, "--cgroup"),
        (["--endpoints-file", str(bad_utf8)], {}, "--endpoints-file"),
        (XDS, {"XDS_ROOT_CA": ""}, "XDS_ROOT_CA"),
        ([*XDS, "--xds-plaintext"], {"AUTH_TOKEN": str(tmp_path / "typo")}, "AUTH_TOKEN"),
    ]
    for argv, env, setting in cases:
        r = run_cli(*argv, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (argv, r.stderr)
        assert len(lines) == 1 and setting in lines[0], (argv, r.stderr)
        assert "Traceback" not in r.stderr


def test_health_listen_is_off_by_default_and_checked() -> None:
    assert parse(*XDS, "--xds-plaintext").health_listen is None
    cfg = parse(*XDS, "--xds-plaintext", "--health-listen", "10.1.2.3:15021")
    assert cfg.health_listen == config.Listen("10.1.2.3", 15021)
    # Health only: a node address needs no --*-allow-remote (it is what kubelet dials).
    assert not cfg.health_listen.loopback
    e = problem(*XDS, "--xds-plaintext", "--health-listen", "15021")
    assert str(e) == "--health-listen: expected HOST:PORT, got '15021'"
