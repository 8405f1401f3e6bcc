"""The xDS state the client feeds: workloads, services and authorizations, validated.

Keys are istiod's resource names: a workload's uid, a service's "namespace/hostname",
an authorization's "namespace/name". Every response is applied as one step: each
resource is validated on its own and either replaces its entry whole or is rejected
with a reason (the client NACKs those); the good ones and the removals land together
and produce one new snapshot version. A rejected update keeps the previous accepted
version, as ztunnel does.

The node's in-mesh endpoints (the addresses the BPF endpoint map must hold) are kept
as an index updated with each change, so a snapshot costs O(local endpoints).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf.message import Message

from eztunnel_plugin import addr, log
from eztunnel_plugin.pb.istio.security import authorization_pb2 as authz_pb
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl_pb

_log = log.get(__name__)

ADDRESS_TYPE: Final = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE: Final = "type.googleapis.com/istio.security.Authorization"
SUBSCRIBED_TYPES: Final = (ADDRESS_TYPE, AUTHORIZATION_TYPE)

# Kubernetes bounds namespaces, node names and service accounts (<= 253 characters).
# Everything else gets more room: composite uids ("<cluster>/networking.istio.io/
# ServiceEntry/<ns>/<name>/<addr>") and istiod's synthesized policy names
# ("istio_allow_waypoint_<ns>_<name>") exceed 253. Longer is a broken or hostile server.
MAX_NAME_LEN: Final = 253
MAX_KEY_LEN: Final = 1024


class Rejected(Exception):
    """A resource failed validation; the message is the NACK reason."""


def _known(enum: Any) -> frozenset[int]:
    return frozenset(enum.DESCRIPTOR.values_by_number)


def _enum_name(enum: Any, value: int) -> str:
    v = enum.DESCRIPTOR.values_by_number.get(value)
    return v.name if v is not None else str(value)


# ztunnel converts enums strictly and does not support sending LEGACY_ISTIO_MTLS.
_TUNNEL_OK: Final = frozenset({wl_pb.NONE, wl_pb.HBONE})
_WORKLOAD_TYPE_OK: Final = _known(wl_pb.WorkloadType)
_STATUS_OK: Final = _known(wl_pb.WorkloadStatus)
_NETWORK_MODE_OK: Final = _known(wl_pb.NetworkMode)
_APP_TUNNEL_OK: Final = _known(wl_pb.ApplicationTunnel.Protocol)
_APP_PROTOCOL_OK: Final = _known(wl_pb.AppProtocol)
_IP_FAMILIES_OK: Final = _known(wl_pb.IPFamilies)
_LB_SCOPE_OK: Final = _known(wl_pb.LoadBalancing.Scope)
_LB_MODE_OK: Final = _known(wl_pb.LoadBalancing.Mode)
_LB_HEALTH_OK: Final = _known(wl_pb.LoadBalancing.HealthPolicy)
_VISIBILITY_OK: Final = _known(wl_pb.Service.Visibility)
_SCOPE_OK: Final = _known(authz_pb.Scope)
_ACTION_OK: Final = _known(authz_pb.Action)


def ip_from_bytes(raw: bytes) -> str:
    """Canonical text of a raw 4- or 16-byte IP (addr.from_bytes, as a Rejected)."""
    try:
        return addr.from_bytes(raw)
    except ValueError as e:
        raise Rejected(str(e)) from None


canonical_ip: Final = addr.canonical  # the form snapshots and the sink use


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


def _check_gateway(what: str, gw: Any) -> None:
    if gw.WhichOneof("destination") == "address":
        try:
            _check_prefix(what, gw.address.address, None)
        except Rejected as e:
            raise Rejected(f"{what}: {e}") from None
    elif gw.WhichOneof("destination") == "hostname":
        _check_len(f"{what} namespace", gw.hostname.namespace)
        _check_len(f"{what} hostname", gw.hostname.hostname, MAX_KEY_LEN)


def _check_ports(what: str, ports: Iterable[Any]) -> None:
    for p in ports:
        if p.app_protocol not in _APP_PROTOCOL_OK:
            raise Rejected(f"{what}: unknown app_protocol value {p.app_protocol}")
        if p.service_port > 0xFFFF or p.target_port > 0xFFFF:
            raise Rejected(f"{what}: port out of range")


@dataclass(frozen=True, slots=True)
class WorkloadRecord:
    """What the plugin keeps of an accepted istio.workload.Workload."""

    uid: str
    name: str
    namespace: str
    node: str
    network: str
    addresses: tuple[str, ...]
    tunnel_protocol: int
    native_tunnel: bool
    network_mode: int
    service_account: str
    trust_domain: str
    version: str = ""

    @property
    def in_mesh(self) -> bool:
        """Captured by ztunnel: HBONE and not a native tunnel endpoint (sidecar, waypoint)."""
        return self.tunnel_protocol == wl_pb.HBONE and not self.native_tunnel

    @property
    def host_network(self) -> bool:
        return self.network_mode == wl_pb.HOST_NETWORK

    @property
    def identity(self) -> str:
        td = self.trust_domain or "cluster.local"
        return f"spiffe://{td}/ns/{self.namespace}/sa/{self.service_account or 'default'}"


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    hostname: str
    addresses: tuple[str, ...]
    version: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizationRecord:
    namespace: str
    name: str
    scope: int
    action: int
    policy: Message = field(compare=False, repr=False)
    version: str = ""


def _qualifies(w: WorkloadRecord, node_name: str) -> bool:
    # HOST_NETWORK workloads share the node's IP: enrolling it would scope in everything
    # on the host, so they never qualify (ztunnel does not index their IPs either).
    return w.node == node_name and w.in_mesh and not w.host_network


def local_endpoint_ips(w: WorkloadRecord, node_name: str) -> tuple[str, ...]:
    """Addresses of w that belong in this node's endpoint map (none if it doesn't qualify).

    Only unicast pod addresses: loopback, multicast, link-local and the like never
    are (addr.refusal), whatever the server sends.
    """
    if not _qualifies(w, node_name):
        return ()
    return tuple(ip for ip in w.addresses if addr.refusal(ip) is None)


def decode_workload(name: str, w: Any, version: str = "") -> WorkloadRecord:
    """Validate a decoded Workload message; raise Rejected with the reason."""
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
        raise Rejected(f"unsupported tunnel protocol: {_enum_name(wl_pb.TunnelProtocol, tp)}")
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
    return WorkloadRecord(
        uid=uid,
        name=w.name,
        namespace=w.namespace,
        node=w.node,
        network=w.network,
        addresses=tuple(addrs),
        tunnel_protocol=tp,
        native_tunnel=w.native_tunnel,
        network_mode=w.network_mode,
        service_account=w.service_account,
        trust_domain=w.trust_domain,
        version=version,
    )


def decode_service(name: str, s: Any, version: str = "") -> ServiceRecord:
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
    return ServiceRecord(s.namespace, s.name, s.hostname, tuple(addrs), version)


def decode_authorization(name: str, a: Any, version: str = "") -> AuthorizationRecord:
    _check_len("namespace", a.namespace)
    _check_len("name", a.name, MAX_KEY_LEN)
    key = f"{a.namespace}/{a.name}"
    if not a.name or key != name:
        raise Rejected(f"resource name does not match authorization {key[:MAX_KEY_LEN]!r}")
    _check_enum("scope", a.scope, _SCOPE_OK)
    _check_enum("action", a.action, _ACTION_OK)
    for group in a.groups:
        for rules in group.rules:
            for m in rules.matches:
                for what in (
                    "source_ips",
                    "not_source_ips",
                    "destination_ips",
                    "not_destination_ips",
                ):
                    for cidr in getattr(m, what):
                        try:
                            _check_prefix(what, cidr.address, cidr.length)
                        except Rejected as e:
                            raise Rejected(f"{what}: {e}") from None
                for port in (*m.destination_ports, *m.not_destination_ports):
                    if port > 0xFFFF:
                        raise Rejected(f"port {port} out of range")
    return AuthorizationRecord(a.namespace, a.name, a.scope, a.action, a, version)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view for the reconciler."""

    version: int
    complete: bool  # the first response of every subscribed type has been applied
    endpoints: frozenset[str]  # this node's in-mesh endpoint IPs, canonical text


