"""The Handler contract: what the client hands a handler, and what it makes of the answer."""

from __future__ import annotations

from collections.abc import Mapping, Set

from eztunnel_plugin.state.workloads import AddressRecord, WorkloadRecord
from eztunnel_plugin.xds import decode
from eztunnel_plugin.xds.client import Watch
from eztunnel_plugin.xds.handler import Handler, Rejection
from tests.xds.testlib import bad_addr_res, wl_res


class Recording:
    """A Handler that keeps every call and refuses the names it is told to."""

    def __init__(self, refuse: Mapping[str, str] | None = None) -> None:
        self.refuse = dict(refuse or {})
        self.calls: list[tuple[dict[str, AddressRecord], set[str]]] = []
        self.syncs = 0

    def handle(self, updates: Mapping[str, AddressRecord], removals: Set[str]) -> list[Rejection]:
        self.calls.append((dict(updates), set(removals)))
        return [Rejection(n, why) for n, why in self.refuse.items() if n in updates]

    def synced(self) -> None:
        self.syncs += 1


def test_a_handler_gets_decoded_records_and_disjoint_removals() -> None:
    h = Recording()
    handler: Handler[AddressRecord] = h  # the Protocol, checked by mypy
    watch = Watch(decode.ADDRESS, handler)
    res = [wl_res("u/a", "10.0.0.1"), bad_addr_res("u/bad", b"\x01"), wl_res("u/b", "10.0.0.2")]
    applied = watch.apply(res, ["u/b", "u/gone", "u/bad"])
    ((updates, removals),) = h.calls  # one call per response, not per resource
    assert set(updates) == {"u/a", "u/b"}  # the decode failure never reaches the handler
    a = updates["u/a"]
    assert isinstance(a, WorkloadRecord) and a.addresses == ("10.0.0.1",)
    assert removals == {"u/gone", "u/bad"}  # u/b is resent: an update, not a removal
    assert applied.removed == {"u/gone", "u/bad"}
    assert applied.accepted == {"u/a": res[0].version, "u/b": res[2].version}
    assert [r.name for r in applied.rejected] == ["u/bad"]


def test_refusals_join_the_nack_and_are_not_accepted() -> None:
    h = Recording(refuse={"u/b": "no room"})
    watch = Watch(decode.ADDRESS, h)
    applied = watch.apply([bad_addr_res("u/x", b""), wl_res("u/a", "10.0.0.1"),
                           wl_res("u/b", "10.0.0.2")], [])  # fmt: skip
    assert applied.rejected == [
        ("u/x", "address 0: address has 0 bytes, want 4 or 16"),  # decode failures first
        ("u/b", "no room"),
    ]
    assert set(applied.accepted) == {"u/a"}


def test_synced_reaches_the_handler() -> None:
    h = Recording()
    watch = Watch(decode.ADDRESS, h)
    assert watch.type_url == decode.ADDRESS.type_url
    watch.synced()
    watch.synced()
    assert h.syncs == 2 and h.calls == []  # the client calls it once per stream
