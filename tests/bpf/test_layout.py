"""bpf/layout.py: C and Python never drift (the mirror against the object's BTF), and an
address is one key whatever its spelling, through every way in: the layout, the endpoint
map, the static endpoints file, xDS state, the API, and an agent restart."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eztunnel_lab.netlab import Lab
from eztunnel_plugin import addr, endpoints_file
from eztunnel_plugin.bpf import layout, maps, paths, syscalls
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl_pb
from eztunnel_plugin.reconciler import EZ_EP_ENROLLED, Reconciler
from eztunnel_plugin.state.workloads import WorkloadState
from eztunnel_plugin.xds.decode import decode_workload

from ..test_agent import AgentProc, log_events
from .conftest import REPO, build_object

Btf = dict[tuple[str, str], dict[str, Any]]


def read_btf(obj: Path) -> Btf:
    """(kind, name) -> BTF type: a map variable and its value struct may share a name."""
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(obj)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {(t["kind"], t["name"]): t for t in json.loads(out)["types"] if t.get("name")}


@pytest.fixture(scope="module")
def btf() -> Btf:
    return read_btf(paths.default_object())


def check_struct(btf: Btf, name: str) -> None:
    c_struct = btf["STRUCT", name]
    mirror = layout.STRUCTS[name]
    assert ctypes.sizeof(mirror) == c_struct["size"]
    c_fields = [(m["name"], m["bits_offset"] // 8) for m in c_struct["members"]]
    py_fields = [(f[0], getattr(mirror, f[0]).offset) for f in mirror._fields_]
    assert py_fields == c_fields


@pytest.mark.parametrize("name", sorted(layout.STRUCTS))
def test_struct_matches_btf(btf: Btf, name: str) -> None:
    check_struct(btf, name)


def test_arm64_object_builds_with_the_same_layout(tmp_path: Path) -> None:
    # The Makefile derives the BPF target architecture from the machine; an arm64
    # node's object must compile and share every layout with this one.
    arm64 = read_btf(build_object(tmp_path / "arm64.bpf.o", "ARCH=arm64"))
    for name in layout.STRUCTS:
        check_struct(arm64, name)
    for name, values in layout.ENUMS.items():
        assert {v["name"]: v["val"] for v in arm64["ENUM", name]["values"]} == values


@pytest.mark.parametrize("name", sorted(layout.ENUMS))
def test_enum_matches_btf(btf: Btf, name: str) -> None:
    values = {v["name"]: v["val"] for v in btf["ENUM", name]["values"]}
    assert values == layout.ENUMS[name]


def test_every_map_is_mirrored(btf: Btf) -> None:
    # .maps section variables are the maps the loader pins; each needs sizes here.
    maps = {name for kind, name in btf if kind == "VAR" and name.startswith("ez_")}
    maps.discard("ez_anchor")
    assert maps == set(layout.MAPS)


def test_resumable_splice_fields_are_in_the_object(btf: Btf) -> None:
    # Layout 4: per-direction TCP phases. Appended after layout 3's fields, so a reader of
    # the old fields finds them where they were.
    info = {m["name"]: m["bits_offset"] // 8 for m in btf["STRUCT", "ez_sock_info"]["members"]}
    for name in ("tcp_bytes", "tcp_msgs", "fallback_ns", "fallbacks", "resumes", "flags"):
        assert info[name] > info["hs_rcv_nxt"], name
    config = [m["name"] for m in btf["STRUCT", "ez_config"]["members"]]
    assert config == ["enabled", "layout_version", "backlog_limit", "flags"]
    states = {v["name"]: v["val"] for v in btf["ENUM", "ez_sock_state"]["values"]}
    assert states["EZ_TCP_PAIRED"] == int(layout.SockState.TCP_PAIRED) == 4
    counters = {v["name"]: v["val"] for v in btf["ENUM", "ez_counter"]["values"]}
    assert counters["EZ_CNT_RESUMES"] == layout.Counter.RESUMES > layout.Counter.NP_PEER_TAKEN
    assert layout.LAYOUT_VERSION == 4


def test_counter_names_are_unique_and_dense() -> None:
    assert [c.value for c in layout.Counter] == list(range(layout.COUNTER_MAX))


def test_bpf_target_arch_follows_the_machine(tmp_path: Path) -> None:
    want = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine())
    if want is None:
        pytest.skip(f"no expectation for {platform.machine()}")
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "bpf-object", f"BPF_OUT={tmp_path / 'x.o'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"-D__TARGET_ARCH_{want} " in out, out


# ---- one key per address ---------------------------------------------------------------

# canonical text -> spellings of the same address (v4, v4-mapped v6, v6)
SPELLINGS = {
    "10.0.0.1": ("10.0.0.1", "::ffff:10.0.0.1", "::FFFF:a00:1", "0:0:0:0:0:ffff:a00:1"),
    "fd00::1": ("fd00::1", "FD00:0:0::0001", "fd00:0:0:0:0:0:0:1"),
}
V4_MAPPED = b"\0" * 10 + b"\xff\xff"
ANY_IP = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
    st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(V4_MAPPED + a.packed)),
)


def test_every_spelling_is_one_key_with_one_text() -> None:
    for canonical, spellings in SPELLINGS.items():
        keys = {bytes(layout.Addr.of(text)) for text in spellings}
        assert len(keys) == 1, (canonical, keys)
        assert layout.Addr.from_buffer_copy(keys.pop()).text() == canonical
    # IPv4 is keyed v4-mapped, as the programs write it (bpf/eztunnel.h, struct ez_addr).
    assert bytes(layout.Addr.of("10.0.0.1")) == V4_MAPPED + bytes([10, 0, 0, 1])
    # IPv4-compatible (deprecated) is not v4-mapped: another address, kept as IPv6.
    assert layout.Addr.of("::10.0.0.1").text() == "::a00:1"


@settings(max_examples=300, deadline=None)
@given(ANY_IP)
def test_layout_text_is_addr_canonical(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    text = str(ip)
    key = layout.Addr.of(text)
    assert key.text() == addr.canonical(text) == addr.from_bytes(ip.packed)
    assert bytes(key) == addr.packed16(text)
    assert layout.Addr.of(key.text()).a[:] == key.a[:]


@pytest.mark.parametrize("bad", ["fe80::1%eth0", "10.0.0.256", "", "host", "::ffff:10.0.0.1/32"])
def test_what_is_not_an_address_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        layout.Addr.of(bad)


def _spelled_workload(uid: str, canonical: str) -> wl_pb.Workload:
    """A workload whose address comes in the 16-byte form (v4-mapped for IPv4)."""
    return wl_pb.Workload(
        uid=uid,
        name=uid,
        namespace="default",
        node="node-1",
        tunnel_protocol=wl_pb.HBONE,
        addresses=[addr.packed16(canonical)],
    )


def test_file_and_xds_state_give_the_layout_text() -> None:
    every = [text for spellings in SPELLINGS.values() for text in spellings]
    from_file = endpoints_file.parse(json.dumps({"endpoints": every}))
    assert from_file == frozenset(SPELLINGS)

    state = WorkloadState("node-1")
    records = {f"w{i}": decode_workload(f"w{i}", _spelled_workload(f"w{i}", c))
               for i, c in enumerate(SPELLINGS)}  # fmt: skip
    assert state.apply_addresses(records).rejected == []
    for part in state.parts:
        state.mark_synced(part)
    assert state.snapshot().endpoints == frozenset(SPELLINGS)
    # ... and v4 given as 4 bytes is the same record text as v4-mapped 16 bytes.
    four = wl_pb.Workload(uid="v4", name="v4", node="node-1", tunnel_protocol=wl_pb.HBONE,
                          addresses=[ipaddress.ip_address("10.0.0.1").packed])  # fmt: skip
    assert decode_workload("v4", four).addresses == ("10.0.0.1",)


@pytest.fixture
def endpoint_map() -> Iterator[maps.EndpointMap]:
    """An anonymous map of ez_endpoints' shape: no program, gone when its fd closes."""
    if os.geteuid() != 0:
        pytest.fail("creating a BPF map needs root")
    key, value = layout.MAPS["ez_endpoints"]
    fd = syscalls.map_create(syscalls.MAP_TYPE_HASH, layout.size_of(key), layout.size_of(value), 64)
    try:
        yield maps.EndpointMap(fd)
    finally:
        os.close(fd)


