"""WorkloadState: the node-local endpoint rule, duplicate addresses, snapshots; fuzzed.

Records only: the state knows nothing of xDS (the last tests prove it of the package)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from eztunnel_plugin import addr
from eztunnel_plugin.reconciler import MemorySink, Reconciler
from eztunnel_plugin.state import workloads as state_module
from eztunnel_plugin.state.workloads import (
    ADDRESSES,
    AUTHORIZATIONS,
    WorkloadRecord,
    WorkloadState,
    endpoints_of,
)
from tests.state.testlib import NODE, by_uid, complete_state, policy, service, workload


def test_endpoint_rule_node_hbone_not_native_not_host_network() -> None:
    s = complete_state(
        workload("c//Pod/default/in", "10.0.0.1", "fd00::1"),
        workload("c//Pod/default/other-node", "10.0.0.2", node="node-2"),
        workload("c//Pod/default/plain", "10.0.0.3", hbone=False),
        workload("c//Pod/default/sidecar", "10.0.0.4", native_tunnel=True),
        workload("c//Pod/default/hostnet", "10.0.0.5", host_network=True),
    )
    assert s.snapshot().endpoints == {"10.0.0.1", "fd00::1"}
    assert s.snapshot().complete
    assert len(s.workloads) == 5


def test_a_name_changes_kind() -> None:
    """One name space for workloads and services: a name that turns from a workload into
    a service (or back) leaves nothing of its old kind behind, endpoints included."""
    s = complete_state(workload("x", "10.0.0.1"))
    r = s.apply_addresses({"x": service("ns", "x.ns.svc", "10.96.0.1")})
    assert r.updated == 1 and not r.rejected
    assert "x" not in s.workloads and s.services["x"].addresses == ("10.96.0.1",)
    assert s.snapshot().endpoints == frozenset()
    s.apply_addresses({"x": workload("x", "10.0.0.2")})
    assert "x" not in s.services and s.snapshot().endpoints == {"10.0.0.2"}
    s.apply_addresses({"y": workload("y", "10.0.0.1")})  # the first address was freed
    assert set(s.workloads) == {"x", "y"}


def test_rejected_update_keeps_previous_record_and_version() -> None:
    s = complete_state(workload("u/a", "10.0.0.1"), workload("u/b", "10.0.0.2"))
    before = s.workloads["u/b"]
    v = s.version
    r = s.apply_addresses({"u/b": workload("u/b", "10.0.0.1")})
    assert r.rejected == [("u/b", "duplicate address 10.0.0.1: already held by u/a")]
    assert s.workloads["u/b"] is before and s.version == v  # nothing changed, no new version
    assert not r.changed


def test_duplicate_ips_across_workloads() -> None:
    s = complete_state(workload("u/a", "10.0.0.1"))
    r = s.apply_addresses(by_uid(workload("u/b", "10.0.0.1"), workload("u/c", "10.0.0.2")))
    assert dict(r.rejected) == {"u/b": "duplicate address 10.0.0.1: already held by u/a"}
    assert set(s.workloads) == {"u/a", "u/c"}
    # the same IP in another network is a different address
    r = s.apply_addresses(by_uid(workload("u/d", "10.0.0.1", network="net2")))
    assert not r.rejected
    # a move within one batch: a drops the IP, b takes it
    r = s.apply_addresses(by_uid(workload("u/b", "10.0.0.1"), workload("u/a", "10.0.0.9")))
    assert not r.rejected
    assert s.workloads["u/b"].addresses == ("10.0.0.1",)
    # removal and reuse in one batch
    r = s.apply_addresses(by_uid(workload("u/e", "10.0.0.9")), removals=["u/a"])
    assert not r.rejected and "u/a" not in s.workloads
    # host-network workloads share the node IP legitimately
    r = s.apply_addresses(
        by_uid(
            workload("u/h1", "192.168.0.1", host_network=True),
            workload("u/h2", "192.168.0.1", host_network=True),
        )
    )
    assert not r.rejected


def test_duplicate_cascade_restores_old_addresses() -> None:
    # a's update is rejected (it takes c's IP), so a keeps 10.0.0.1, so b can't have it.
    s = complete_state(workload("u/a", "10.0.0.1"), workload("u/c", "10.0.0.3"))
    r = s.apply_addresses(by_uid(workload("u/a", "10.0.0.3"), workload("u/b", "10.0.0.1")))
    assert set(dict(r.rejected)) == {"u/a", "u/b"}
    assert s.workloads["u/a"].addresses == ("10.0.0.1",)
    assert "u/b" not in s.workloads


def test_removals_and_unknown_names() -> None:
    s = complete_state(workload("u/a", "10.0.0.1"), workload("u/b", "10.0.0.2"))
    r = s.apply_addresses({}, removals=["u/a", "never/existed"])
    assert r.removed == 1 and set(s.workloads) == {"u/b"}
    assert s.snapshot().endpoints == {"10.0.0.2"}
    # a name both updated and removed in one batch ends up present
    r = s.apply_addresses(by_uid(workload("u/b", "10.0.0.5")), removals=["u/b"])
    assert r.removed == 0 and s.workloads["u/b"].addresses == ("10.0.0.5",)


def test_authorizations() -> None:
    s = WorkloadState(NODE)
    r = s.apply_authorizations({"ns/p": policy("ns", "p"), "ns/q": policy("ns", "q")})
    assert r.updated == 2 and set(s.authorizations) == {"ns/p", "ns/q"} and s.version == 1
    r = s.apply_authorizations({}, removals=["ns/p", "ns/none"])
    assert r.removed == 1 and set(s.authorizations) == {"ns/q"} and s.version == 2
    r = s.apply_authorizations({}, removals=["ns/none"])
    assert not r.changed and s.version == 2  # nothing happened: no version


def test_snapshot_versions_and_completeness() -> None:
    s = WorkloadState(NODE)
    seen: list[int] = []
    s.subscribe(seen.append)
    s.apply_addresses(by_uid(workload("u/a", "10.0.0.1")))
    snap1 = s.snapshot()
    assert not snap1.complete and snap1.endpoints == {"10.0.0.1"}
    assert s.snapshot() is snap1  # cached until the version moves
    s.mark_synced(ADDRESSES)
    assert not s.complete
    s.mark_synced(ADDRESSES)  # again: not news
    s.mark_synced(AUTHORIZATIONS)
    assert s.complete and s.snapshot().complete
    s.apply_addresses({}, removals=["u/a"])
    assert snap1.endpoints == {"10.0.0.1"}  # old snapshots are immutable
    assert s.snapshot().endpoints == frozenset()
    assert seen == [1, 2, 3] and s.snapshot().version == 3
    s.apply_addresses(by_uid(workload("u/x", "10.0.0.1"), workload("u/y", "10.0.0.1")))
    assert s.version == 4  # x landed, y was refused: one version for the batch


def test_parts_are_configurable() -> None:
    s = WorkloadState(NODE, parts=(ADDRESSES,))
    s.apply_addresses(by_uid(workload("u/a", "10.0.0.1")))
    s.mark_synced(ADDRESSES)
    assert s.complete and s.snapshot().complete


# --- fuzzing -----------------------------------------------------------------------
UIDS = [f"c//Pod/ns/p{i}" for i in range(6)]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "127.0.0.1"]


@st.composite
def record(draw: st.DrawFn) -> WorkloadRecord:
    return workload(
        draw(st.sampled_from(UIDS)),
        *draw(st.lists(st.sampled_from(IPS), max_size=2, unique=True)),
        node=draw(st.sampled_from([NODE, "node-2"])),
        hbone=draw(st.sampled_from([False, True, True])),
        native_tunnel=draw(st.booleans()),
        host_network=draw(st.sampled_from([False, False, True])),
        network=draw(st.sampled_from(["", "", "net2"])),
    )


batches = st.lists(
    st.tuples(
        st.dictionaries(st.sampled_from(UIDS), record(), max_size=5),
        st.lists(st.sampled_from(UIDS), max_size=2),
    ),
    min_size=1,
    max_size=6,
)


class CheckingSink(MemorySink):
    """Asserts, at every write, that the map holds nothing outside the snapshot being applied."""

    allowed: frozenset[str] = frozenset()

    def put(self, ip: str, flags: int) -> None:
        assert ip in self.allowed, f"enrolled {ip}, not in the snapshot being applied"
        super().put(ip, flags)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batches, preexisting=st.sets(st.sampled_from(["10.9.9.9", *IPS])))
def test_fuzz_state_and_sink(
    batches: list[tuple[dict[str, WorkloadRecord], list[str]]], preexisting: set[str]
) -> None:
    s = WorkloadState(NODE)
    sink = CheckingSink(dict.fromkeys(preexisting, 1))
    rec = Reconciler(s, sink)
    for i, (drawn, removed) in enumerate(batches):
        updates = {w.uid: w for w in drawn.values()}  # keyed by their own uid
        before = dict(s.workloads)
        result = s.apply_addresses(updates, removed)
        if i == 0:
            s.mark_synced(ADDRESSES)
            s.mark_synced(AUTHORIZATIONS)
        rejected = dict(result.rejected)
        assert all(r.startswith("duplicate address ") for r in rejected.values())
        for name, w in updates.items():  # accepted replaces, rejected keeps the previous
            assert s.workloads.get(name) == (before.get(name) if name in rejected else w)
        for name in set(removed) - updates.keys():
            assert name not in s.workloads
        # no two (non host-network) workloads share an address
        owners: dict[tuple[str, str], str] = {}
        for w in s.workloads.values():
            if not w.host_network:
                for ip in w.addresses:
                    assert (w.network, ip) not in owners, (ip, w.uid, owners)
                    owners[(w.network, ip)] = w.uid
        # the incremental index equals a brute-force recomputation
        snap = s.snapshot()
        assert snap.endpoints == endpoints_of(s.workloads, NODE)
        assert "127.0.0.1" not in snap.endpoints
        sink.allowed = snap.endpoints
        rec.reconcile()
        assert sink.entries == dict.fromkeys(snap.endpoints, 1)


# --- addresses that are never enrolled ----------------------------------------------
REFUSED = {
    "127.0.0.1": "loopback",
    "::1": "loopback",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "169.254.169.254": "link-local",
    "fe80::1": "link-local",
    "255.255.255.255": "broadcast",
    "0.1.2.3": "reserved",
    "240.0.0.1": "reserved",
    "::ffff:127.0.0.2": "loopback",
}


def test_non_unicast_addresses_are_never_enrolled() -> None:
    with capture_logs() as logs:
        s = complete_state(
            *(workload(f"u/bad{i}", ip, "10.0.1.1" if i == 0 else f"fd00::{i:x}")
              for i, ip in enumerate(REFUSED))
        )  # fmt: skip
    # the rest of each workload applies: its good address is enrolled
    assert s.snapshot().endpoints == {"10.0.1.1", *(f"fd00::{i:x}" for i in range(1, len(REFUSED)))}
    assert set(s.workloads) == {f"u/bad{i}" for i in range(len(REFUSED))}
    assert endpoints_of(s.workloads, NODE) == s.snapshot().endpoints
    assert s.refused_total == len(REFUSED)
    got = {e["ip"]: e["reason"] for e in logs if e["event"] == "xds.address_refused"}
    assert got == {addr.canonical(ip): why for ip, why in REFUSED.items()}
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "xds.address_refused")
    # a re-push of the same workloads logs and counts nothing new
    with capture_logs() as logs:
        s.apply_addresses(by_uid(workload("u/bad0", "127.0.0.1", "10.0.1.1", namespace="again")))
    assert s.workloads["u/bad0"].namespace == "again"
    assert s.refused_total == len(REFUSED)
    assert not [e for e in logs if e["event"] == "xds.address_refused"]
    # other nodes' and out-of-mesh workloads are not this node's business
    s.apply_addresses(by_uid(workload("u/far", "127.0.0.2", node="node-2")))
    assert s.refused_total == len(REFUSED)
    # the address leaves the workload and comes back: that is news again
    s.apply_addresses(by_uid(workload("u/bad0", "10.0.1.1")))
    assert "u/bad0" not in s.refused
    s.apply_addresses(by_uid(workload("u/bad0", "10.0.1.1", "127.0.0.1")))
    assert s.refused_total == len(REFUSED) + 1
    s.apply_addresses({}, removals=["u/bad0"])
    assert "u/bad0" not in s.refused


def test_refused_addresses_never_reach_the_sink() -> None:
    s = complete_state(
        workload("u/lo", "127.0.0.1", "10.0.0.1"), workload("u/md", "169.254.169.254")
    )
    sink = MemorySink()
    Reconciler(s, sink).reconcile()
    assert sink.entries == {"10.0.0.1": 1}


# --- the duplicate-address check is linear ----------------------------------------
CHAIN = 20_000


def chain_ip(i: int) -> str:
    return addr.from_bytes((0x0A000000 + i).to_bytes(4))


@pytest.mark.timeout(60)  # the old fixpoint took minutes here (one rejection per pass)
def test_chain_of_moves_cascades_in_one_batch() -> None:
    """w_i moves onto w_{i+1}'s address, the last one onto an address held by someone
    who stays. The last is rejected, so w_{n-2} can't have its address, and so on."""
    anchor = "10.200.0.1"
    s = complete_state(
        workload("u/anchor", anchor), *(workload(f"u/w{i}", chain_ip(i)) for i in range(CHAIN))
    )
    before = dict(s.workloads)
    moves = by_uid(*(workload(f"u/w{i}", chain_ip(i + 1)) for i in range(CHAIN - 1)))
    moves[f"u/w{CHAIN - 1}"] = workload(f"u/w{CHAIN - 1}", anchor)
    r = s.apply_addresses(moves)
    got = dict(r.rejected)
    assert len(got) == CHAIN
    assert got[f"u/w{CHAIN - 1}"] == "duplicate address 10.200.0.1: already held by u/anchor"
    assert got["u/w0"] == "duplicate address 10.0.0.1: already held by u/w1"
    assert s.workloads == before and not r.changed and len(s.snapshot().endpoints) == CHAIN + 1


