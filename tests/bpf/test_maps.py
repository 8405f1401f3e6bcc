"""bpf/maps.py: each map class on an anonymous map of its pinned map's shape (no program),
the kill switch across generations, and the handle's refusal of pins it cannot use."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

import pytest

from eztunnel_lab.netlab import Lab
from eztunnel_plugin.bpf import layout, maps, syscalls
from eztunnel_plugin.bpf.maps import Dataplane
from eztunnel_plugin.errors import DataplaneError

pytestmark = pytest.mark.kernel  # creating BPF maps needs root

MakeMap = Callable[..., int]
# The array maps; every other map is made a hash map of its key and value sizes.
_TYPES = {"ez_config": syscalls.MAP_TYPE_ARRAY, "ez_counters": syscalls.MAP_TYPE_PERCPU_ARRAY}
_ENTRIES = {"ez_config": 1, "ez_counters": layout.COUNTER_MAX, "ez_ports": 64}


@pytest.fixture
def make_map() -> Iterator[MakeMap]:
    """make_map(name, entries=...): an anonymous map shaped like pinned map `name`."""
    if os.geteuid() != 0:
        pytest.fail("creating BPF maps needs root")
    fds: list[int] = []

    def make(name: str, entries: int | None = None, value_size: int | None = None) -> int:
        key, value = layout.MAPS[name]
        fd = syscalls.map_create(
            _TYPES.get(name, syscalls.MAP_TYPE_HASH),
            layout.size_of(key),
            value_size or layout.size_of(value),
            entries or _ENTRIES.get(name, 16),
        )
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


def _sock(cookie_peer: int, active: int, rule: layout.Rule, **kw: object) -> layout.SockInfo:
    return layout.SockInfo(peer_cookie=cookie_peer, active=active, rule=rule, **kw)


# ---- endpoints ---------------------------------------------------------------------------


def test_endpoints_put_read_delete(make_map: MakeMap) -> None:
    ep = maps.EndpointMap(make_map("ez_endpoints"))
    ep.put("10.0.0.1", layout.EP_ENROLLED)
    ep.put("fd00::1", layout.EP_ENROLLED | 0b10)
    assert ep.read_all() == {"10.0.0.1": 1, "fd00::1": 3}
    ep.delete("10.0.0.1")
    ep.delete("10.0.0.9")  # absent: not an error
    assert ep.read_all() == {"fd00::1": 3}


def test_a_full_endpoint_map_is_a_clear_error(make_map: MakeMap) -> None:
    ep = maps.EndpointMap(make_map("ez_endpoints", entries=2))
    ep.put("10.0.0.1", 1)
    ep.put("10.0.0.2", 1)
    ep.put("10.0.0.2", 1)  # an update of a present key still fits
    with pytest.raises(DataplaneError, match=r"endpoint map is full .*; 10\.0\.0\.3 not added"):
        ep.put("10.0.0.3", 1)
    assert ep.read_all() == {"10.0.0.1": 1, "10.0.0.2": 1}


# ---- config ------------------------------------------------------------------------------


def test_config_reset_and_settings(make_map: MakeMap) -> None:
    cfg = maps.ConfigMap(make_map("ez_config"))
    cfg.reset(enabled=True)
    got = cfg.read()
    assert (got.enabled, got.layout_version, got.backlog_limit) == (
        1, layout.LAYOUT_VERSION, layout.DEFAULT_BACKLOG_LIMIT,
    )  # fmt: skip
    assert cfg.enabled and cfg.layout_version == layout.LAYOUT_VERSION
    cfg.set_enabled(False)  # no bpffs: no previous generations to reach
    assert not cfg.enabled
    cfg.set_backlog_limit(64 * 1024)
    assert cfg.read().backlog_limit == 64 * 1024
    for bad in (0, -1, 1 << 32):
        with pytest.raises(DataplaneError, match=f"backlog limit {bad} out of range"):
            cfg.set_backlog_limit(bad)
    assert cfg.read().backlog_limit == 64 * 1024 and not cfg.enabled


def test_the_kill_switch_reaches_previous_generations(make_map: MakeMap, lab: Lab) -> None:
    # A previous layout's config may be longer: only its first field changes.
    top, old_fd = make_map("ez_config"), make_map("ez_config", value_size=24)
    old_value = struct.pack("=II", 1, layout.LAYOUT_VERSION - 1) + bytes(range(16))
    syscalls.map_update(old_fd, bytes(4), old_value)
    gen = lab.bpffs / f"old-v{layout.LAYOUT_VERSION - 1}-m1"
    gen.mkdir(parents=True)
    syscalls.obj_pin(old_fd, gen / "ez_config")
    (lab.bpffs / "old-v1-m0").mkdir()  # a generation whose config is gone already

    cfg = maps.ConfigMap(top, lab.bpffs)
    cfg.reset(enabled=True)
    cfg.set_enabled(False)
    assert not cfg.enabled
    enabled, version, raw = maps.config_head(gen / "ez_config")
    assert (enabled, version) == (0, layout.LAYOUT_VERSION - 1)
    assert raw[8:] == old_value[8:], "the rest of the old config is kept"
    cfg.set_enabled(True)
    assert maps.config_head(gen / "ez_config")[0] == 1


def test_config_head_refuses_what_is_no_config(make_map: MakeMap, lab: Lab) -> None:
    lab.bpffs.mkdir()
    syscalls.obj_pin(make_map("ez_endpoints"), lab.bpffs / "ez_config")
    with pytest.raises(DataplaneError, match="is not an eztunnel config map"):
        maps.config_head(lab.bpffs / "ez_config")
    with pytest.raises(FileNotFoundError):
        maps.write_enabled(lab.bpffs / "missing", False)


# ---- capture ports -----------------------------------------------------------------------


def test_capture_ports_are_set_exactly(make_map: MakeMap) -> None:
    ports = maps.CapturePortMap(make_map("ez_ports"))
    ports.set((15006, 15001))
    assert ports.read() == [15001, 15006]
    ports.set((15006,))
    assert ports.read() == [15006]
    too_many = tuple(range(1, layout.MAX_CAPTURE_PORTS + 2))
    for bad in ((0,), (65536,), (15001, -1), too_many):
        with pytest.raises(DataplaneError, match="invalid capture ports"):
            ports.set(bad)
    assert ports.read() == [15006], "a refused set changes nothing"


# ---- counters ----------------------------------------------------------------------------


def test_counters_sum_over_every_cpu(make_map: MakeMap) -> None:
    fd = make_map("ez_counters")
    cpus = syscalls.possible_cpus()
    per_cpu = b"".join(struct.pack("=Q", cpu + 1) for cpu in range(cpus))
    syscalls.map_update(fd, struct.pack("=I", layout.Counter.PAIRS), per_cpu)
    big = struct.pack("=Q", 1 << 40) * cpus
    syscalls.map_update(fd, struct.pack("=I", layout.Counter.BYTES_REDIRECTED), big)
    got = maps.CounterMap(fd).read()
    assert set(got) == {c.name.lower() for c in layout.Counter}
    assert got["pairs"] == cpus * (cpus + 1) // 2
    assert got["bytes_redirected"] == cpus << 40
    assert sum(got.values()) == got["pairs"] + got["bytes_redirected"]


# ---- sockets and flows -------------------------------------------------------------------


def test_flows_are_pairs_whose_entries_point_at_each_other(make_map: MakeMap) -> None:
    fd = make_map("ez_sockinfo", entries=64)
    paired, tainted = layout.SockState.PAIRED, layout.SockState.TAINTED
    v4 = {"local": layout.Addr.of("10.1.0.1"), "remote": layout.Addr.of("::ffff:10.1.0.2")}
    v6 = {"local": layout.Addr.of("fd00::1"), "remote": layout.Addr.of("FD00::2")}
    table = {
        # a pair across two netns, v4 (the remote written v4-mapped: the same text)
        1: _sock(2, 1, layout.Rule.CROSS_MIRROR, state=paired, netns=11, bytes_out=100,
                 local_port=40000, remote_port=9000, **v4),
        2: _sock(1, 0, layout.Rule.CROSS_MIRROR, state=tainted, netns=12, bytes_out=7),
        # a v6 pair inside one netns
        3: _sock(4, 1, layout.Rule.NETNS_MIRROR, state=paired, netns=13, local_port=1,
                 remote_port=2, **v6),
        4: _sock(3, 0, layout.Rule.NETNS_MIRROR, state=paired, netns=13),
        5: _sock(6, 1, layout.Rule.CAPTURE, state=paired),  # peer entry gone
        7: _sock(8, 1, layout.Rule.CAPTURE, state=paired),  # peer points elsewhere
        8: _sock(9, 0, layout.Rule.CAPTURE, state=paired),
        10: _sock(11, 1, layout.Rule.NONE),  # never paired
        11: _sock(10, 0, layout.Rule.NONE),
    }  # fmt: skip
    for cookie, info in table.items():
        syscalls.map_update(fd, struct.pack("=Q", cookie), bytes(info))
    sockinfo = maps.SockInfoMap(fd)
    assert set(sockinfo.sockets()) == set(table)
    flows = sorted(sockinfo.flows(), key=lambda f: f.active_cookie)
    assert flows == [
        maps.Flow(1, 2, layout.Rule.CROSS_MIRROR, "10.1.0.1:40000", "10.1.0.2:9000", 11, 12,
                  100, 7, paired, tainted),
        maps.Flow(3, 4, layout.Rule.NETNS_MIRROR, "[fd00::1]:1", "[fd00::2]:2", 13, 13,
                  0, 0, paired, paired),
    ]  # fmt: skip
    assert list(maps.pairs(table)) == flows  # the same from any table, e.g. one API page


# ---- the handle --------------------------------------------------------------------------


def test_opening_nothing_pinned_is_a_clear_error(lab: Lab) -> None:
    with pytest.raises(DataplaneError, match=f"no eztunnel data plane is pinned under {lab.bpffs}"):
        Dataplane.open(lab.bpffs)


def test_a_map_of_another_size_is_named(make_map: MakeMap) -> None:
    fds = {name: make_map(name) for name in layout.MAPS}
    assert maps.sizes_problem(fds) == ""
    want = layout.size_of(layout.SockInfo)
    fds["ez_sockinfo"] = make_map("ez_sockinfo", value_size=want - 8)
    assert maps.sizes_problem(fds) == (
        f"ez_sockinfo has key/value sizes 8/{want - 8}, this build needs 8/{want}"
    )


def test_layout_mismatch_is_a_clear_error(lab: Lab, dp: Dataplane) -> None:
    cfg = dp.config.read()
    cfg.layout_version = layout.LAYOUT_VERSION + 1
    syscalls.map_update(dp.maps["ez_config"], bytes(4), bytes(cfg))
    with pytest.raises(
        DataplaneError, match=rf"layout version {layout.LAYOUT_VERSION + 1}.*uninstall"
    ):
        # Opening (CLI, API) refuses; the agent's start migrates (tests/bpf/test_loader.py).
        Dataplane.open(lab.bpffs)


def test_the_handle_closes_every_fd(dp: Dataplane, lab: Lab) -> None:
    opened = Dataplane.open(lab.bpffs)
    fds = list(opened.maps.values())
    assert [syscalls.fd_kind(fd) for fd in fds] == ["bpf-map"] * len(layout.MAPS)
    with opened:
        assert opened.endpoints.read_all() == dp.endpoints.read_all()
    assert opened.maps == {} and all(syscalls.fd_kind(fd) != "bpf-map" for fd in fds)