class Recording:
    """An EndpointSink in front of the map that records every write."""

    def __init__(self, inner: maps.EndpointMap) -> None:
        self.inner = inner
        self.ops: list[tuple[str, str]] = []

    def read_all(self) -> dict[str, int]:
        return self.inner.read_all()

    def put(self, ip: str, flags: int) -> None:
        self.ops.append(("put", ip))
        self.inner.put(ip, flags)

    def delete(self, ip: str) -> None:
        self.ops.append(("delete", ip))
        self.inner.delete(ip)


@pytest.mark.kernel
def test_the_endpoint_map_holds_one_key_per_address(endpoint_map: maps.EndpointMap) -> None:
    for spellings in SPELLINGS.values():
        for flags, text in enumerate(spellings, start=1):
            endpoint_map.put(text, flags)
    # The last write of each address won, under its canonical text: one key each.
    assert endpoint_map.read_all() == {c: len(s) for c, s in SPELLINGS.items()}
    endpoint_map.delete("::FFFF:a00:1")
    endpoint_map.delete("FD00::1")
    assert endpoint_map.read_all() == {}


@pytest.mark.kernel
def test_a_restart_over_the_same_file_writes_nothing(
    endpoint_map: maps.EndpointMap, tmp_path: Path
) -> None:
    # What a previous agent left in the pinned map, from a file that spells its addresses
    # otherwise: the new agent's first (converging) write must find nothing to change.
    for canonical in SPELLINGS:
        endpoint_map.put(canonical, EZ_EP_ENROLLED)
    eps = tmp_path / "endpoints.yaml"
    eps.write_text(json.dumps({"endpoints": ["::ffff:10.0.0.1", "FD00:0:0::0001"]}))
    sink = Recording(endpoint_map)
    assert Reconciler(endpoints_file.StaticEndpoints(eps), sink).reconcile()
    assert sink.ops == []
    assert endpoint_map.read_all() == dict.fromkeys(SPELLINGS, EZ_EP_ENROLLED)
    # The control: a file that really changed is written, by difference only.
    eps.write_text(json.dumps({"endpoints": ["::ffff:10.0.0.1", "::ffff:10.0.0.2"]}))
    source = endpoints_file.StaticEndpoints(eps)
    assert Reconciler(source, sink).reconcile()
    assert sink.ops == [("delete", "fd00::1"), ("put", "10.0.0.2")]


