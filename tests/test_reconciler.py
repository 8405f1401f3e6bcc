"""Reconciler: differences only, safe write order, fail closed, convergence, retries."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from eztunnel_plugin.bpf import layout, maps, syscalls
from eztunnel_plugin.errors import BpfError
from eztunnel_plugin.reconciler import EZ_EP_ENROLLED, MemorySink, Reconciler, plan
from eztunnel_plugin.state.snapshot import Snapshot
from eztunnel_plugin.state.workloads import ADDRESSES, AUTHORIZATIONS, WorkloadState
from tests.state import testlib
from tests.state.testlib import NODE, by_uid, workload
from tests.xds.testlib import run


def complete_state(*ips: str) -> WorkloadState:
    return testlib.complete_state(*(workload(f"u/{ip}", ip) for ip in ips))


def test_enrolled_flag_matches_bpf_header() -> None:
    assert EZ_EP_ENROLLED == 1


def test_fail_closed_until_every_type_synced() -> None:
    s = WorkloadState(NODE)
    sink = MemorySink({"10.9.9.9": 1})  # left by a previous agent
    rec = Reconciler(s, sink)
    s.apply_addresses(by_uid(workload("u/a", "10.0.0.1")))
    s.mark_synced(ADDRESSES)
    assert rec.reconcile() is False
    assert sink.entries == {"10.9.9.9": 1} and sink.ops == []  # untouched, nothing enrolled
    s.mark_synced(AUTHORIZATIONS)
    assert rec.reconcile() is True
    assert sink.entries == {"10.0.0.1": 1}
    assert rec.applied_version == s.version
    assert rec.reconcile() is False  # nothing new: no writes
    assert len(sink.ops) == 2


class OddSpellingSink(MemorySink):
    """Reads back the same addresses spelled differently (v4-mapped, upper case)."""

    def read_all(self) -> dict[str, int]:
        odd = {"10.0.0.9": "::ffff:10.0.0.9", "fd00::1": "FD00:0::0001"}
        return {odd.get(k, k): v for k, v in self.entries.items()}


def test_converges_preexisting_map_and_orders_writes() -> None:
    s = complete_state("10.0.0.1", "10.0.0.2", "fd00::1")
    sink = OddSpellingSink(
        {
            "10.0.0.1": EZ_EP_ENROLLED,  # already right: no write
            "10.0.0.2": EZ_EP_ENROLLED | 0b110,  # extra flag bits: narrowed
            "10.0.0.9": EZ_EP_ENROLLED,  # gone: deleted
            "fd00::1": 0,  # present without the flag: widened
        }
    )
    Reconciler(s, sink).reconcile()
    assert sink.entries == {"10.0.0.1": 1, "10.0.0.2": 1, "fd00::1": 1}
    kinds = [(op, ip) for op, ip, _ in sink.ops]
    assert sorted(kinds) == [("delete", "10.0.0.9"), ("put", "10.0.0.2"), ("put", "fd00::1")]
    assert kinds[-1] == ("put", "fd00::1")  # reductions (delete, narrowing) come first


def test_plan_splits_reduce_and_grow() -> None:
    reduce, grow = plan({"a": 0b011, "b": 1, "c": 0b100}, {"a": 0b110, "b": 1, "d": 1})
    assert sorted(reduce) == [("a", 0b010), ("c", 0)]
    assert sorted(grow) == [("a", 0b110), ("d", 1)]


@settings(max_examples=200, deadline=None)
@given(
    old=st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 7)),
    new=st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 7)),
)
def test_every_intermediate_map_is_within_old_or_new(
    old: dict[str, int], new: dict[str, int]
) -> None:
    m = dict(old)
    reduce, grow = plan(old, new)
    for ip, flags in reduce:
        if flags:
            m[ip] = flags
        else:
            m.pop(ip)
        # while reducing, every entry grants at most what the old map granted
        assert all(f & ~old.get(ip, 0) == 0 for ip, f in m.items())
    for ip, flags in grow:
        m[ip] = flags
        # while growing, at most what the new map grants
        assert all(f & ~new.get(ip, 0) == 0 for ip, f in m.items())
    assert {k: v for k, v in m.items() if v} == new


class RawSource:
    """A snapshot source that hands over whatever it is given (no filtering of its own)."""

    def __init__(self, *endpoints: str) -> None:
        self.endpoints = frozenset(endpoints)
        self.version = 1

    def snapshot(self) -> Snapshot:
        return Snapshot(self.version, True, self.endpoints)

    def subscribe(self, listener: object) -> None:
        pass


def test_never_writes_a_non_enrollable_address() -> None:
    bad = {"127.0.0.1", "::1", "0.0.0.0", "224.0.0.1", "169.254.169.254", "fe80::1", "junk"}
    src = RawSource("10.0.0.1", "fd00::1", *bad)
    sink = MemorySink({"127.0.0.1": 1, "10.0.0.1": 1})  # a loopback entry left behind
    rec = Reconciler(src, sink)
    with capture_logs() as logs:
        assert rec.reconcile()
    assert sink.entries == {"10.0.0.1": 1, "fd00::1": 1}  # the stray one is removed too
    assert ("delete", "127.0.0.1", 0) in sink.ops
    assert rec.refused == len(bad)
    assert len([e for e in logs if e["event"] == "reconcile.address_refused"]) == len(bad)
    src.version = 2
    src.endpoints |= {"10.0.0.2"}
    with capture_logs() as logs:
        rec.reconcile()
    assert sink.entries == {"10.0.0.1": 1, "fd00::1": 1, "10.0.0.2": 1}
    assert rec.refused == len(bad)  # counted and logged once per address
    assert not [e for e in logs if e["event"] == "reconcile.address_refused"]


class FlakySink(MemorySink):
    def __init__(self, fail_on: set[int]) -> None:
        super().__init__()
        self.calls = 0
        self.fail_on = fail_on

    def put(self, ip: str, flags: int) -> None:
        self.calls += 1
        if self.calls in self.fail_on:
            raise OSError("E2BIG: map full")
        super().put(ip, flags)


def test_run_retries_sink_errors_and_follows_changes() -> None:
    async def body() -> None:
        s = complete_state("10.0.0.1", "10.0.0.2")
        sink = FlakySink(fail_on={2, 3})
        rec = Reconciler(s, sink, retry_initial=0.01, retry_max=0.02)
        task = asyncio.create_task(rec.run())
        try:
            await asyncio.wait_for(rec.wait_applied(s.version), 5)
            assert rec.errors == 2
            assert sink.entries == {"10.0.0.1": 1, "10.0.0.2": 1}
            s.apply_addresses(by_uid(workload("u/10.0.0.3", "10.0.0.3")), ["u/10.0.0.1"])
            await asyncio.wait_for(rec.wait_applied(s.version), 5)
            assert sink.entries == {"10.0.0.2": 1, "10.0.0.3": 1}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run(body())


def test_resync_rereads_the_map() -> None:
    s = complete_state("10.0.0.1")
    sink = MemorySink()
    rec = Reconciler(s, sink)
    rec.reconcile()
    sink.entries["10.6.6.6"] = 1  # someone wrote behind our back
    del sink.entries["10.0.0.1"]
    rec.reconcile()
    assert "10.6.6.6" in sink.entries  # diffs only: no re-read without cause
    rec.resync()
    rec.reconcile()
    assert sink.entries == {"10.0.0.1": 1}


@pytest.mark.kernel
def test_against_real_endpoint_map() -> None:
    """The reconciler on maps.EndpointMap over an anonymous BPF hash map (no program)."""
    try:
        fd = syscalls.map_create(
            syscalls.MAP_TYPE_HASH, ctypes.sizeof(layout.Addr), ctypes.sizeof(layout.Endpoint), 64
        )
    except BpfError as e:
        pytest.skip(f"cannot create a BPF map here: {e}")
    try:
        ep = maps.EndpointMap(fd)
        ep.put("10.0.0.9", EZ_EP_ENROLLED)  # left by a previous agent, gone now
        ep.put("10.0.0.2", EZ_EP_ENROLLED | 0b10)
        ep.put("127.0.0.1", EZ_EP_ENROLLED)  # never valid: removed by the first write
        s = complete_state("10.0.0.1", "10.0.0.2", "fd00::1")
        rec = Reconciler(s, ep)
        rec.reconcile()
        assert ep.read_all() == {"10.0.0.1": 1, "10.0.0.2": 1, "fd00::1": 1}
        s.apply_addresses(by_uid(workload("u/::ffff:10.0.0.7", "::ffff:10.0.0.7")), ["u/fd00::1"])
        rec.reconcile()
        assert ep.read_all() == {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.7": 1}
        # a local workload carrying loopback and metadata addresses: only its pod address
        s.apply_addresses(
            by_uid(workload("u/odd", "127.0.0.1", "::1", "169.254.169.254", "10.0.0.8"))
        )
        rec.reconcile()
        assert ep.read_all() == {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.7": 1, "10.0.0.8": 1}
        assert s.refused_total == 3
    finally:
        os.close(fd)