@dataclass(slots=True)
class ApplyResult:
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    updated: int = 0
    removed: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.updated or self.removed)


Listener = Callable[[int], None]


class WorkloadState:
    """Accepted xDS state plus the node-local endpoint index."""

    def __init__(self, node_name: str, types: Collection[str] = SUBSCRIBED_TYPES) -> None:
        self.node_name = node_name
        self.types = tuple(types)
        self.workloads: dict[str, WorkloadRecord] = {}
        self.services: dict[str, ServiceRecord] = {}
        self.authorizations: dict[str, AuthorizationRecord] = {}
        self.version = 0
        self._synced: set[str] = set()
        # (network, ip) -> uid, for duplicate detection (HOST_NETWORK excluded).
        self._ip_owner: dict[tuple[str, str], str] = {}
        # this node's endpoint ip -> uids claiming it (normally one).
        self._local: dict[str, set[str]] = {}
        # uid -> {ip: reason} of this node's addresses never enrolled (logged once each).
        self.refused: dict[str, dict[str, str]] = {}
        self.refused_total = 0  # (workload, address) refusals so far
        self._snapshot: Snapshot | None = None
        self._listeners: list[Listener] = []

    # --- reading ---------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._synced.issuperset(self.types)

    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is None or snap.version != self.version:
            snap = Snapshot(self.version, self.complete, frozenset(self._local))
            self._snapshot = snap
        return snap

    def held(self, type_url: str) -> dict[str, str]:
        """Names held for type_url -> the server version each came with."""
        if type_url == ADDRESS_TYPE:
            out = {n: w.version for n, w in self.workloads.items()}
            out.update((n, s.version) for n, s in self.services.items())
            return out
        if type_url == AUTHORIZATION_TYPE:
            return {n: a.version for n, a in self.authorizations.items()}
        return {}

    def subscribe(self, listener: Listener) -> None:
        """Call listener(version) after every change (same thread, never per resource)."""
        self._listeners.append(listener)

    # --- writing ---------------------------------------------------------------
    def mark_synced(self, type_url: str) -> None:
        """The first response of type_url has been applied."""
        if type_url in self._synced:
            return
        was = self.complete
        self._synced.add(type_url)
        if self.complete and not was:
            _log.info("xds.state_complete", version=self.version + 1, workloads=len(self.workloads))
            self._bump()

    def apply(
        self, type_url: str, resources: Iterable[Any], removed: Iterable[str] = ()
    ) -> ApplyResult:
        """Apply one response: resources are envoy Resource messages, removed are names.

        Validation happens before anything changes, so a failure (even an unexpected
        exception) leaves the state as it was.
        """
        result = ApplyResult()
        removed_set = set(removed)
        if type_url == ADDRESS_TYPE:
            self._apply_addresses(resources, removed_set, result)
        elif type_url == AUTHORIZATION_TYPE:
            self._apply_authorizations(resources, removed_set, result)
        else:
            result.rejected.extend((r.name, f"unsupported type {type_url}") for r in resources)
        if result.changed:
            self._bump()
        return result

    def _bump(self) -> None:
        self.version += 1
        for listener in self._listeners:
            listener(self.version)

    @staticmethod
    def _unpack(res: Any, type_url: str, cls: Any) -> Any:
        if not res.HasField("resource"):
            raise Rejected("resource has no body")
        body = res.resource
        if body.type_url != type_url:
            raise Rejected(f"resource type {body.type_url[:MAX_NAME_LEN]!r} is not {type_url}")
        try:
            return cls.FromString(body.value)
        except Exception as e:  # upb raises DecodeError; be safe against anything else
            raise Rejected(f"cannot decode: {str(e)[:MAX_NAME_LEN]}") from None

    def _candidates(
        self,
        resources: Iterable[Any],
        type_url: str,
        decode: Callable[[Any], Any],
        result: ApplyResult,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for res in resources:
            name = res.name
            try:
                if not name:
                    raise Rejected("resource has no name")
                _check_len("resource name", name, MAX_KEY_LEN)
                # the version is held and may be sent back (send_versions): bounded
                _check_len("resource version", res.version, MAX_KEY_LEN)
                if name in out:
                    raise Rejected("resource appears twice in one response")
                out[name] = decode(res)
            except Rejected as e:
                result.rejected.append((name[:MAX_KEY_LEN], str(e)))
            except Exception as e:  # a validator bug must cost one resource, not the agent
                _log.error("xds.validate_failed", type_url=type_url, error=repr(e)[:MAX_KEY_LEN])
                result.rejected.append((name[:MAX_KEY_LEN], f"internal error: {type(e).__name__}"))
        return out

    def _apply_addresses(
        self, resources: Iterable[Any], removed: set[str], result: ApplyResult
    ) -> None:
        def decode(res: Any) -> WorkloadRecord | ServiceRecord:
            addr = self._unpack(res, ADDRESS_TYPE, wl_pb.Address)
            kind = addr.WhichOneof("type")
            if kind == "workload":
                return decode_workload(res.name, addr.workload, res.version)
            if kind == "service":
                return decode_service(res.name, addr.service, res.version)
            raise Rejected("address is neither a workload nor a service")

        cands = self._candidates(resources, ADDRESS_TYPE, decode, result)
        removed -= cands.keys()  # a name both removed and sent ends up present
        for name, reason in self._duplicate_ips(cands, removed).items():
            del cands[name]
            result.rejected.append((name, reason))

        for name in removed:
            self.refused.pop(name, None)
            if self._drop_workload(name) or self.services.pop(name, None) is not None:
                result.removed += 1
        for name, rec in cands.items():
            if isinstance(rec, WorkloadRecord):
                self.services.pop(name, None)
                self._drop_workload(name)
                self._put_workload(rec)
            else:
                self.refused.pop(name, None)
                self._drop_workload(name)
                self.services[name] = rec
            result.updated += 1

    def _duplicate_ips(self, cands: dict[str, Any], removed: set[str]) -> dict[str, str]:
        """Workload candidates that would share a (network, ip) with another workload.

        Existing holders win over newcomers, earlier candidates over later ones. A
        rejected candidate keeps its previous version, whose addresses may in turn
        conflict with a candidate accepted earlier: those are rejected too, and so on.
        Linear in the addresses involved: one pass over the candidates, then every
        rejection un-frees its old addresses once, found through an index by address.
        """

        def keys(w: WorkloadRecord) -> list[tuple[str, str]]:
            return [] if w.host_network else [(w.network, ip) for ip in w.addresses]

        # Addresses released by this response, if every candidate is accepted.
        freed: set[tuple[str, str]] = set()
        for n in removed | cands.keys():
            old = self.workloads.get(n)
            if old is not None:
                freed.update(keys(old))
        claimed: dict[tuple[str, str], str] = {}  # address -> accepted candidate
        rejected: dict[str, str] = {}
        for n, c in cands.items():
            if not isinstance(c, WorkloadRecord):
                continue
            ks = keys(c)
            for k in ks:
                holder = claimed.get(k)
                if holder is None and k not in freed:
                    holder = self._ip_owner.get(k)
                if holder is not None and holder != n:
                    rejected[n] = f"duplicate address {k[1]}: already held by {holder}"
                    break
            else:
                claimed.update(dict.fromkeys(ks, n))
        # A rejected candidate keeps its old addresses: whoever claimed one loses it.
        queue = deque(rejected)
        while queue:
            r = queue.popleft()
            old = self.workloads.get(r)
            if old is None:
                continue
            for k in keys(old):
                c = claimed.get(k)
                if c is not None and c != r and c not in rejected:
                    rejected[c] = f"duplicate address {k[1]}: already held by {r}"
                    queue.append(c)
        return rejected

    def _put_workload(self, w: WorkloadRecord) -> None:
        self.workloads[w.uid] = w
        if not w.host_network:
            for ip in w.addresses:
                self._ip_owner[(w.network, ip)] = w.uid
        if not _qualifies(w, self.node_name):
            self.refused.pop(w.uid, None)
            return
        refused: dict[str, str] = {}
        for ip in w.addresses:
            reason = addr.refusal(ip)
            if reason is None:
                self._local.setdefault(ip, set()).add(w.uid)
            else:
                refused[ip] = reason
        before = self.refused.get(w.uid, {})
        for ip, reason in refused.items():
            if ip not in before:  # once per workload and address, not per push
                self.refused_total += 1
                _log.warning("xds.address_refused", uid=w.uid, ip=ip, reason=reason)
        if refused:
            self.refused[w.uid] = refused
        else:
            self.refused.pop(w.uid, None)

    def _drop_workload(self, uid: str) -> bool:
        w = self.workloads.pop(uid, None)
        if w is None:
            return False
        if not w.host_network:
            for ip in w.addresses:
                key = (w.network, ip)
                if self._ip_owner.get(key) == uid:
                    del self._ip_owner[key]
        if _qualifies(w, self.node_name):
            for ip in w.addresses:  # refused ones are simply not in the index
                owners = self._local.get(ip)
                if owners is not None:
                    owners.discard(uid)
                    if not owners:
                        del self._local[ip]
        return True

    def _apply_authorizations(
        self, resources: Iterable[Any], removed: set[str], result: ApplyResult
    ) -> None:
        def decode(res: Any) -> AuthorizationRecord:
            a = self._unpack(res, AUTHORIZATION_TYPE, authz_pb.Authorization)
            return decode_authorization(res.name, a, res.version)

        cands = self._candidates(resources, AUTHORIZATION_TYPE, decode, result)
        for name in removed - cands.keys():
            if self.authorizations.pop(name, None) is not None:
                result.removed += 1
        self.authorizations.update(cands)
        result.updated += len(cands)


def endpoints_of(workloads: Mapping[str, WorkloadRecord], node_name: str) -> frozenset[str]:
    """Brute-force recomputation of the endpoint set (tests and audits)."""
    return frozenset(ip for w in workloads.values() for ip in local_endpoint_ips(w, node_name))
