"""istio's protobuf resources -> the state's records, with the wire validation.

Every resource is checked on its own: its envelope (a name, bounded lengths, a body of
the subscribed type that decodes, not twice in one response), then its fields (lengths,
enum ranges, addresses through addr.py, name consistency). A failure rejects that
resource with a one-line reason for the NACK; the others go on. ztunnel converts enums
strictly and refuses what it cannot represent; so does this.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

from eztunnel_plugin import addr, log
from eztunnel_plugin.errors import Rejected
from eztunnel_plugin.pb.envoy.service.discovery.v3.discovery_pb2 import Resource
from eztunnel_plugin.pb.istio.security import authorization_pb2 as authz_pb
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl_pb
from eztunnel_plugin.state.workloads import (
    AddressRecord,
    AuthorizationRecord,
    PolicyAction,
    PolicyScope,
    ServiceRecord,
    WorkloadRecord,
)
from eztunnel_plugin.xds.handler import Rejection
from eztunnel_plugin.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE

_log = log.get(__name__)

# Kubernetes bounds namespaces, node names and service accounts (<= 253 characters).
# Everything else gets more room: composite uids ("<cluster>/networking.istio.io/
# ServiceEntry/<ns>/<name>/<addr>") and istiod's synthesized policy names
# ("istio_allow_waypoint_<ns>_<name>") exceed 253. Longer is a broken or hostile server.
MAX_NAME_LEN: Final = 253
MAX_KEY_LEN: Final = 1024


def _known(enum: EnumDescriptor) -> frozenset[int]:
    return frozenset(enum.values_by_number)


def _enum_name(enum: EnumDescriptor, value: int) -> str:
    v = enum.values_by_number.get(value)
    return v.name if v is not None else str(value)


# ztunnel does not support sending LEGACY_ISTIO_MTLS.
_TUNNEL_OK: Final = frozenset({wl_pb.NONE, wl_pb.HBONE})
_WORKLOAD_TYPE_OK: Final = _known(wl_pb.WorkloadType.DESCRIPTOR)
_STATUS_OK: Final = _known(wl_pb.WorkloadStatus.DESCRIPTOR)
_NETWORK_MODE_OK: Final = _known(wl_pb.NetworkMode.DESCRIPTOR)
_APP_TUNNEL_OK: Final = _known(wl_pb.ApplicationTunnel.Protocol.DESCRIPTOR)
_APP_PROTOCOL_OK: Final = _known(wl_pb.AppProtocol.DESCRIPTOR)
_IP_FAMILIES_OK: Final = _known(wl_pb.IPFamilies.DESCRIPTOR)
_LB_SCOPE_OK: Final = _known(wl_pb.LoadBalancing.Scope.DESCRIPTOR)
_LB_MODE_OK: Final = _known(wl_pb.LoadBalancing.Mode.DESCRIPTOR)
_LB_HEALTH_OK: Final = _known(wl_pb.LoadBalancing.HealthPolicy.DESCRIPTOR)
_VISIBILITY_OK: Final = _known(wl_pb.Service.Visibility.DESCRIPTOR)
_SCOPES: Final = {
    authz_pb.GLOBAL: PolicyScope.GLOBAL,
    authz_pb.NAMESPACE: PolicyScope.NAMESPACE,
    authz_pb.WORKLOAD_SELECTOR: PolicyScope.WORKLOAD_SELECTOR,
}
_ACTIONS: Final = {authz_pb.ALLOW: PolicyAction.ALLOW, authz_pb.DENY: PolicyAction.DENY}


def ip_from_bytes(raw: bytes) -> str:
    """Canonical text of a raw 4- or 16-byte IP (addr.from_bytes, as a Rejected)."""
    try:
        return addr.from_bytes(raw)
    except ValueError as e:
        raise Rejected(str(e)) from None


def _check_len(what: str, value: str, limit: int = MAX_NAME_LEN) -> None:
    if len(value) > limit:
        raise Rejected(f"{what} is {len(value)} characters, limit {limit}")


def _check_enum(what: str, value: int, ok: frozenset[int]) -> None:
    if value not in ok:
        raise Rejected(f"unknown {what} value {value}")


def _check_prefix(what: str, raw: bytes, length: int | None) -> None:
    ip_from_bytes(raw)
    if length is not None and length > 8 * len(raw):
        raise Rejected(f"{what} prefix length {length} exceeds {8 * len(raw)}")


def _check_gateway(what: str, gw: wl_pb.GatewayAddress) -> None:
    kind = gw.WhichOneof("destination")
    if kind == "address":
        try:
            _check_prefix(what, gw.address.address, None)
        except Rejected as e:
            raise Rejected(f"{what}: {e}") from None
    elif kind == "hostname":
        _check_len(f"{what} namespace", gw.hostname.namespace)
        _check_len(f"{what} hostname", gw.hostname.hostname, MAX_KEY_LEN)


def _check_ports(what: str, ports: Iterable[wl_pb.Port]) -> None:
    for p in ports:
        if p.app_protocol not in _APP_PROTOCOL_OK:
            raise Rejected(f"{what}: unknown app_protocol value {p.app_protocol}")
        if p.service_port > 0xFFFF or p.target_port > 0xFFFF:
            raise Rejected(f"{what}: port out of range")


def decode_workload(name: str, w: wl_pb.Workload) -> WorkloadRecord:
    """The record of a Workload named name; raise Rejected with the reason."""
    uid = w.uid
    if not uid:
        raise Rejected("workload has no uid")
    if uid != name:
        raise Rejected(f"resource name does not match workload uid {uid[:MAX_NAME_LEN]!r}")
    _check_len("uid", uid, MAX_KEY_LEN)
    for what, value, limit in (
        ("name", w.name, MAX_KEY_LEN),
        ("namespace", w.namespace, MAX_NAME_LEN),
        ("node", w.node, MAX_NAME_LEN),
        ("service_account", w.service_account, MAX_NAME_LEN),
        ("network", w.network, MAX_KEY_LEN),
        ("trust_domain", w.trust_domain, MAX_KEY_LEN),
        ("cluster_id", w.cluster_id, MAX_KEY_LEN),
        ("hostname", w.hostname, MAX_KEY_LEN),
    ):
        _check_len(what, value, limit)
    tp = w.tunnel_protocol
    if tp not in _TUNNEL_OK:
        name_of = _enum_name(wl_pb.TunnelProtocol.DESCRIPTOR, tp)
        raise Rejected(f"unsupported tunnel protocol: {name_of}")
    _check_enum("workload_type", w.workload_type, _WORKLOAD_TYPE_OK)
    _check_enum("status", w.status, _STATUS_OK)
    _check_enum("network_mode", w.network_mode, _NETWORK_MODE_OK)
    if w.HasField("application_tunnel"):
        _check_enum("application_tunnel.protocol", w.application_tunnel.protocol, _APP_TUNNEL_OK)
    if w.HasField("waypoint"):
        _check_gateway("waypoint", w.waypoint)
    if w.HasField("network_gateway"):
        _check_gateway("network_gateway", w.network_gateway)
    for svc, plist in w.services.items():
        _check_len("service key", svc, MAX_KEY_LEN)
        _check_ports(f"service {svc[:MAX_NAME_LEN]!r}", plist.ports)
    addrs = []
    for i, raw in enumerate(w.addresses):
        try:
            addrs.append(ip_from_bytes(raw))
        except Rejected as e:
            raise Rejected(f"address {i}: {e}") from None
    if len(set(addrs)) != len(addrs):
        raise Rejected("duplicate address within the workload")
    # Each field read makes a new str. Records are held for every workload of the mesh:
    # the uid is the resource name's object, and the fields thousands of workloads share
    # (namespace, node, network, service account, trust domain) are interned.
    intern = sys.intern
    return WorkloadRecord(
        uid=name,
        name=w.name,
        namespace=intern(w.namespace),
        node=intern(w.node),
        network=intern(w.network),
        addresses=tuple(addrs),
        hbone=tp == wl_pb.HBONE,
        native_tunnel=w.native_tunnel,
        host_network=w.network_mode == wl_pb.HOST_NETWORK,
        service_account=intern(w.service_account),
        trust_domain=intern(w.trust_domain),
    )


def decode_service(name: str, s: wl_pb.Service) -> ServiceRecord:
    """The record of a Service named name ("namespace/hostname"); raise Rejected."""
    _check_len("namespace", s.namespace)
    _check_len("name", s.name, MAX_KEY_LEN)
    _check_len("hostname", s.hostname, MAX_KEY_LEN)
    key = f"{s.namespace}/{s.hostname}"
    if not s.hostname or key != name:
        raise Rejected(f"resource name does not match service {key[:MAX_KEY_LEN]!r}")
    addrs = []
    for i, na in enumerate(s.addresses):
        _check_len("address network", na.network, MAX_KEY_LEN)
        try:
            _check_prefix("address", na.address, na.length if na.HasField("length") else None)
            addrs.append(ip_from_bytes(na.address))
        except Rejected as e:
            raise Rejected(f"address {i}: {e}") from None
    _check_ports("ports", s.ports)
    _check_enum("ip_families", s.ip_families, _IP_FAMILIES_OK)
    _check_enum("visibility", s.visibility, _VISIBILITY_OK)
    if s.HasField("load_balancing"):
        lb = s.load_balancing
        for scope in lb.routing_preference:
            _check_enum("load_balancing.routing_preference", scope, _LB_SCOPE_OK)
        _check_enum("load_balancing.mode", lb.mode, _LB_MODE_OK)
        _check_enum("load_balancing.health_policy", lb.health_policy, _LB_HEALTH_OK)
    if s.HasField("waypoint"):
        _check_gateway("waypoint", s.waypoint)
    for i, ww in enumerate(s.weighted_waypoints):
        _check_gateway(f"weighted_waypoints[{i}]", ww.destination)
    return ServiceRecord(sys.intern(s.namespace), s.name, s.hostname, tuple(addrs))


def decode_address(name: str, a: wl_pb.Address) -> AddressRecord:
    """An Address is a workload or a service."""
    kind = a.WhichOneof("type")
    if kind == "workload":
        return decode_workload(name, a.workload)
    if kind == "service":
        return decode_service(name, a.service)
    raise Rejected("address is neither a workload nor a service")


def decode_authorization(name: str, a: authz_pb.Authorization) -> AuthorizationRecord:
    """The record of an Authorization named name ("namespace/name"); raise Rejected."""
    _check_len("namespace", a.namespace)
    _check_len("name", a.name, MAX_KEY_LEN)
    key = f"{a.namespace}/{a.name}"
    if not a.name or key != name:
        raise Rejected(f"resource name does not match authorization {key[:MAX_KEY_LEN]!r}")
    scope = _SCOPES.get(a.scope)
    if scope is None:
        raise Rejected(f"unknown scope value {a.scope}")
    action = _ACTIONS.get(a.action)
    if action is None:
        raise Rejected(f"unknown action value {a.action}")
    for group in a.groups:
        for rules in group.rules:
            for m in rules.matches:
                for what, cidrs in (
                    ("source_ips", m.source_ips),
                    ("not_source_ips", m.not_source_ips),
                    ("destination_ips", m.destination_ips),
                    ("not_destination_ips", m.not_destination_ips),
                ):
                    for cidr in cidrs:
                        try:
                            _check_prefix(what, cidr.address, cidr.length)
                        except Rejected as e:
                            raise Rejected(f"{what}: {e}") from None
                for port in (*m.destination_ports, *m.not_destination_ports):
                    if port > 0xFFFF:
                        raise Rejected(f"port {port} out of range")
    return AuthorizationRecord(a.namespace, a.name, scope, action)


M = TypeVar("M", bound=Message)
R = TypeVar("R")


@dataclass(slots=True)
class Decoded(Generic[R]):
    """One response's resources, decoded: the good ones by name, and the rejected."""

    records: dict[str, R] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # name -> the server's version
    rejected: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Decoder(Generic[M, R]):
    """How one resource type's bodies are decoded (message) and converted (convert)."""

    type_url: str
    message: type[M]
    convert: Callable[[str, M], R]

    def unpack(self, res: Resource) -> M:
        """The typed body of res; Rejected if it has none, another type, or garbage."""
        if not res.HasField("resource"):
            raise Rejected("resource has no body")
        body = res.resource
        if body.type_url != self.type_url:
            raise Rejected(f"resource type {body.type_url[:MAX_NAME_LEN]!r} is not {self.type_url}")
        try:
            return self.message.FromString(body.value)
        except Exception as e:  # upb raises DecodeError; be safe against anything else
            raise Rejected(f"cannot decode: {str(e)[:MAX_NAME_LEN]}") from None

    def decode(self, resources: Iterable[Resource]) -> Decoded[R]:
        """Every resource checked on its own; a bug in a check costs one resource."""
        out: Decoded[R] = Decoded()
        for res in resources:
            name = res.name
            try:
                if not name:
                    raise Rejected("resource has no name")
                _check_len("resource name", name, MAX_KEY_LEN)
                # the version is held and may be sent back (send_versions): bounded
                _check_len("resource version", res.version, MAX_KEY_LEN)
                if name in out.records:
                    raise Rejected("resource appears twice in one response")
                out.records[name] = self.convert(name, self.unpack(res))
                out.versions[name] = res.version
            except Rejected as e:
                out.rejected.append(Rejection(name[:MAX_KEY_LEN], str(e)))
            except Exception as e:  # a validator bug must cost one resource, not the agent
                _log.error(
                    "xds.validate_failed", type_url=self.type_url, error=repr(e)[:MAX_KEY_LEN]
                )
                reason = f"internal error: {type(e).__name__}"
                out.rejected.append(Rejection(name[:MAX_KEY_LEN], reason))
        return out


ADDRESS: Final = Decoder(ADDRESS_TYPE, wl_pb.Address, decode_address)
AUTHORIZATION: Final = Decoder(AUTHORIZATION_TYPE, authz_pb.Authorization, decode_authorization)
