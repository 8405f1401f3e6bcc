"""The Handlers that feed a WorkloadState (ztunnel's ProxyStateUpdater).

The one place that knows both sides: which state part each xDS type fills, and how a
state refusal becomes a NACK reason. The state itself knows nothing of xDS.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from eztunnel_plugin.state.workloads import (
    ADDRESSES,
    AUTHORIZATIONS,
    AddressRecord,
    AuthorizationRecord,
    WorkloadState,
)
from eztunnel_plugin.xds import decode
from eztunnel_plugin.xds.client import Subscription, Watch
from eztunnel_plugin.xds.handler import Rejection


class AddressHandler:
    """istio.workload.Address: workloads and services."""

    def __init__(self, state: WorkloadState) -> None:
        self.state = state

    def handle(self, updates: Mapping[str, AddressRecord], removals: Set[str]) -> list[Rejection]:
        result = self.state.apply_addresses(updates, removals)
        return [Rejection(name, reason) for name, reason in result.rejected]

    def synced(self) -> None:
        self.state.mark_synced(ADDRESSES)


class AuthorizationHandler:
    """istio.security.Authorization: policies."""

    def __init__(self, state: WorkloadState) -> None:
        self.state = state

    def handle(
        self, updates: Mapping[str, AuthorizationRecord], removals: Set[str]
    ) -> list[Rejection]:
        result = self.state.apply_authorizations(updates, removals)
        return [Rejection(name, reason) for name, reason in result.rejected]

    def synced(self) -> None:
        self.state.mark_synced(AUTHORIZATIONS)


def state_watches(state: WorkloadState) -> list[Subscription]:
    """What XdsClient needs to feed state: one Watch per subscribed type."""
    return [
        Watch(decode.ADDRESS, AddressHandler(state)),
        Watch(decode.AUTHORIZATION, AuthorizationHandler(state)),
    ]
