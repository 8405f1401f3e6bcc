"""xds.types: the type URLs name the messages decoded for them, Address first."""

from __future__ import annotations

from eztunnel_plugin.pb.istio.security import authorization_pb2 as az
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl
from eztunnel_plugin.state.workloads import WorkloadState
from eztunnel_plugin.xds import decode
from eztunnel_plugin.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE, SUBSCRIBED_TYPES
from eztunnel_plugin.xds.updater import state_watches
from tests.state.testlib import NODE

PREFIX = "type.googleapis.com/"


def test_type_urls_name_their_messages() -> None:
    assert PREFIX + wl.Address.DESCRIPTOR.full_name == ADDRESS_TYPE
    assert PREFIX + az.Authorization.DESCRIPTOR.full_name == AUTHORIZATION_TYPE
    for decoder in (decode.ADDRESS, decode.AUTHORIZATION):
        assert decoder.type_url == PREFIX + decoder.message.DESCRIPTOR.full_name


def test_subscription_order_and_handlers() -> None:
    assert SUBSCRIBED_TYPES == (ADDRESS_TYPE, AUTHORIZATION_TYPE)  # Address first
    assert [w.type_url for w in state_watches(WorkloadState(NODE))] == list(SUBSCRIBED_TYPES)
