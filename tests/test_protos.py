"""Our .proto files against upstream's names, numbers and types (docs/ambient.md, "Field numbers").

The tables below are transcribed from upstream's protos, independently of proto/, so a
typo in either shows up here. Plus hand-encoded bytes decoded by the generated code,
to check the wire format without trusting our own serializer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor as FD

from eztunnel_plugin.pb.envoy.config.core.v3 import base_pb2
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2
from eztunnel_plugin.pb.google.rpc import status_pb2
from eztunnel_plugin.pb.istio.security import authorization_pb2 as az
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl

M, S, B, U32, I32, BOOL, E = (
    FD.TYPE_MESSAGE,
    FD.TYPE_STRING,
    FD.TYPE_BYTES,
    FD.TYPE_UINT32,
    FD.TYPE_INT32,
    FD.TYPE_BOOL,
    FD.TYPE_ENUM,
)

# message full name -> {field: (number, type, repeated)}
FIELDS: dict[str, dict[str, tuple[int, int, bool]]] = {
    "istio.workload.Address": {"workload": (1, M, False), "service": (2, M, False)},
    "istio.workload.Service": {
        "name": (1, S, False),
        "namespace": (2, S, False),
        "hostname": (3, S, False),
        "addresses": (4, M, True),
        "ports": (5, M, True),
        "subject_alt_names": (6, S, True),
        "waypoint": (7, M, False),
        "load_balancing": (8, M, False),
        "ip_families": (9, E, False),
        "extensions": (10, M, True),
        "canonical": (11, BOOL, False),
        "ingress_use_waypoint": (12, BOOL, False),
        "weighted_waypoints": (13, M, True),
        "visibility": (14, E, False),
    },
    "istio.workload.Workload": {
        "uid": (20, S, False),
        "name": (1, S, False),
        "namespace": (2, S, False),
        "addresses": (3, B, True),
        "hostname": (21, S, False),
        "network": (4, S, False),
        "tunnel_protocol": (5, E, False),
        "trust_domain": (6, S, False),
        "service_account": (7, S, False),
        "waypoint": (8, M, False),
        "network_gateway": (19, M, False),
        "node": (9, S, False),
        "canonical_name": (10, S, False),
        "canonical_revision": (11, S, False),
        "workload_type": (12, E, False),
        "workload_name": (13, S, False),
        "native_tunnel": (14, BOOL, False),
        "application_tunnel": (23, M, False),
        "services": (22, M, True),
        "authorization_policies": (16, S, True),
        "status": (17, E, False),
        "cluster_id": (18, S, False),
        "locality": (24, M, False),
        "network_mode": (25, E, False),
        "extensions": (26, M, True),
        "capacity": (27, M, False),
    },
    "istio.workload.NetworkAddress": {
        "network": (1, S, False),
        "address": (2, B, False),
        "length": (3, U32, False),
    },
    "istio.workload.NamespacedHostname": {"namespace": (1, S, False), "hostname": (2, S, False)},
    "istio.workload.GatewayAddress": {
        "hostname": (1, M, False),
        "address": (2, M, False),
        "hbone_mtls_port": (3, U32, False),
    },
    "istio.workload.WeightedWaypoint": {"destination": (1, M, False), "weight": (2, U32, False)},
    "istio.workload.ApplicationTunnel": {"protocol": (1, E, False), "port": (2, U32, False)},
    "istio.workload.LoadBalancing": {
        "routing_preference": (1, E, True),
        "mode": (2, E, False),
        "health_policy": (3, E, False),
    },
    "istio.workload.Locality": {
        "region": (1, S, False),
        "zone": (2, S, False),
        "subzone": (3, S, False),
    },
    "istio.workload.PortList": {"ports": (1, M, True)},
    "istio.workload.Port": {
        "service_port": (1, U32, False),
        "target_port": (2, U32, False),
        "app_protocol": (3, E, False),
    },
    "istio.workload.Extension": {"name": (1, S, False), "config": (2, M, False)},
    "istio.security.Authorization": {
        "name": (1, S, False),
        "namespace": (2, S, False),
        "scope": (3, E, False),
        "action": (4, E, False),
        "groups": (5, M, True),
        "dry_run": (6, BOOL, False),
        "extensions": (7, M, True),
    },
    "istio.security.Group": {"rules": (1, M, True)},
    "istio.security.Rules": {"matches": (2, M, True)},
    "istio.security.Match": {
        "namespaces": (1, M, True),
        "not_namespaces": (2, M, True),
        "principals": (3, M, True),
        "not_principals": (4, M, True),
        "source_ips": (5, M, True),
        "not_source_ips": (6, M, True),
        "destination_ips": (7, M, True),
        "not_destination_ips": (8, M, True),
        "destination_ports": (9, U32, True),
        "not_destination_ports": (10, U32, True),
        "service_accounts": (11, M, True),
        "not_service_accounts": (12, M, True),
        "extensions": (13, M, True),
    },
    "istio.security.Address": {"address": (1, B, False), "length": (2, U32, False)},
    "istio.security.ServiceAccountMatch": {
        "namespace": (1, S, False),
        "serviceAccount": (2, S, False),
    },
    "istio.security.StringMatch": {
        "exact": (1, S, False),
        "prefix": (2, S, False),
        "suffix": (3, S, False),
        "presence": (4, M, False),
    },
    "envoy.service.discovery.v3.DeltaDiscoveryRequest": {
        "node": (1, M, False),
        "type_url": (2, S, False),
        "resource_names_subscribe": (3, S, True),
        "resource_names_unsubscribe": (4, S, True),
        "initial_resource_versions": (5, M, True),
        "response_nonce": (6, S, False),
        "error_detail": (7, M, False),
    },
    "envoy.service.discovery.v3.DeltaDiscoveryResponse": {
        "system_version_info": (1, S, False),
        "resources": (2, M, True),
        "type_url": (4, S, False),
        "nonce": (5, S, False),
        "removed_resources": (6, S, True),
        "control_plane": (7, M, False),
    },
    "envoy.service.discovery.v3.Resource": {
        "version": (1, S, False),
        "resource": (2, M, False),
        "name": (3, S, False),
        "aliases": (4, S, True),
        "ttl": (6, M, False),
        "cache_control": (7, M, False),
    },
    "envoy.config.core.v3.Node": {
        "id": (1, S, False),
        "cluster": (2, S, False),
        "metadata": (3, M, False),
        "locality": (4, M, False),
        "user_agent_name": (6, S, False),
        "user_agent_version": (7, S, False),
        "client_features": (10, S, True),
    },
    "envoy.config.core.v3.ControlPlane": {"identifier": (1, S, False)},
    "google.rpc.Status": {
        "code": (1, I32, False),
        "message": (2, S, False),
        "details": (3, M, True),
    },
}

ENUMS: dict[str, dict[str, int]] = {
    "istio.workload.TunnelProtocol": {"NONE": 0, "HBONE": 1, "LEGACY_ISTIO_MTLS": 2},
    "istio.workload.WorkloadStatus": {"HEALTHY": 0, "UNHEALTHY": 1},
    "istio.workload.WorkloadType": {"DEPLOYMENT": 0, "CRONJOB": 1, "POD": 2, "JOB": 3},
    "istio.workload.NetworkMode": {"STANDARD": 0, "HOST_NETWORK": 1},
    "istio.workload.IPFamilies": {"AUTOMATIC": 0, "IPV4_ONLY": 1, "IPV6_ONLY": 2, "DUAL": 3},
    "istio.workload.AppProtocol": {
        "UNKNOWN": 0,
        "HTTP11": 1,
        "HTTP2": 2,
        "GRPC": 3,
        "TCP": 4,
        "TLS": 5,
    },
    "istio.workload.LoadBalancing.Scope": {
        "UNSPECIFIED_SCOPE": 0,
        "REGION": 1,
        "ZONE": 2,
        "SUBZONE": 3,
        "NODE": 4,
        "CLUSTER": 5,
        "NETWORK": 6,
    },
    "istio.workload.LoadBalancing.Mode": {
        "UNSPECIFIED_MODE": 0,
        "STRICT": 1,
        "FAILOVER": 2,
        "PASSTHROUGH": 3,
    },
    "istio.workload.LoadBalancing.HealthPolicy": {"ONLY_HEALTHY": 0, "ALLOW_ALL": 1},
    "istio.workload.ApplicationTunnel.Protocol": {"NONE": 0, "PROXY": 1},
    "istio.workload.Service.Visibility": {"PUBLIC": 0, "NAMESPACE": 1},
    "istio.security.Scope": {"GLOBAL": 0, "NAMESPACE": 1, "WORKLOAD_SELECTOR": 2},
    "istio.security.Action": {"ALLOW": 0, "DENY": 1},
}

MODULES = (wl, az, discovery_pb2, base_pb2, status_pb2)


def _find(full_name: str) -> Any:
    for mod in MODULES:
        pool = mod.DESCRIPTOR.pool
        try:
            return pool.FindMessageTypeByName(full_name)
        except KeyError:
            try:
                return pool.FindEnumTypeByName(full_name)
            except KeyError:
                continue
    raise KeyError(full_name)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_message_fields_match_the_contract(name: str) -> None:
    desc = _find(name)
    got = {f.name: (f.number, f.type, f.is_repeated) for f in desc.fields}
    assert got == FIELDS[name]


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enum_values_match_the_contract(name: str) -> None:
    desc = _find(name)
    assert {v.name: v.number for v in desc.values} == ENUMS[name]


def test_reserved_and_special_shapes() -> None:
    def proto_of(desc: Any) -> Any:
        fdp = descriptor_pb2.FileDescriptorProto()
        desc.file.CopyToProto(fdp)
        return next(m for m in fdp.message_type if m.name == desc.name)

    w = proto_of(wl.Workload.DESCRIPTOR)
    assert [(r.start, r.end) for r in w.reserved_range] == [(15, 16)]
    gw = proto_of(wl.GatewayAddress.DESCRIPTOR)
    assert [(r.start, r.end) for r in gw.reserved_range] == [(4, 5)]
    assert list(gw.reserved_name) == ["hbone_single_tls_port"]
    node = proto_of(base_pb2.Node.DESCRIPTOR)
    assert [(r.start, r.end) for r in node.reserved_range] == [(5, 6)]
    assert list(node.reserved_name) == ["build_version"]
    # proto3 optional (presence) on NetworkAddress.length; oneofs as upstream.
    assert wl.NetworkAddress.DESCRIPTOR.fields_by_name["length"].has_presence
    assert [f.name for f in wl.Address.DESCRIPTOR.oneofs_by_name["type"].fields] == [
        "workload",
        "service",
    ]
    capacity: Any = wl.Workload.DESCRIPTOR.fields_by_name["capacity"].message_type
    assert capacity.full_name == "google.protobuf.UInt32Value"
    ext: Any = az.Authorization.DESCRIPTOR.fields_by_name["extensions"].message_type
    assert ext.full_name == "istio.workload.Extension"


def test_ads_method_path() -> None:
    svc = discovery_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"]
    m = svc.methods_by_name["DeltaAggregatedResources"]
    assert svc.full_name == "envoy.service.discovery.v3.AggregatedDiscoveryService"
    assert m.client_streaming and m.server_streaming
    assert m.input_type.full_name == "envoy.service.discovery.v3.DeltaDiscoveryRequest"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _vi(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def test_hand_encoded_workload_decodes() -> None:
    """Bytes laid out by field number, as istiod would send them."""
    workload = (
        _ld(20, b"Kubernetes//Pod/default/web-0")
        + _ld(1, b"web-0")
        + _ld(2, b"default")
        + _ld(3, bytes([10, 0, 0, 10]))
        + _vi(5, 1)  # HBONE
        + _ld(9, b"node-1")
        + _vi(14, 1)
        + _vi(25, 1)  # HOST_NETWORK
        + _ld(22, _ld(1, b"default/web.default.svc") + _ld(2, _ld(1, _vi(1, 80) + _vi(2, 8080))))
        + _vi(15, 7)  # the reserved number: kept as an unknown field, not an error
    )
    addr = wl.Address.FromString(_ld(1, workload))
    w = addr.workload
    assert w.uid == "Kubernetes//Pod/default/web-0"
    assert (w.name, w.namespace, w.node) == ("web-0", "default", "node-1")
    assert list(w.addresses) == [bytes([10, 0, 0, 10])]
    assert w.tunnel_protocol == wl.HBONE and w.native_tunnel and w.network_mode == wl.HOST_NETWORK
    assert w.services["default/web.default.svc"].ports[0].target_port == 8080


def test_hand_encoded_delta_response_and_request() -> None:
    any_msg = _ld(1, b"type.googleapis.com/istio.workload.Address") + _ld(2, b"")
    resource = _ld(1, b"v1") + _ld(2, any_msg) + _ld(3, b"uid-1") + _ld(4, b"/10.0.0.1")
    resp_bytes = (
        _ld(1, b"sys")
        + _ld(2, resource)
        + _ld(4, b"type.googleapis.com/istio.workload.Address")
        + _ld(5, b"nonce-1")
        + _ld(6, b"gone")
        + _ld(7, _ld(1, b"istiod"))
        + _ld(8, _ld(1, b"newer-field"))  # removed_resource_names: unknown to us, skipped
    )
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(resp_bytes)
    assert resp.nonce == "nonce-1" and list(resp.removed_resources) == ["gone"]
    assert resp.resources[0].name == "uid-1" and resp.resources[0].version == "v1"
    assert resp.control_plane.identifier == "istiod"

    req = discovery_pb2.DeltaDiscoveryRequest(type_url="t", response_nonce="n")
    req.error_detail.message = "bad"
    assert req.SerializeToString() == _ld(2, b"t") + _ld(6, b"n") + _ld(7, _ld(2, b"bad"))


# ---- the protos are standalone wire contracts ------------------------------------

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto"
PROTO_FILES = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
BUF = REPO / "node_modules" / ".bin" / "buf"


@pytest.mark.parametrize("proto", PROTO_FILES)
def test_each_proto_compiles_alone_with_only_proto_on_the_include_path(
    proto: str, tmp_path: Path
) -> None:
    # What grpcurl -import-path proto, buf or another language's protoc does.
    out = tmp_path / "set.pb"
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}",
         "--include_imports", proto],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert proto in [f.name for f in files]
    assert not [f.name for f in files if f.name.startswith("eztunnel_plugin/")]


def test_generated_modules_carry_the_standalone_file_names() -> None:
    # Reflection (grpcurl describe) shows these names: the same as under proto/.
    names = {m.DESCRIPTOR.name for m in (base_pb2, discovery_pb2, status_pb2, az, wl)}
    assert names == {
        "envoy/config/core/v3/base.proto",
        "envoy/service/discovery/v3/discovery.proto",
        "google/rpc/status.proto",
        "istio/security/authorization.proto",
        "istio/workload/workload.proto",
    }


@pytest.mark.parametrize("command", ["lint", "build"])
def test_buf(command: str) -> None:
    assert BUF.exists(), "buf is missing: `make deps` installs it from package.json"
    done = subprocess.run(
        [str(BUF), command], cwd=REPO, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