def test_chain_of_moves_onto_a_free_address_is_accepted() -> None:
    s = complete_state(*(workload(f"u/w{i}", chain_ip(i)) for i in range(100)))
    moves = by_uid(*(workload(f"u/w{i}", chain_ip(i + 1)) for i in range(99)))
    moves["u/w99"] = workload("u/w99", "10.201.0.1")
    r = s.apply_addresses(moves)
    assert not r.rejected and r.updated == 100
    assert s.workloads["u/w0"].addresses == ("10.0.0.1",)
    assert s.workloads["u/w99"].addresses == ("10.201.0.1",)
    assert len(s.snapshot().endpoints) == 100


# --- the state knows nothing of xDS -------------------------------------------------
STATE_DIR = Path(state_module.__file__).parent
FORBIDDEN_IMPORTS = ("eztunnel_plugin.xds", "eztunnel_plugin.pb", "google.protobuf", "grpc")
FORBIDDEN_NAMES = ("Any", "type_url", "type.googleapis.com")


def imported(node: ast.AST) -> list[str]:
    """The absolute module names an import statement names (none for other nodes)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: state/ is eztunnel_plugin.state
        package = ["eztunnel_plugin", "state"][: 3 - node.level]
        base = ".".join([*package, base]).strip(".")
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def xds_leaks(source: str) -> list[str]:
    """What in source ties it to xDS: imports of xds/, pb/, protobuf or gRPC (at any
    depth, TYPE_CHECKING included), typing.Any, type URLs."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        for n in imported(node):
            if any(n == f or n.startswith(f"{f}.") for f in FORBIDDEN_IMPORTS):
                found.append(f"line {line}: import {n}")
        name = None
        if isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.alias):
            name = node.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = next((f for f in FORBIDDEN_NAMES[1:] if f in node.value), None)
        if name in FORBIDDEN_NAMES:
            found.append(f"line {line}: {name}")
    return found


def test_state_imports_nothing_of_xds() -> None:
    files = sorted(STATE_DIR.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "workloads.py", "snapshot.py"}
    leaks = {p.name: xds_leaks(p.read_text()) for p in files}
    assert not {k: v for k, v in leaks.items() if v}


@pytest.mark.parametrize(
    "source",
    [
        "from eztunnel_plugin.xds.types import ADDRESS_TYPE",
        "import eztunnel_plugin.pb.istio.workload.workload_pb2",
        "from ..xds import decode",
        "from eztunnel_plugin import xds",
        "if TYPE_CHECKING:\n    from google.protobuf.message import Message",
        "def f():\n    import grpc",
        "from typing import Any",
        "import typing\nx: typing.Any = 1",
        "U = 'type.googleapis.com/istio.workload.Address'",
    ],
)
def test_the_leak_check_catches(source: str) -> None:
    assert xds_leaks(source), source
