"""xds.updater: the handlers that feed a WorkloadState, and the wire -> state -> map chain
fuzzed with malformed resources."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eztunnel_plugin.pb.envoy.service.discovery.v3.discovery_pb2 import Resource
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl
from eztunnel_plugin.reconciler import MemorySink, Reconciler
from eztunnel_plugin.state.workloads import WorkloadState, endpoints_of
from eztunnel_plugin.xds import decode
from eztunnel_plugin.xds.client import Watch
from eztunnel_plugin.xds.updater import AddressHandler, AuthorizationHandler, state_watches
from tests.state.testlib import NODE
from tests.xds.testlib import authz_res, raw_res, wl_res, workload


def test_address_refusals_become_rejections_and_parts_get_marked() -> None:
    s = WorkloadState(NODE)
    h = AddressHandler(s)
    records = decode.ADDRESS.decode([wl_res("u/a", "10.0.0.1"), wl_res("u/b", "10.0.0.1")])
    assert h.handle(records.records, frozenset()) == [
        ("u/b", "duplicate address 10.0.0.1: already held by u/a")
    ]
    assert set(s.workloads) == {"u/a"}
    h.synced()
    assert not s.complete  # authorizations have not arrived yet
    a = AuthorizationHandler(s)
    assert a.handle(decode.AUTHORIZATION.decode([authz_res("ns", "p")]).records, set()) == []
    assert set(s.authorizations) == {"ns/p"}
    a.synced()
    assert s.complete and s.snapshot().complete and s.snapshot().endpoints == {"10.0.0.1"}
    assert a.handle({}, {"ns/p"}) == [] and not s.authorizations


def test_state_watches_feed_one_state() -> None:
    s = WorkloadState(NODE)
    address, authorization = state_watches(s)
    address.apply([wl_res("u/a", "10.0.0.1")], [])
    authorization.apply([authz_res("ns", "p")], [])
    assert set(s.workloads) == {"u/a"} and set(s.authorizations) == {"ns/p"}
    address.synced()
    authorization.synced()
    assert s.complete


# --- fuzzing: malformed wire input never reaches the map ----------------------------
UIDS = [f"c//Pod/ns/p{i}" for i in range(6)]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "::ffff:10.0.0.2"]
FAULTS = ["ok", "ok", "ok", "bad_len", "garbage", "wrong_type", "mismatch", "long", "enum", "none"]


@st.composite
def resource(draw: st.DrawFn) -> tuple[Resource, str]:
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
def test_fuzz_wire_to_state_and_sink(
    batches: list[tuple[list[tuple[Resource, str]], list[str]]], preexisting: set[str]
) -> None:
    s = WorkloadState(NODE)
    watch = Watch(decode.ADDRESS, AddressHandler(s))
    sink = CheckingSink(dict.fromkeys(preexisting, 1))
    rec = Reconciler(s, sink)
    for i, (items, removed) in enumerate(batches):
        before = dict(s.workloads)
        result = watch.apply([r for r, _ in items], removed)
        if i == 0:
            for sub in state_watches(s):
                sub.synced()
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
        # what the client will hold: names the state holds, none the state refused
        refused = {n for n, why in result.rejected if ": already held by " in why}
        assert not refused & result.accepted.keys()
        assert all(n in s.workloads or n in s.services for n in result.accepted)
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