@pytest.mark.kernel
def test_the_api_and_a_restarted_agent_agree_on_every_spelling(lab: Lab, tmp_path: Path) -> None:
    pod = lab.add_pod()
    want = sorted([pod.ip4, addr.canonical(pod.ip6)])
    eps = tmp_path / "endpoints.yaml"
    eps.write_text(json.dumps({"endpoints": [f"::ffff:{pod.ip4}", pod.ip6.upper()]}))
    agent = AgentProc(lab, "--endpoints-file", str(eps))
    try:
        for start in ("first", "restart"):
            agent.wait_serving()
            listed = agent.cli_json("endpoints")  # ListEndpoints
            assert [(e["ip"], e["in_map"]) for e in listed["endpoints"]] == [
                (ip, True) for ip in want
            ], listed
            assert listed.get("unexpected_in_map", []) == []
            (applied, *_) = log_events(agent.terminate(), "reconcile.applied")
            assert applied["converged"] is True
            # The first start writes both; the restart finds them in the pinned map as is.
            wrote = (applied["written"], applied["removed"])
            assert wrote == ((2, 0) if start == "first" else (0, 0)), applied
            with maps.Dataplane.open(lab.bpffs) as dp:
                assert sorted(dp.endpoints.read_all()) == want
            if start == "first":
                agent.start()
    finally:
        agent.stop()
