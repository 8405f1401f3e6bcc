"""The view is the API's whole contract with the agent: the agent's adapter and the test
fake implement exactly it, and every API entry point takes it (never the Agent)."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from eztunnel_plugin import agent
from eztunnel_plugin.api import admin, inspector, metrics, view

from .fake_view import FakeView


def members(protocol: type) -> dict[str, object]:
    """The names a Protocol declares, its bases' included (object and Protocol left out)."""
    out: dict[str, object] = {}
    for cls in reversed(protocol.__mro__):
        if cls in (object, typing.Protocol, typing.Generic):
            continue
        out.update({n: v for n, v in vars(cls).items() if not n.startswith("_")})
    return out


def public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_the_protocols_declare_what_the_api_uses() -> None:
    read = members(view.AgentView)
    assert {"ready", "stale", "owners", "xds", "counters", "flow_page", "subscribe"} <= set(read)
    assert "set_enabled" not in read  # the read-only view cannot change anything
    assert set(members(view.AdminView)) - set(read) == {"set_enabled"}


@pytest.mark.parametrize("impl", [agent.View, FakeView], ids=["agent.View", "FakeView"])
def test_an_implementation_has_every_member_with_its_signature(impl: type) -> None:
    for name, declared in members(view.AdminView).items():
        assert hasattr(impl, name) or name in getattr(impl, "__dataclass_fields__", {}), name
        if isinstance(declared, property) and isinstance(getattr(impl, name, None), property):
            continue
        if callable(declared) and not isinstance(declared, property):
            got = inspect.signature(getattr(impl, name))
            want = inspect.signature(declared)
            assert list(got.parameters) == list(want.parameters), name
            assert [p.kind for p in got.parameters.values()] == [
                p.kind for p in want.parameters.values()
            ], name


def test_the_agents_view_offers_nothing_beyond_the_protocol() -> None:
    # Narrow: no way from the view to the Agent, its config, state or maps.
    assert public(agent.View) == set(members(view.AdminView))
    assert list(inspect.signature(agent.View.__init__).parameters) == ["self", "agent"]


@pytest.mark.parametrize(
    ("fn", "param", "want"),
    [
        (inspector.start, "view", view.AgentView),
        (inspector.Inspector.__init__, "view", view.AgentView),
        (metrics.start, "view", view.AgentView),
        (metrics.render, "view", view.AgentView),
        (admin.start, "view", view.AdminView),
        (admin.Admin.__init__, "view", view.AdminView),
    ],
)
def test_every_api_entry_point_takes_the_view(fn: object, param: str, want: type) -> None:
    assert typing.get_type_hints(fn)[param] is want


def test_what_the_view_returns_cannot_be_written_back() -> None:
    records = [
        view.Owner("u", "n", "ns"),
        view.DataplaneStatus(True, False, (), 1, (15001,)),
        view.XdsStatus("a", True, True, False, 0, 1, 0, "", ()),
        view.FileStatus("", 0),
        view.FlowPage([], None),
    ]
    for record in records:
        field = next(iter(vars(record)))
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field, None)
