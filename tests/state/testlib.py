"""Record builders for the state and reconciler tests: no protobuf, no xDS."""

from __future__ import annotations

from eztunnel_plugin import addr
from eztunnel_plugin.state.workloads import (
    ADDRESSES,
    AUTHORIZATIONS,
    AuthorizationRecord,
    PolicyAction,
    PolicyScope,
    ServiceRecord,
    WorkloadRecord,
    WorkloadState,
)

NODE = "node-1"


def workload(
    uid: str,
    *ips: str,
    node: str = NODE,
    hbone: bool = True,
    native_tunnel: bool = False,
    host_network: bool = False,
    network: str = "",
    namespace: str = "default",
) -> WorkloadRecord:
    return WorkloadRecord(
        uid=uid,
        name=uid.rsplit("/", 1)[-1],
        namespace=namespace,
        node=node,
        network=network,
        addresses=tuple(addr.canonical(ip) for ip in ips),
        hbone=hbone,
        native_tunnel=native_tunnel,
        host_network=host_network,
        service_account="",
        trust_domain="",
    )


def service(ns: str, hostname: str, *ips: str) -> ServiceRecord:
    return ServiceRecord(ns, hostname.split(".", 1)[0], hostname, ips)


def policy(ns: str, name: str) -> AuthorizationRecord:
    return AuthorizationRecord(ns, name, PolicyScope.NAMESPACE, PolicyAction.ALLOW)


def by_uid(*records: WorkloadRecord) -> dict[str, WorkloadRecord]:
    return {w.uid: w for w in records}


def complete_state(*records: WorkloadRecord, node: str = NODE) -> WorkloadState:
    """A state holding records whose every part has arrived."""
    s = WorkloadState(node)
    s.apply_addresses(by_uid(*records))
    s.mark_synced(ADDRESSES)
    s.mark_synced(AUTHORIZATIONS)
    return s
