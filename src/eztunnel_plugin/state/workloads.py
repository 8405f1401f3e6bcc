"""The node's view of the mesh: workloads, services and authorizations, as records.

Keys are the names the source gives them: a workload's uid, a service's
"namespace/hostname", an authorization's "namespace/name". Every batch is applied as
one step: the accepted records replace their entries whole, the removals go, and one
new snapshot version is made. A record that would share an address with another
workload is refused (the caller reports it) and the previous record stays, as ztunnel
does.

The node's in-mesh endpoints (the addresses the BPF endpoint map must hold) are kept
as an index updated with each change, so a snapshot costs O(local endpoints).

Nothing here knows where the records come from: decoding and validating the wire
format is the xDS package's job, and so are resource versions.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from eztunnel_plugin import addr, log
from eztunnel_plugin.state.snapshot import Listener, Snapshot

_log = log.get(__name__)

# The parts of the view that must each have arrived once before it is complete.
ADDRESSES: Final = "addresses"  # workloads and services
AUTHORIZATIONS: Final = "authorizations"
PARTS: Final = (ADDRESSES, AUTHORIZATIONS)


@dataclass(frozen=True, slots=True)
class WorkloadRecord:
    """What the plugin keeps of a workload."""

    uid: str
    name: str
    namespace: str
    node: str
    network: str
    addresses: tuple[str, ...]  # canonical text (addr.canonical), no duplicates
    hbone: bool  # reached over HBONE; otherwise plain (no tunnel)
    native_tunnel: bool  # terminates HBONE itself (sidecar, waypoint)
    host_network: bool  # shares the node's network namespace
    service_account: str
    trust_domain: str

    @property
    def in_mesh(self) -> bool:
        """Captured by ztunnel: HBONE and not a native tunnel endpoint (sidecar, waypoint)."""
        return self.hbone and not self.native_tunnel

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


class PolicyScope(enum.Enum):
    GLOBAL = "global"
    NAMESPACE = "namespace"
    WORKLOAD_SELECTOR = "workload_selector"


class PolicyAction(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class AuthorizationRecord:
    namespace: str
    name: str
    scope: PolicyScope
    action: PolicyAction


AddressRecord = WorkloadRecord | ServiceRecord


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


@dataclass(slots=True)
class ApplyResult:
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    updated: int = 0
    removed: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.updated or self.removed)


class WorkloadState:
    """The accepted records plus the node-local endpoint index."""

    def __init__(self, node_name: str, parts: Collection[str] = PARTS) -> None:
        self.node_name = node_name
        self.parts = tuple(parts)
        self.workloads: dict[str, WorkloadRecord] = {}
        self.services: dict[str, ServiceRecord] = {}
        self.authorizations: dict[str, AuthorizationRecord] = {}
        self.version = 0
        self._synced: set[str] = set()
        # network -> ip -> uid, for duplicate detection (HOST_NETWORK excluded). Nested,
        # not keyed by (network, ip): that is a 64-byte tuple per address of the mesh.
        self._ip_owner: dict[str, dict[str, str]] = {}
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
        """Every part has arrived once: the view is whole and may be written out."""
        return self._synced.issuperset(self.parts)

    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is None or snap.version != self.version:
            snap = Snapshot(self.version, self.complete, frozenset(self._local))
            self._snapshot = snap
        return snap

    def subscribe(self, listener: Listener) -> None:
        """Call listener(version) after every change (same thread, never per record)."""
        self._listeners.append(listener)

    # --- writing ---------------------------------------------------------------
    def mark_synced(self, part: str) -> None:
        """The first full batch of part (ADDRESSES, AUTHORIZATIONS) has been applied."""
        if part in self._synced:
            return
        was = self.complete
        self._synced.add(part)
        if self.complete and not was:
            _log.info("xds.state_complete", version=self.version + 1, workloads=len(self.workloads))
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        for listener in self._listeners:
            listener(self.version)

    def apply_addresses(
        self, updates: Mapping[str, AddressRecord], removals: Iterable[str] = ()
    ) -> ApplyResult:
        """Apply one batch of workloads and services (by name) and removals (names).

        A name both updated and removed ends up present. The duplicate-address check
        runs before anything changes, so a failure leaves the state as it was.
        """
        result = ApplyResult()
        cands = dict(updates)
        removed = set(removals) - cands.keys()
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
                self._put_workload(name, rec)
            else:
                self.refused.pop(name, None)
                self._drop_workload(name)
                self.services[name] = rec
            result.updated += 1
        if result.changed:
            self._bump()
        return result

    def apply_authorizations(
        self, updates: Mapping[str, AuthorizationRecord], removals: Iterable[str] = ()
    ) -> ApplyResult:
        """Apply one batch of authorizations (by name) and removals (names)."""
        result = ApplyResult()
        for name in set(removals) - updates.keys():
            if self.authorizations.pop(name, None) is not None:
                result.removed += 1
        self.authorizations.update(updates)
        result.updated += len(updates)
        if result.changed:
            self._bump()
        return result

    def _duplicate_ips(self, cands: dict[str, AddressRecord], removed: set[str]) -> dict[str, str]:
        """Workload candidates that would share a (network, ip) with another workload.

        Existing holders win over newcomers, earlier candidates over later ones. A
        rejected candidate keeps its previous record, whose addresses may in turn
        conflict with a candidate accepted earlier: those are rejected too, and so on.
        Linear in the addresses involved: one pass over the candidates, then every
        rejection un-frees its old addresses once, found through an index by address.
        """

        def keys(w: WorkloadRecord) -> list[tuple[str, str]]:
            return [] if w.host_network else [(w.network, ip) for ip in w.addresses]

        # Addresses released by this batch, if every candidate is accepted.
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
                    holder = self._ip_owner.get(k[0], {}).get(k[1])
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
                taker = claimed.get(k)
                if taker is not None and taker != r and taker not in rejected:
                    rejected[taker] = f"duplicate address {k[1]}: already held by {r}"
                    queue.append(taker)
        return rejected

    def _put_workload(self, key: str, w: WorkloadRecord) -> None:
        self.workloads[key] = w
        if not w.host_network:
            owners = self._ip_owner.setdefault(w.network, {})
            for ip in w.addresses:
                owners[ip] = key
        if not _qualifies(w, self.node_name):
            self.refused.pop(key, None)
            return
        refused: dict[str, str] = {}
        for ip in w.addresses:
            reason = addr.refusal(ip)
            if reason is None:
                self._local.setdefault(ip, set()).add(key)
            else:
                refused[ip] = reason
        before = self.refused.get(key, {})
        for ip, reason in refused.items():
            if ip not in before:  # once per workload and address, not per push
                self.refused_total += 1
                _log.warning("xds.address_refused", uid=w.uid, ip=ip, reason=reason)
        if refused:
            self.refused[key] = refused
        else:
            self.refused.pop(key, None)

    def _drop_workload(self, key: str) -> bool:
        w = self.workloads.pop(key, None)
        if w is None:
            return False
        owned = None if w.host_network else self._ip_owner.get(w.network)
        if owned is not None:
            for ip in w.addresses:
                if owned.get(ip) == key:
                    del owned[ip]
            if not owned:
                del self._ip_owner[w.network]
        if _qualifies(w, self.node_name):
            for ip in w.addresses:  # refused ones are simply not in the index
                owners = self._local.get(ip)
                if owners is not None:
                    owners.discard(key)
                    if not owners:
                        del self._local[ip]
        return True


def endpoints_of(workloads: Mapping[str, WorkloadRecord], node_name: str) -> frozenset[str]:
    """Brute-force recomputation of the endpoint set (tests and audits)."""
    return frozenset(ip for w in workloads.values() for ip in local_endpoint_ips(w, node_name))
