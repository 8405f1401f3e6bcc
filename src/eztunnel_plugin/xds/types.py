"""The resource types the agent subscribes to, in the order it subscribes (as ztunnel)."""

from __future__ import annotations

from typing import Final

ADDRESS_TYPE: Final = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE: Final = "type.googleapis.com/istio.security.Authorization"
# Address first: workloads decide what is enrolled, policies only complete the view.
SUBSCRIBED_TYPES: Final = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
