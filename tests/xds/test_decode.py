"""xds.decode: protobuf resources -> records, every malformed one rejected with a reason."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eztunnel_lab.fake_istiod import make_resource
from eztunnel_plugin.pb.envoy.service.discovery.v3.discovery_pb2 import Resource
from eztunnel_plugin.pb.istio.security import authorization_pb2 as az
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl
from eztunnel_plugin.state.workloads import (
    AuthorizationRecord,
    PolicyAction,
    PolicyScope,
    ServiceRecord,
    WorkloadRecord,
)
from eztunnel_plugin.xds import decode
from eztunnel_plugin.xds.decode import MAX_KEY_LEN, ip_from_bytes
from eztunnel_plugin.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE
from tests.state.testlib import NODE
from tests.xds.testlib import authz_res, bad_addr_res, packed, raw_res, wl_res, workload


def reasons(*res: Resource, decoder: Any = decode.ADDRESS) -> dict[str, str]:
    return dict(decoder.decode(res).rejected)


def service(name: str = "web", ns: str = "default", *ips: str) -> wl.Service:
    svc = wl.Service(name=name, namespace=ns, hostname=f"{name}.{ns}.svc.cluster.local")
    for ip in ips:
        svc.addresses.add(address=packed(ip))
    return svc


def test_records_carry_the_domain_form() -> None:
    got = decode.ADDRESS.decode(
        [
            wl_res("c//Pod/default/web-0", "10.0.0.1", "::ffff:10.0.0.2", "FD00::1"),
            wl_res("c//Pod/default/side", "10.0.0.3", native_tunnel=True, tunnel=wl.NONE),
            wl_res("c//Pod/default/host", "10.0.0.4", network_mode=wl.HOST_NETWORK),
            make_resource(
                "default/web.default.svc.cluster.local",
                ADDRESS_TYPE,
                wl.Address(service=service("web", "default", "10.96.0.1")),
                version="v7",
            ),
        ]
    )
    assert not got.rejected
    web = got.records["c//Pod/default/web-0"]
    assert web == WorkloadRecord(
        uid="c//Pod/default/web-0",
        name="web-0",
        namespace="default",
        node=NODE,
        network="",
        addresses=("10.0.0.1", "10.0.0.2", "fd00::1"),
        hbone=True,
        native_tunnel=False,
        host_network=False,
        service_account="",
        trust_domain="",
    )
    side = got.records["c//Pod/default/side"]
    assert isinstance(side, WorkloadRecord) and not side.hbone and side.native_tunnel
    host = got.records["c//Pod/default/host"]
    assert isinstance(host, WorkloadRecord) and host.host_network and host.hbone
    assert got.records["default/web.default.svc.cluster.local"] == ServiceRecord(
        "default", "web", "web.default.svc.cluster.local", ("10.96.0.1",)
    )
    assert got.versions["default/web.default.svc.cluster.local"] == "v7"
    assert len(got.versions["c//Pod/default/web-0"]) == 16  # the fake's content hash


def test_authorizations_become_policy_records() -> None:
    got = decode.AUTHORIZATION.decode(
        [authz_res("istio-system", "strict", scope=az.GLOBAL, action=az.DENY)]
    )
    assert got.records == {
        "istio-system/strict": AuthorizationRecord(
            "istio-system", "strict", PolicyScope.GLOBAL, PolicyAction.DENY
        )
    }


def test_every_enum_value_of_the_protos_has_a_record_form() -> None:
    """A regenerated proto with a new scope or action fails here, not in production."""
    for scope in az.Scope.values():
        a = az.Authorization(name="p", namespace="ns", scope=scope)
        assert decode.decode_authorization("ns/p", a).scope.name == az.Scope.Name(scope)
    for action in az.Action.values():
        a = az.Authorization(name="p", namespace="ns", action=action)
        assert decode.decode_authorization("ns/p", a).action.name == az.Action.Name(action)
    assert {s.name for s in PolicyScope} == set(az.Scope.keys())
    assert {a.name for a in PolicyAction} == set(az.Action.keys())


def test_keys_are_istiod_names() -> None:
    svc = service("web", "default", "10.96.0.1")
    got = decode.ADDRESS.decode(
        [
            wl_res("Kubernetes//Pod/default/web-0", "10.0.0.1"),
            make_resource(
                "default/web.default.svc.cluster.local", ADDRESS_TYPE, wl.Address(service=svc)
            ),
        ]
    )
    assert not got.rejected
    assert set(got.records) == {
        "Kubernetes//Pod/default/web-0",
        "default/web.default.svc.cluster.local",
    }
    # istiod synthesizes names longer than any Kubernetes object name
    waypoint_policy = "istio_allow_waypoint_" + "n" * 63 + "_" + "w" * 253
    got_a = decode.AUTHORIZATION.decode(
        [authz_res("istio-system", "strict", scope=az.GLOBAL), authz_res("ns", waypoint_policy)]
    )
    assert not got_a.rejected
    assert set(got_a.records) == {"istio-system/strict", f"ns/{waypoint_policy}"}
    # wrong names are rejected, not re-keyed
    r = reasons(make_resource("x", ADDRESS_TYPE, wl.Address(service=svc)))
    assert "resource name does not match service" in r["x"]
    wrong = make_resource("a/b", AUTHORIZATION_TYPE, az.Authorization(name="c", namespace="a"))
    assert "does not match authorization" in reasons(wrong, decoder=decode.AUTHORIZATION)["a/b"]


def test_malformed_resources_rejected_with_reasons() -> None:
    long = "n" * 300
    no_body = Resource(name="u/no-body", version="v")
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
        raw_res("u/long-version", b"", version="v" * 5000),
        no_body,
        make_resource(
            "u/mismatch", ADDRESS_TYPE, wl.Address(workload=workload("u/other", "10.0.0.9"))
        ),
        make_resource("u/" + "x" * MAX_KEY_LEN, ADDRESS_TYPE, wl.Address()),
    ]
    got = decode.ADDRESS.decode([*bad, wl_res("u/good", "10.0.0.1"), raw_res("", b"")])
    r = dict(got.rejected)
    assert set(got.records) == {"u/good"} and set(got.versions) == {"u/good"}
    assert len(got.rejected) == len(bad) + 1
    assert r["u/bad-len"] == "address 0: address has 5 bytes, want 4 or 16"
    assert r["u/legacy"] == "unsupported tunnel protocol: LEGACY_ISTIO_MTLS"
    assert r["u/enum"] == "unsupported tunnel protocol: 9"
    assert r["u/status"] == "unknown status value 7"
    assert r["u/mode"] == "unknown network_mode value 3"
    assert r["u/long"] == "namespace is 300 characters, limit 253"
    assert r["u/dup-in"] == "duplicate address within the workload"
    assert r["u/v4mapped-dup"] == "duplicate address within the workload"
    assert r["u/garbage"].startswith("cannot decode")
    assert "is not type.googleapis.com/istio.workload.Address" in r["u/wrongtype"]
    assert r["u/empty"] == "address is neither a workload nor a service"
    assert r["u/long-version"] == "resource version is 5000 characters, limit 1024"
    assert r["u/no-body"] == "resource has no body"
    assert "does not match workload uid" in r["u/mismatch"]
    assert r[""] == "resource has no name"
    assert any(v.startswith("resource name is 1026 characters") for v in r.values())
    assert all(len(name) <= MAX_KEY_LEN for name in r)  # echoed names are bounded


def test_twice_in_one_response_keeps_the_first() -> None:
    got = decode.ADDRESS.decode([wl_res("u/a", "10.0.0.1"), wl_res("u/a", "10.0.0.2")])
    assert got.rejected == [("u/a", "resource appears twice in one response")]
    rec = got.records["u/a"]
    assert isinstance(rec, WorkloadRecord) and rec.addresses == ("10.0.0.1",)


def test_nested_enum_and_gateway_validation() -> None:
    w = workload("u/wp", "10.0.0.1")
    w.waypoint.address.address = b"\x01\x02"
    r = reasons(make_resource("u/wp", ADDRESS_TYPE, wl.Address(workload=w)))
    assert r["u/wp"] == "waypoint: address has 2 bytes, want 4 or 16"
    svc = wl.Service(name="s", namespace="ns", hostname="s.ns.svc")
    svc.load_balancing.mode = 42  # type: ignore[assignment]
    r = reasons(make_resource("ns/s.ns.svc", ADDRESS_TYPE, wl.Address(service=svc)))
    assert r["ns/s.ns.svc"] == "unknown load_balancing.mode value 42"
    svc = wl.Service(name="s", namespace="ns", hostname="s.ns.svc")
    svc.ports.add(service_port=70000)
    r = reasons(make_resource("ns/s.ns.svc", ADDRESS_TYPE, wl.Address(service=svc)))
    assert r["ns/s.ns.svc"] == "ports: port out of range"
    a = az.Authorization(name="p", namespace="ns", action=5)  # type: ignore[arg-type]
    r = reasons(make_resource("ns/p", AUTHORIZATION_TYPE, a), decoder=decode.AUTHORIZATION)
    assert r["ns/p"] == "unknown action value 5"
    a = az.Authorization(name="p", namespace="ns", scope=9)  # type: ignore[arg-type]
    r = reasons(make_resource("ns/p", AUTHORIZATION_TYPE, a), decoder=decode.AUTHORIZATION)
    assert r["ns/p"] == "unknown scope value 9"
    a = az.Authorization(name="q", namespace="ns")
    a.groups.add().rules.add().matches.add().source_ips.add(address=b"\x0a\x00\x00\x00", length=33)
    r = reasons(make_resource("ns/q", AUTHORIZATION_TYPE, a), decoder=decode.AUTHORIZATION)
    assert "prefix length 33 exceeds 32" in r["ns/q"]
    a = az.Authorization(name="q", namespace="ns")
    a.groups.add().rules.add().matches.add().not_destination_ports.append(65536)
    r = reasons(make_resource("ns/q", AUTHORIZATION_TYPE, a), decoder=decode.AUTHORIZATION)
    assert r["ns/q"] == "port 65536 out of range"


def test_a_validator_bug_costs_one_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str, w: wl.Workload) -> WorkloadRecord:
        if name == "u/boom":
            raise ZeroDivisionError("bug")
        return real(name, w)

    real = decode.decode_workload
    monkeypatch.setattr(decode, "decode_workload", broken)
    got = decode.ADDRESS.decode([wl_res("u/boom", "10.0.0.1"), wl_res("u/fine", "10.0.0.2")])
    assert got.rejected == [("u/boom", "internal error: ZeroDivisionError")]
    assert set(got.records) == {"u/fine"}


def test_ip_text_forms() -> None:
    assert ip_from_bytes(packed("::ffff:10.1.2.3")) == "10.1.2.3"
    assert ip_from_bytes(packed("FD00:0:0::1")) == "fd00::1"
    assert ip_from_bytes(packed("::7f00:1")) == "::7f00:1"  # not v4-mapped: stays v6


# --- fuzzing -----------------------------------------------------------------------
FAULTS = ["ok", "ok", "bad_len", "garbage", "wrong_type", "mismatch", "long", "enum", "none"]


@st.composite
def resource(draw: st.DrawFn) -> tuple[Resource, str]:
    uid = draw(st.sampled_from([f"c//Pod/ns/p{i}" for i in range(3)]))
    w = workload(uid, *draw(st.lists(st.sampled_from(["10.0.0.1", "fd00::1"]), unique=True)))
    fault = draw(st.sampled_from(FAULTS))
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


@settings(max_examples=200, deadline=None)
@given(st.lists(resource(), max_size=6))
def test_fuzz_every_fault_is_caught(items: list[tuple[Resource, str]]) -> None:
    got = decode.ADDRESS.decode([r for r, _ in items])
    rejected = [n for n, _ in got.rejected]
    for r, fault in items:  # garbage bytes may happen to decode: "maybe"
        if fault not in ("ok", "maybe"):
            assert r.name in rejected, (fault, r.name, got.rejected)
    # every resource is accounted for: a record (first of its name) or a rejection
    assert len(got.records) + len(rejected) == len(items)
    assert got.records.keys() == got.versions.keys()


def test_records_share_the_strings_many_workloads_repeat() -> None:
    """Records hold one copy of each namespace, node, network, service account and trust
    domain, and no uid beside the resource name (a structural check of a memory saving)."""
    shared = {"service_account": "sa-1", "network": "net-1", "trust_domain": "td.local"}
    res = [wl_res(f"uid-{i}", f"10.0.0.{i + 1}", namespace="ns-1", **shared) for i in range(3)]
    got = decode.ADDRESS.decode(res)
    assert not got.rejected and len(got.records) == 3
    workloads = [r for r in got.records.values() if isinstance(r, WorkloadRecord)]
    assert len(workloads) == 3
    for field in ("namespace", "node", "network", "service_account", "trust_domain"):
        first = getattr(workloads[0], field)
        assert first and all(getattr(w, field) is first for w in workloads), field
    for name, rec in got.records.items():
        assert isinstance(rec, WorkloadRecord) and rec.uid is name
