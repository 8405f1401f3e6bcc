"""WorkloadState: validation, keying, the node-local endpoint rule, snapshots; fuzzed."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import any_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from eztunnel_lab.fake_istiod import make_resource
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2 as dpb
from eztunnel_plugin.pb.istio.security import authorization_pb2 as az
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl
from eztunnel_plugin.reconciler import MemorySink, Reconciler
from eztunnel_plugin.state.workloads import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    MAX_KEY_LEN,
    WorkloadState,
    canonical_ip,
    endpoints_of,
    ip_from_bytes,
)
from tests.xds_testlib import NODE, authz_res, bad_addr_res, packed, raw_res, wl_res, workload


def state(*res: Any) -> WorkloadState:
    s = WorkloadState(NODE)
    s.apply(ADDRESS_TYPE, res)
    s.mark_synced(ADDRESS_TYPE)
    s.mark_synced(AUTHORIZATION_TYPE)
    return s


def reasons(result: Any) -> dict[str, str]:
    return dict(result.rejected)


def test_endpoint_rule_node_hbone_not_native_not_host_network() -> None:
    s = state(
        wl_res("c//Pod/default/in", "10.0.0.1", "fd00::1"),
        wl_res("c//Pod/default/other-node", "10.0.0.2", node="node-2"),
        wl_res("c//Pod/default/plain", "10.0.0.3", tunnel=wl.NONE),
        wl_res("c//Pod/default/sidecar", "10.0.0.4", native_tunnel=True),
        wl_res("c//Pod/default/hostnet", "10.0.0.5", network_mode=wl.HOST_NETWORK),
        wl_res("c//Pod/default/unhealthy", "10.0.0.6", status=wl.UNHEALTHY),
    )
    assert s.snapshot().endpoints == {"10.0.0.1", "fd00::1", "10.0.0.6"}
    assert s.snapshot().complete
    assert len(s.workloads) == 6


def test_keys_are_istiod_names() -> None:
    svc = wl.Service(name="web", namespace="default", hostname="web.default.svc.cluster.local")
    svc.addresses.add(address=packed("10.96.0.1"))
    s = WorkloadState(NODE)
    r = s.apply(
        ADDRESS_TYPE,
        [
            wl_res("Kubernetes//Pod/default/web-0", "10.0.0.1"),
            make_resource(
                "default/web.default.svc.cluster.local", ADDRESS_TYPE, wl.Address(service=svc)
            ),
        ],
    )
    assert not r.rejected
    assert set(s.workloads) == {"Kubernetes//Pod/default/web-0"}
    assert set(s.services) == {"default/web.default.svc.cluster.local"}
    assert s.services["default/web.default.svc.cluster.local"].addresses == ("10.96.0.1",)
    # istiod synthesizes names longer than any Kubernetes object name
    waypoint_policy = "istio_allow_waypoint_" + "n" * 63 + "_" + "w" * 253
    r = s.apply(
        AUTHORIZATION_TYPE,
        [authz_res("istio-system", "strict", scope=az.GLOBAL), authz_res("ns", waypoint_policy)],
    )
    assert not r.rejected
    assert set(s.authorizations) == {"istio-system/strict", f"ns/{waypoint_policy}"}
    # wrong names are rejected, not re-keyed
    r = s.apply(ADDRESS_TYPE, [make_resource("x", ADDRESS_TYPE, wl.Address(service=svc))])
    assert "resource name does not match service" in reasons(r)["x"]
    r = s.apply(
        AUTHORIZATION_TYPE,
        [make_resource("a/b", AUTHORIZATION_TYPE, az.Authorization(name="c", namespace="a"))],
    )
    assert "does not match authorization" in reasons(r)["a/b"]


def test_malformed_resources_rejected_with_reasons() -> None:
    long = "n" * 300
    bad = [
        bad_addr_res("u/bad-len", b"\x01\x02\x03\x04\x05"),
        wl_res("u/legacy", "10.0.0.2", tunnel=wl.LEGACY_ISTIO_MTLS),
        wl_res("u/enum", "10.0.0.3", tunnel=9),
        wl_res("u/status", "10.0.0.4", status=7),
        wl_res("u/mode", "10.0.0.5", network_mode=3),
        wl_res("u/long", "10.0.0.6", namespace=long),
        wl_res("u/dup-in", "10.0.0.7", "10.0.0.7"),
        wl_res("u/v4mapped-dup", "10.0.0.8", "::ffff:10.0.0.8"),
        raw_res("u/garbage", b"\xff\xff\xff"),
        raw_res("u/wrongtype", b"", type_url=AUTHORIZATION_TYPE),
        raw_res("u/empty", b""),
        make_resource(
            "u/mismatch", ADDRESS_TYPE, wl.Address(workload=workload("u/other", "10.0.0.9"))
        ),
        make_resource("u/" + "x" * MAX_KEY_LEN, ADDRESS_TYPE, wl.Address()),
    ]
    s = WorkloadState(NODE)
    r = s.apply(ADDRESS_TYPE, [*bad, wl_res("u/good", "10.0.0.1")])
    got = reasons(r)
    assert set(s.workloads) == {"u/good"}
    assert len(got) == len(bad)
    assert got["u/bad-len"] == "address 0: address has 5 bytes, want 4 or 16"
    assert got["u/legacy"] == "unsupported tunnel protocol: LEGACY_ISTIO_MTLS"
    assert got["u/enum"] == "unsupported tunnel protocol: 9"
    assert got["u/status"] == "unknown status value 7"
    assert got["u/mode"] == "unknown network_mode value 3"
    assert got["u/long"] == "namespace is 300 characters, limit 253"
    assert got["u/dup-in"] == "duplicate address within the workload"
    assert got["u/v4mapped-dup"] == "duplicate address within the workload"
    assert got["u/garbage"].startswith("cannot decode")
    assert "is not type.googleapis.com/istio.workload.Address" in got["u/wrongtype"]
    assert got["u/empty"] == "address is neither a workload nor a service"
    assert "does not match workload uid" in got["u/mismatch"]
    assert any("resource name is" in v for v in got.values())


def test_nested_enum_and_gateway_validation() -> None:
    w = workload("u/wp", "10.0.0.1")
    w.waypoint.address.address = b"\x01\x02"
    s = WorkloadState(NODE)
    r = s.apply(ADDRESS_TYPE, [make_resource("u/wp", ADDRESS_TYPE, wl.Address(workload=w))])
    assert reasons(r)["u/wp"] == "waypoint: address has 2 bytes, want 4 or 16"
    svc = wl.Service(name="s", namespace="ns", hostname="s.ns.svc")
    svc.load_balancing.mode = 42  # type: ignore[assignment]
    r = s.apply(ADDRESS_TYPE, [make_resource("ns/s.ns.svc", ADDRESS_TYPE, wl.Address(service=svc))])
    assert reasons(r)["ns/s.ns.svc"] == "unknown load_balancing.mode value 42"
    a = az.Authorization(name="p", namespace="ns", action=5)  # type: ignore[arg-type]
    r = s.apply(AUTHORIZATION_TYPE, [make_resource("ns/p", AUTHORIZATION_TYPE, a)])
    assert reasons(r)["ns/p"] == "unknown action value 5"
    a = az.Authorization(name="q", namespace="ns")
    a.groups.add().rules.add().matches.add().source_ips.add(address=b"\x0a\x00\x00\x00", length=33)
    r = s.apply(AUTHORIZATION_TYPE, [make_resource("ns/q", AUTHORIZATION_TYPE, a)])
    assert "prefix length 33 exceeds 32" in reasons(r)["ns/q"]
    assert not s.authorizations and not s.services


def test_rejected_update_keeps_previous_version() -> None:
    s = state(wl_res("u/a", "10.0.0.1"))
    before = s.workloads["u/a"]
    v = s.version
    r = s.apply(ADDRESS_TYPE, [bad_addr_res("u/a", b"\x00")])
    assert [n for n, _ in r.rejected] == ["u/a"]
    assert s.workloads["u/a"] is before and s.version == v  # nothing changed, no new version


def test_duplicate_ips_across_workloads() -> None:
    s = state(wl_res("u/a", "10.0.0.1"))
    r = s.apply(ADDRESS_TYPE, [wl_res("u/b", "10.0.0.1"), wl_res("u/c", "10.0.0.2")])
    assert reasons(r) == {"u/b": "duplicate address 10.0.0.1: already held by u/a"}
    assert set(s.workloads) == {"u/a", "u/c"}
    # the same IP in another network is a different address
    r = s.apply(ADDRESS_TYPE, [wl_res("u/d", "10.0.0.1", network="net2")])
    assert not r.rejected
    # a move within one response: a drops the IP, b takes it
    r = s.apply(ADDRESS_TYPE, [wl_res("u/b", "10.0.0.1"), wl_res("u/a", "10.0.0.9")])
    assert not r.rejected
    assert s.workloads["u/b"].addresses == ("10.0.0.1",)
    # removal and reuse in one response
    r = s.apply(ADDRESS_TYPE, [wl_res("u/e", "10.0.0.9")], removed=["u/a"])
    assert not r.rejected and "u/a" not in s.workloads
    # host-network workloads share the node IP legitimately
    r = s.apply(
        ADDRESS_TYPE,
        [
            wl_res("u/h1", "192.168.0.1", network_mode=wl.HOST_NETWORK),
            wl_res("u/h2", "192.168.0.1", network_mode=wl.HOST_NETWORK),
        ],
    )
    assert not r.rejected


def test_duplicate_cascade_restores_old_addresses() -> None:
    # a's update is rejected (it takes c's IP), so a keeps 10.0.0.1, so b can't have it.
    s = state(wl_res("u/a", "10.0.0.1"), wl_res("u/c", "10.0.0.3"))
    r = s.apply(ADDRESS_TYPE, [wl_res("u/a", "10.0.0.3"), wl_res("u/b", "10.0.0.1")])
    assert set(reasons(r)) == {"u/a", "u/b"}
    assert s.workloads["u/a"].addresses == ("10.0.0.1",)
    assert "u/b" not in s.workloads


def test_removals_and_unknown_names() -> None:
    s = state(wl_res("u/a", "10.0.0.1"), wl_res("u/b", "10.0.0.2"))
    r = s.apply(ADDRESS_TYPE, [], removed=["u/a", "never/existed"])
    assert r.removed == 1 and set(s.workloads) == {"u/b"}
    assert s.snapshot().endpoints == {"10.0.0.2"}


def test_snapshot_versions_and_completeness() -> None:
    s = WorkloadState(NODE)
    seen: list[int] = []
    s.subscribe(seen.append)
    s.apply(ADDRESS_TYPE, [wl_res("u/a", "10.0.0.1")])
    snap1 = s.snapshot()
    assert not snap1.complete and snap1.endpoints == {"10.0.0.1"}
    s.mark_synced(ADDRESS_TYPE)
    assert not s.complete
    s.mark_synced(AUTHORIZATION_TYPE)
    assert s.complete and s.snapshot().complete
    s.apply(ADDRESS_TYPE, [], removed=["u/a"])
    assert snap1.endpoints == {"10.0.0.1"}  # old snapshots are immutable
    assert s.snapshot().endpoints == frozenset()
    assert seen == [1, 2, 3] and s.snapshot().version == 3
    s.apply(ADDRESS_TYPE, [bad_addr_res("u/x", b"")])
    assert s.version == 3  # a fully rejected response makes no version


def test_ip_text_forms() -> None:
    assert ip_from_bytes(packed("::ffff:10.1.2.3")) == "10.1.2.3"
    assert ip_from_bytes(packed("FD00:0:0::1")) == "fd00::1"
    assert canonical_ip("::ffff:a01:203") == "10.1.2.3"
    assert canonical_ip("2001:DB8::0:1") == "2001:db8::1"


def test_held_versions() -> None:
    s = state(wl_res("u/a", "10.0.0.1"))
    held = s.held(ADDRESS_TYPE)
    assert list(held) == ["u/a"] and held["u/a"] == s.workloads["u/a"].version != ""


# --- fuzzing -----------------------------------------------------------------------
UIDS = [f"c//Pod/ns/p{i}" for i in range(6)]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "::ffff:10.0.0.2"]
FAULTS = ["ok", "ok", "ok", "bad_len", "garbage", "wrong_type", "mismatch", "long", "enum", "none"]


@st.composite
def resource(draw: st.DrawFn) -> tuple[Any, str]:
    uid = draw(st.sampled_from(UIDS))
    ips = draw(st.lists(st.sampled_from(IPS), max_size=2, unique=True))
    fault = draw(st.sampled_from(FAULTS))
    w = workload(
        uid,
        *ips,
        node=draw(st.sampled_from([NODE, "node-2"])),
        tunnel=draw(st.sampled_from([wl.NONE, wl.HBONE, wl.HBONE])),
        native_tunnel=draw(st.booleans()),
        network_mode=draw(st.sampled_from([wl.STANDARD, wl.STANDARD, wl.HOST_NETWORK])),
    )
    if fault == "bad_len":
        w.addresses.append(draw(st.binary(max_size=20).filter(lambda b: len(b) not in (4, 16))))
    elif fault == "long":
        w.node = "n" * 254
    elif fault == "enum":
        w.tunnel_protocol = draw(st.integers(2, 2**31 - 1))
    body = wl.Address(workload=w).SerializeToString()
    if fault == "garbage":
        return raw_res(uid, draw(st.binary(min_size=1, max_size=40))), "maybe"
    if fault == "wrong_type":
        return raw_res(uid, body, type_url="type.googleapis.com/istio.workload.Workload"), fault
    if fault == "mismatch":
        return raw_res(uid + "-x", body), fault
    if fault == "none":
        return raw_res(uid, b""), fault
    return raw_res(uid, body), fault


batches = st.lists(
    st.tuples(st.lists(resource(), max_size=5), st.lists(st.sampled_from(UIDS), max_size=2)),
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
@given(batches=batches, preexisting=st.sets(st.sampled_from(["10.9.9.9", *IPS[:4]])))
def test_fuzz_state_and_sink(
    batches: list[tuple[list[tuple[Any, str]], list[str]]], preexisting: set[str]
) -> None:
    s = WorkloadState(NODE)
    sink = CheckingSink(dict.fromkeys(preexisting, 1))
    rec = Reconciler(s, sink)
    for i, (items, removed) in enumerate(batches):
        before = dict(s.workloads)
        result = s.apply(ADDRESS_TYPE, [r for r, _ in items], removed)
        if i == 0:
            s.mark_synced(ADDRESS_TYPE)
            s.mark_synced(AUTHORIZATION_TYPE)
        rejected = [n for n, _ in result.rejected]
        # every injected fault is caught (garbage bytes may happen to decode: "maybe")
        for r, fault in items:
            if fault not in ("ok", "maybe"):
                assert r.name in rejected, (fault, r.name, result.rejected)
        # a name whose every occurrence was rejected keeps its previous entry
        for name in {r.name for r, _ in items}:
            sent = sum(1 for r, _ in items if r.name == name)
            if rejected.count(name) == sent and name not in removed:
                assert s.workloads.get(name) == before.get(name)
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
        s = state(
            *(wl_res(f"u/bad{i}", ip, "10.0.1.1" if i == 0 else f"fd00::{i:x}")
              for i, ip in enumerate(REFUSED))
        )  # fmt: skip
    # the rest of each workload applies: its good address is enrolled
    assert s.snapshot().endpoints == {"10.0.1.1", *(f"fd00::{i:x}" for i in range(1, len(REFUSED)))}
    assert set(s.workloads) == {f"u/bad{i}" for i in range(len(REFUSED))}
    assert endpoints_of(s.workloads, NODE) == s.snapshot().endpoints
    assert s.refused_total == len(REFUSED)
    got = {e["ip"]: e["reason"] for e in logs if e["event"] == "xds.address_refused"}
    assert got == {canonical_ip(ip): why for ip, why in REFUSED.items()}
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "xds.address_refused")
    # a re-push of the same workloads logs and counts nothing new
    with capture_logs() as logs:
        s.apply(ADDRESS_TYPE, [wl_res("u/bad0", "127.0.0.1", "10.0.1.1", namespace="again")])
    assert s.workloads["u/bad0"].namespace == "again"
    assert s.refused_total == len(REFUSED)
    assert not [e for e in logs if e["event"] == "xds.address_refused"]
    # other nodes' and out-of-mesh workloads are not this node's business
    s.apply(ADDRESS_TYPE, [wl_res("u/far", "127.0.0.2", node="node-2")])
    assert s.refused_total == len(REFUSED)
    # the address leaves the workload and comes back: that is news again
    s.apply(ADDRESS_TYPE, [wl_res("u/bad0", "10.0.1.1")])
    assert "u/bad0" not in s.refused
    s.apply(ADDRESS_TYPE, [wl_res("u/bad0", "10.0.1.1", "127.0.0.1")])
    assert s.refused_total == len(REFUSED) + 1
    s.apply(ADDRESS_TYPE, [], removed=["u/bad0"])
    assert "u/bad0" not in s.refused


def test_refused_addresses_never_reach_the_sink() -> None:
    s = state(wl_res("u/lo", "127.0.0.1", "10.0.0.1"), wl_res("u/md", "169.254.169.254"))
    sink = MemorySink()
    Reconciler(s, sink).reconcile()
    assert sink.entries == {"10.0.0.1": 1}


# --- the duplicate-address check is linear ----------------------------------------
CHAIN = 20_000


def chain_ip(i: int) -> bytes:
    return (0x0A000000 + i).to_bytes(4)


def chain_res(uid: str, ip: bytes) -> Any:
    """wl_res, cheaper: 20,000 of them are built per response."""
    w = wl.Workload(uid=uid, name=uid, node=NODE, tunnel_protocol=wl.HBONE, addresses=[ip])
    body = any_pb2.Any(type_url=ADDRESS_TYPE, value=wl.Address(workload=w).SerializeToString())
    return dpb.Resource(name=uid, version="1", resource=body)


@pytest.mark.timeout(60)  # the old fixpoint took minutes here (one rejection per pass)
def test_chain_of_moves_cascades_in_one_response() -> None:
    """w_i moves onto w_{i+1}'s address, the last one onto an address held by someone
    who stays. The last is rejected, so w_{n-2} can't have its address, and so on."""
    anchor = packed("10.200.0.1")
    s = state(
        chain_res("u/anchor", anchor), *(chain_res(f"u/w{i}", chain_ip(i)) for i in range(CHAIN))
    )
    before = dict(s.workloads)
    moves = [chain_res(f"u/w{i}", chain_ip(i + 1)) for i in range(CHAIN - 1)]
    r = s.apply(ADDRESS_TYPE, [*moves, chain_res(f"u/w{CHAIN - 1}", anchor)])
    got = reasons(r)
    assert len(got) == CHAIN
    assert got[f"u/w{CHAIN - 1}"] == "duplicate address 10.200.0.1: already held by u/anchor"
    assert got["u/w0"] == "duplicate address 10.0.0.1: already held by u/w1"
    assert s.workloads == before and not r.changed and len(s.snapshot().endpoints) == CHAIN + 1


def test_chain_of_moves_onto_a_free_address_is_accepted() -> None:
    s = state(*(chain_res(f"u/w{i}", chain_ip(i)) for i in range(100)))
    r = s.apply(
        ADDRESS_TYPE,
        [
            *(chain_res(f"u/w{i}", chain_ip(i + 1)) for i in range(99)),
            chain_res("u/w99", anchor := packed("10.201.0.1")),
        ],
    )
    assert not r.rejected and r.updated == 100
    assert s.workloads["u/w0"].addresses == ("10.0.0.1",)
    assert s.workloads["u/w99"].addresses == ("10.201.0.1",)
    assert anchor and len(s.snapshot().endpoints) == 100
