"""The kernel self-test: its table and its decision (every branch, in process), where it
puts its cgroup, and the test itself on the real kernel: what it finds here, a failure
forced by injection and by an object that does not splice, and that it leaves nothing
behind on any path (a timeout included)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from eztunnel_plugin import selftest
from eztunnel_plugin.api.view import SelftestCheck
from eztunnel_plugin.bpf import paths
from eztunnel_plugin.errors import DataplaneError
from eztunnel_plugin.selftest import (
    ATTACH,
    ATTACH_WORKAROUND,
    CHECKS,
    NO_SPLICE,
    PLAIN,
    VERDICT,
    decide,
    lost_wakeup_listed,
)

from .bpf.conftest import build_object
from .conftest import PY, require_root

REPO = Path(__file__).resolve().parents[1]
kernel = pytest.mark.kernel
UNLISTED = "6.10.14"  # a release the table does not list (for runs that pretend)


def results(variant: str, failing: dict[str, str] | None = None) -> list[SelftestCheck]:
    failing = failing or {}
    return [
        SelftestCheck(selftest.check_name(n, variant), n not in failing, failing.get(n, ""))
        for n in CHECKS
    ]


# ---- the table --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "listed"),
    [
        ("6.6.127", False), ("6.6.128", True), ("6.6.130-cloud-amd64", True),
        ("6.12.74", False), ("6.12.75", True), ("6.12.79+deb13-amd64", True),
        ("6.18.13", False), ("6.18.14", True), ("6.18.44-fc-v1098", True),
        ("6.19", True), ("6.19.2", True), ("7.0.0-22-generic", True),
        ("6.10.14", False), ("6.13.5", False), ("6.1.150", False), ("5.15.0-91-generic", False),
        ("weird", None), ("", None),
    ],
)  # fmt: skip
def test_the_lost_wakeup_table(release: str, listed: bool | None) -> None:
    assert lost_wakeup_listed(release) is listed


def test_kernel_version_parses_distribution_releases() -> None:
    assert selftest.kernel_version("6.18.44-fc-v1098") == (6, 18, 44)
    assert selftest.kernel_version("6.19-rc3") == (6, 19, 0)
    assert selftest.kernel_version("linux") is None


# ---- the decision, every branch -----------------------------------------------------------


def test_unlisted_kernel_passing_plain_attaches_without_the_workaround() -> None:
    decision, reason = decide(UNLISTED, {PLAIN: results(PLAIN)})
    assert decision == ATTACH and "without the SK_SKB workaround" in reason


def test_unlisted_kernel_failing_plain_takes_the_workaround_if_it_passes() -> None:
    got = decide(UNLISTED, {PLAIN: results(PLAIN, {"epoll": "lost EPOLLIN"}),
                            VERDICT: results(VERDICT)})  # fmt: skip
    assert got[0] == ATTACH_WORKAROUND
    assert "epoll: lost EPOLLIN" in got[1] and "every check passed with it" in got[1]


def test_listed_kernel_takes_the_workaround_even_when_plain_passes() -> None:
    # The table is evidence from the field: a sub-second test may miss a racy stall.
    got = decide("6.12.80", {PLAIN: results(PLAIN), VERDICT: results(VERDICT)})
    assert got[0] == ATTACH_WORKAROUND and "known to lose epoll wakeups" in got[1]


def test_with_refuse_workaround_where_only_the_workaround_works_nothing_splices() -> None:
    both = {PLAIN: results(PLAIN), VERDICT: results(VERDICT)}
    got = decide("6.12.80", both, allow_workaround=False)
    assert got[0] == NO_SPLICE and "--refuse-workaround" in got[1], got
    # Where plain TCP's checks pass on an unlisted kernel, nothing needs the workaround.
    assert decide(UNLISTED, {PLAIN: results(PLAIN)}, allow_workaround=False)[0] == ATTACH


def test_listed_kernel_whose_workaround_fails_does_not_splice() -> None:
    failed = results(VERDICT, {"sendfile": "12 of 34 bytes"})
    got = decide("6.12.80", {PLAIN: results(PLAIN), VERDICT: failed})
    assert got[0] == NO_SPLICE and "sendfile: 12 of 34 bytes" in got[1]


def test_both_variants_failing_do_not_splice() -> None:
    got = decide(UNLISTED, {PLAIN: results(PLAIN, {"splice": "not spliced"}),
                            VERDICT: results(VERDICT, {"splice": "not spliced"})})  # fmt: skip
    assert got[0] == NO_SPLICE
    assert "without the SK_SKB workaround: splice" in got[1] and "with the workaround" in got[1]


def test_an_unrecognised_version_is_treated_as_listed() -> None:
    assert decide("weird", {PLAIN: results(PLAIN)})[0] == NO_SPLICE  # verdict never ran
    got = decide("weird", {PLAIN: results(PLAIN), VERDICT: results(VERDICT)})
    assert got[0] == ATTACH_WORKAROUND and "not recognised" in got[1]


def test_an_unbounded_reader_removes_the_variant_that_lets_it_grow() -> None:
    grows = {"unread_bounded": "a reader that never reads is not bounded: 99 bytes accepted"}
    got = decide(UNLISTED, {PLAIN: results(PLAIN, grows), VERDICT: results(VERDICT)})
    assert got[0] == ATTACH_WORKAROUND and "unread_bounded: a reader" in got[1]
    got = decide("6.18.44", {PLAIN: results(PLAIN), VERDICT: results(VERDICT, grows)})
    assert got[0] == NO_SPLICE and "with the workaround: unread_bounded: a reader" in got[1]


def test_a_test_that_could_not_run_does_not_splice() -> None:
    got = decide(UNLISTED, {PLAIN: results(PLAIN)}, error="loading x.o failed: EPERM")
    assert got == (NO_SPLICE, "the self-test could not run: loading x.o failed: EPERM")


def test_missing_or_partial_results_never_pass() -> None:
    assert decide(UNLISTED, {})[0] == NO_SPLICE
    partial = results(PLAIN)[:2]
    assert decide(UNLISTED, {PLAIN: partial, VERDICT: partial})[0] == NO_SPLICE


def test_variants_run_both_on_a_listed_kernel_and_the_workaround_only_on_failure() -> None:
    assert selftest.variants_for("6.18.44") == [PLAIN, VERDICT]
    assert selftest.variants_for("weird") == [PLAIN, VERDICT]
    assert selftest.variants_for(UNLISTED) == [PLAIN, f"{VERDICT}?"]


def test_result_rows_show_each_check_with_and_without_the_workaround() -> None:
    rows = selftest.result_rows([*results(PLAIN, {"fionread": "FIONREAD says 0"})])
    assert rows[0] == ("splice", "pass", "-")
    assert rows[CHECKS.index("fionread")] == ("fionread", "FAIL: FIONREAD says 0", "-")
    assert rows[CHECKS.index("unread_bounded")] == ("unread_bounded", "pass", "-")


# ---- where the throwaway cgroup goes ------------------------------------------------------

HOST_MOUNTS = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
CONTAINER_MOUNTS = (
    "700 690 0:30 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n"
    "701 690 0:30 /../../.. /host/sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw\n"
)


def test_own_cgroup_on_a_host_and_in_a_container() -> None:
    assert selftest.own_cgroup("0::/\n", HOST_MOUNTS) == Path("/sys/fs/cgroup/unified")
    got = selftest.own_cgroup("1:cpu:/x\n0::/system.slice/ez.service\n", HOST_MOUNTS)
    assert got == Path("/sys/fs/cgroup/unified/system.slice/ez.service")
    # A private cgroup namespace: "/" is the container's own cgroup; the host's bind mount
    # (its root outside the namespace) cannot show it.
    assert selftest.own_cgroup("0::/\n", CONTAINER_MOUNTS) == Path("/sys/fs/cgroup")


def test_own_cgroup_through_a_mount_of_a_subtree_with_escaped_names() -> None:
    mounts = r"9 1 0:30 /kube\040pods /mnt/my\040cg rw - cgroup2 cgroup2 rw" + "\n"
    got = selftest.own_cgroup("0::/kube pods/pod-1/c\n", mounts)
    assert got == Path("/mnt/my cg/pod-1/c")


def test_own_cgroup_without_cgroup_v2_is_a_clear_error() -> None:
    with pytest.raises(DataplaneError, match="no cgroup v2"):
        selftest.own_cgroup("4:memory:/x\n", HOST_MOUNTS)
    with pytest.raises(DataplaneError, match="no cgroup2 mount"):
        selftest.own_cgroup("0::/a\n", "1 0 0:1 / / rw - ext4 /dev/sda rw\n")


@pytest.fixture
def test_cgroup() -> Iterator[Path]:
    """A cgroup of this test's own under the cgroup2 root, removed at the end."""
    require_root()
    path = paths.cgroup2_root() / f"eztest-st-{secrets.token_hex(3)}"
    path.mkdir()
    yield path
    selftest._rmdir_cgroup(path)
    assert not path.exists()


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[list[Path]]:
    """ro(target): a read-only bind mount of target (a cgroup directory) under tmp_path, as
    a container sees cgroupfs; unmounted at the end."""
    mounted: list[Path] = []
    yield mounted
    for m in reversed(mounted):
        subprocess.run(["umount", str(m)], check=False, capture_output=True, timeout=30)


def _ro(read_only: list[Path], tmp_path: Path, target: Path) -> Path:
    at = tmp_path / f"ro-{len(read_only)}"
    at.mkdir()
    subprocess.run(["mount", "--bind", str(target), str(at)], check=True, timeout=30)
    read_only.append(at)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(at)], check=True, timeout=30)
    return at


@kernel
def test_the_throwaway_cgroup_is_made_and_removed_even_on_failure(test_cgroup: Path) -> None:
    with pytest.raises(RuntimeError), selftest._throwaway_cgroup(test_cgroup) as (cg, join):
        assert join and cg.parent == test_cgroup and cg.name.startswith(selftest.CGROUP_PREFIX)
        assert cg.is_dir() and not selftest.is_root_cgroup(cg)
        raise RuntimeError("boom")
    assert list(test_cgroup.iterdir()) == [p for p in test_cgroup.iterdir() if p.is_file()]


@kernel
def test_cgroups_a_killed_run_left_are_swept(test_cgroup: Path) -> None:
    dead = test_cgroup / f"{selftest.CGROUP_PREFIX}999999999-abcdef"  # no such pid
    alive = test_cgroup / f"{selftest.CGROUP_PREFIX}1-abcdef"  # pid 1 is always there
    dead.mkdir()
    alive.mkdir()
    try:
        with selftest._throwaway_cgroup(test_cgroup) as (cg, _):
            left = {p.name for p in test_cgroup.iterdir() if p.is_dir()}
            assert left == {alive.name, cg.name}
    finally:
        alive.rmdir()
        selftest._rmdir_cgroup(dead)


@kernel
def test_read_only_cgroupfs_falls_back_to_the_own_cgroup_but_never_a_root(
    test_cgroup: Path, read_only: list[Path], tmp_path: Path
) -> None:
    own = _ro(read_only, tmp_path, test_cgroup)
    with selftest._throwaway_cgroup(own) as (cg, join):
        assert (cg, join) == (own, False)  # the child is already in it: nothing to make
    root = _ro(read_only, tmp_path, paths.cgroup2_root())
    assert selftest.is_root_cgroup(root)
    with pytest.raises(DataplaneError, match="root cgroup"), selftest._throwaway_cgroup(root):
        pass


# ---- the test on the real kernel ------------------------------------------------------------


def _left_behind() -> list[str]:
    return sorted(p.name for p in paths.cgroup2_root().iterdir() if
                  p.name.startswith(f"{selftest.CGROUP_PREFIX}{os.getpid()}-"))  # fmt: skip


@kernel
def test_this_kernel_splices_with_every_check_passed_and_nothing_left() -> None:
    require_root()
    st = selftest.run(allow_workaround=True)
    assert st.kernel == os.uname().release
    assert st.decision in (ATTACH, ATTACH_WORKAROUND), st.reason
    chosen = PLAIN if st.decision == ATTACH else VERDICT
    mine = [c for c in st.checks if c.name.endswith(f"/{chosen}")]
    assert [c.name.split("/")[0] for c in mine] == list(CHECKS)
    assert all(c.passed for c in mine), mine
    assert (st.decision, st.reason) == decide(st.kernel, _by_variant(st.checks))
    assert "a private netns (127." in st.environment and selftest.CGROUP_PREFIX in st.environment
    assert 0 < st.duration_s < 5
    assert _left_behind() == []


def _by_variant(checks: tuple[SelftestCheck, ...]) -> dict[str, list[SelftestCheck]]:
    out: dict[str, list[SelftestCheck]] = {}
    for c in checks:
        out.setdefault(c.name.split("/")[1], []).append(c)
    return out


@kernel
def test_this_kernels_fionread_regression_is_found_without_the_workaround() -> None:
    # 6.18.14+ carries the FIONREAD change that, without an SK_SKB verdict, counts only the
    # redirect queue: TCP bytes of a socket in the sockhash read as 0. Pretending the kernel
    # is not listed, the plain run must find it and the workaround must fix it.
    require_root()
    if lost_wakeup_listed(os.uname().release) is not True:
        pytest.skip("this test knows the behaviour of the listed kernels (6.18.44 here)")
    st = selftest.run(allow_workaround=True, kernel=UNLISTED)
    by = {c.name: c for c in st.checks}
    assert not by["fionread/plain"].passed
    assert by["fionread/plain"].detail == "FIONREAD says 0 of 16384 bytes that came through TCP"
    assert all(c.passed for c in st.checks if c.name != "fionread/plain")
    assert st.decision == ATTACH_WORKAROUND and st.kernel == UNLISTED
    assert "fionread: FIONREAD says 0" in st.reason


@kernel
def test_a_verdict_that_passes_a_repeat_whole_is_caught(tmp_path: Path) -> None:
    # The kernel hands the SK_SKB verdict a segment that repeats received bytes whole; a
    # build without the program's trim gives the reader the repeat twice, and the check
    # must say so (and refuse the workaround).
    require_root()
    obj = build_object(tmp_path / "notrim.bpf.o", "BPF_DEFINES=-DEZ_TEST_NO_TRIM")
    st = selftest.run(obj, allow_workaround=True)
    by = {c.name: c for c in st.checks}
    if by["repeated_bytes/skb_verdict"].passed:
        pytest.skip("this kernel does not repeat bytes on the verdict path")
    # The first wrong byte is where the repeat began to reach the reader.
    assert f"wrong from byte {selftest.REPEAT_BASE}," in by["repeated_bytes/skb_verdict"].detail
    assert by["repeated_bytes/plain"].passed  # TCP's own reader skips the repeat
    assert st.decision == NO_SPLICE and "repeated_bytes: " in st.reason


@kernel
def test_a_failing_check_forced_in_both_variants_means_no_splice() -> None:
    require_root()
    st = selftest.run(allow_workaround=True, inject=["splice"])
    assert st.decision == NO_SPLICE
    by = {c.name: c for c in st.checks}
    assert by["splice/plain"].detail == by["splice/skb_verdict"].detail == "failure injected"
    assert by["half_close/skb_verdict"].passed  # the other checks still ran
    assert "with the workaround: splice: failure injected" in st.reason
    assert _left_behind() == []


@kernel
def test_an_unlisted_kernel_failing_plain_runs_the_workaround_and_takes_it() -> None:
    require_root()
    st = selftest.run(
        allow_workaround=True, kernel=UNLISTED, inject=["epoll/plain", "fionread/plain"]
    )
    names = [c.name for c in st.checks]
    assert names == [selftest.check_name(n, v) for v in (PLAIN, VERDICT) for n in CHECKS]
    assert st.decision == ATTACH_WORKAROUND, st.reason


@kernel
def test_an_unbounded_reader_forced_with_the_workaround_means_no_splice_here() -> None:
    # This kernel is listed: without a bounded workaround there is nothing to attach.
    require_root()
    st = selftest.run(
        allow_workaround=True, kernel="6.18.44", inject=["unread_bounded/skb_verdict"]
    )
    by = {c.name: c for c in st.checks}
    assert by["unread_bounded/skb_verdict"].detail == "failure injected"
    assert by["unread_bounded/plain"].passed and by["fionread/skb_verdict"].passed
    assert st.decision == NO_SPLICE
    assert st.reason.endswith("with the workaround: unread_bounded: failure injected")
    # On an unlisted kernel, a plain variant that does not bound it takes the workaround.
    st = selftest.run(
        allow_workaround=True,
        kernel=UNLISTED,
        inject=["unread_bounded/plain", "fionread/plain"],
    )
    assert st.decision == ATTACH_WORKAROUND, st.reason
    assert "unread_bounded: failure injected" in st.reason
    assert _left_behind() == []


@kernel
def test_a_conditional_variant_runs_only_after_a_failure() -> None:
    # `name?` (how an unlisted kernel asks for the workaround) is skipped when every check
    # before it passed: here the workaround's run passes, so the plain one never runs.
    require_root()
    with selftest._throwaway_cgroup() as (cg, join):
        _, got = selftest._run_child(
            paths.default_object(), cg, join, [VERDICT, f"{PLAIN}?"], [], 20
        )
        assert list(got) == [VERDICT] and all(c.passed for c in got[VERDICT])
        _, got = selftest._run_child(
            paths.default_object(), cg, join, [VERDICT, f"{PLAIN}?"], ["epoll/skb_verdict"], 20
        )
        assert list(got) == [VERDICT, PLAIN]
    assert _left_behind() == []


def _build(out: Path, pattern: str, repl: str) -> Path:
    """The packaged object's source with one edit (exactly one match), compiled like the
    Makefile does."""
    out.mkdir()
    text, n = re.subn(pattern, repl, (REPO / "bpf" / "eztunnel.bpf.c").read_text())
    assert n == 1, f"{pattern!r} matched {n} times in bpf/eztunnel.bpf.c: update this test"
    (out / "eztunnel.bpf.c").write_text(text)
    arch = {"x86_64": "x86", "aarch64": "arm64"}[os.uname().machine]
    subprocess.run(
        ["clang", "-g", "-O2", "-target", "bpf", "-mcpu=v3", f"-D__TARGET_ARCH_{arch}",
         "-Wall", "-Werror", "-I", str(REPO / "bpf"),
         "-c", str(out / "eztunnel.bpf.c"), "-o", str(out / "x.bpf.o")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out / "x.bpf.o"


@kernel
def test_an_object_that_never_redirects_is_refused(tmp_path: Path) -> None:
    # It loads, attaches and pairs, but every redirect "misses": bytes go through TCP.
    require_root()
    redirect = r"bpf_msg_redirect_hash\(msg, &ez_socks, &peer, BPF_F_INGRESS\)"
    obj = _build(tmp_path / "noredirect", redirect, "(peer ? SK_DROP : SK_DROP)")
    st = selftest.run(obj, allow_workaround=True)
    assert st.decision == NO_SPLICE
    by = {c.name: c for c in st.checks}
    for v in (PLAIN, VERDICT):
        assert by[f"splice/{v}"].detail.startswith("0 bytes went through the redirect")
        # Plain TCP alone is bounded: the check must not take that for a spliced pass.
        unread = by[f"unread_bounded/{v}"].detail
        assert unread.startswith("the direction was not spliced before the writer blocked: ")
        assert " 0 bytes redirected, " in unread
    assert _left_behind() == []


# ---- unread_bounded: a writer towards a reader that never reads -----------------------------

UNREAD = re.compile(
    r"(?P<accepted>\d+) bytes accepted, bound (?P<bound>\d+) \((?:given; computed "
    r"(?P<computed>\d+): )?buffers (?P<rcv>\d+) \+ (?P<snd>\d+), queue (?P<queue>\d+), message "
    r"(?P<msg>\d+), slack (?P<slack>\d+)\); (?P<redirected>\d+) bytes redirected, "
    r"(?P<fallbacks>\d+) fallbacks to TCP, the writer (?P<how>blocked|not blocked) after "
)


def _unread_alone(obj: Path, bound: int | None) -> dict[str, SelftestCheck]:
    """unread_bounded alone, in both variants, in the self-test's own child (its cgroup and
    netns), judged against `bound` if given."""
    code = (
        "import functools, json, sys; from eztunnel_plugin import selftest as s; "
        "s.CHECKS = ('unread_bounded',); b = json.loads(sys.argv[2]); "
        "s.Checks.unread_bounded = functools.partialmethod(s.Checks.unread_bounded, bound=b); "
        "print(json.dumps(s._child(s.Request(**json.loads(sys.argv[1])))))"
    )
    with selftest._throwaway_cgroup() as (cg, join):
        req = selftest.Request(str(obj), str(cg), join, [PLAIN, VERDICT], [])
        proc = subprocess.run(
            [PY, "-c", code, json.dumps(dataclasses.asdict(req)), json.dumps(bound)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    reply = json.loads(proc.stdout.splitlines()[-1])["results"]
    return {c["name"]: SelftestCheck(**c) for r in reply.values() for c in r}


@kernel
def test_a_reader_that_never_reads_is_bounded_here_with_and_without_the_verdict() -> None:
    require_root()
    got = _unread_alone(paths.default_object(), None)
    assert [n for n, c in got.items() if c.passed] == ["unread_bounded/plain",
                                                       "unread_bounded/skb_verdict"]  # fmt: skip
    assert _left_behind() == []


@kernel
def test_the_unread_check_fails_with_its_numbers_when_the_bound_is_tiny() -> None:
    # The same run, judged against a bound of 1 byte: the check itself can fail, and says
    # what it measured. The writer still stopped where the real bound put it: blocked by
    # TCP after the direction was spliced and fell back, below the computed bound.
    require_root()
    got = _unread_alone(paths.default_object(), 1)
    for v in (PLAIN, VERDICT):
        c = got[f"unread_bounded/{v}"]
        assert not c.passed
        assert c.detail.startswith("a reader that never reads is not bounded: "), c.detail
        m = UNREAD.search(c.detail)
        assert m is not None, c.detail
        n = {k: int(x) for k, x in m.groupdict().items() if k != "how"}
        assert n["bound"] == 1 and m["how"] == "blocked"
        assert 1 < n["accepted"] <= n["computed"], c.detail
        assert n["computed"] == n["rcv"] + n["snd"] + n["queue"] + n["msg"] + n["slack"]
        assert n["queue"] >= selftest.UNREAD_LIMIT and n["slack"] == selftest.MIB
        assert n["redirected"] >= selftest.UNREAD_LIMIT and n["fallbacks"] >= 1, c.detail
    assert _left_behind() == []


@kernel
def test_an_object_without_a_backlog_limit_is_refused_for_unbounded_memory(
    tmp_path: Path,
) -> None:
    # The redirect queue escapes TCP's flow control, as it does without the data plane's
    # limit: the writer is accepted up to the check's cap, never blocked, and no variant
    # is attached.
    require_root()
    room = r"redirect_room\(info, cfg->backlog_limit, size, back\)"
    obj = _build(tmp_path / "nolimit", room, "redirect_room(info, 0xffffffff, size, back)")
    st = selftest.run(obj, allow_workaround=True)
    assert st.decision == NO_SPLICE, st.reason
    by = {c.name: c for c in st.checks}
    for v in (PLAIN, VERDICT):
        c = by[f"unread_bounded/{v}"]
        assert not c.passed and c.detail.startswith("a reader that never reads is not bounded")
        m = UNREAD.search(c.detail)
        assert m is not None, c.detail
        assert m["computed"] is None and m["how"] == "not blocked"
        assert int(m["accepted"]) > int(m["bound"]), c.detail
        assert m["redirected"] == m["accepted"] and m["fallbacks"] == "0", c.detail
        assert by[f"splice/{v}"].passed  # it splices, it just does not bound
    assert "unread_bounded: a reader that never reads is not bounded" in st.reason
    assert _left_behind() == []


@kernel
def test_an_object_that_cannot_load_is_refused_with_a_reason(tmp_path: Path) -> None:
    require_root()
    junk = tmp_path / "junk.bpf.o"
    junk.write_bytes(b"not an ELF file")
    st = selftest.run(junk, allow_workaround=True)
    assert st.decision == NO_SPLICE and st.checks == ()
    assert st.reason.startswith(f"the self-test could not run: loading {junk} failed")
    assert _left_behind() == []


@kernel
def test_a_child_past_its_deadline_is_killed_and_its_cgroup_removed() -> None:
    require_root()
    st = selftest.run(allow_workaround=True, timeout=0.05)
    assert st.decision == NO_SPLICE
    assert st.reason == "the self-test could not run: its process did not finish in 0.05 s"
    assert _left_behind() == []


@kernel
def test_in_a_container_cgroup_the_child_attaches_where_it_already_is(test_cgroup: Path) -> None:
    # Read-only cgroupfs: no throwaway cgroup, the programs go on the cgroup the agent (here
    # a process placed in test_cgroup) is in. Only its own 127.x.y.z sockets are in scope.
    require_root()
    code = (
        "import json, sys; from eztunnel_plugin import selftest as s; "
        "env, res = s._run_child(s.paths.default_object(), s.Path(sys.argv[1]), False, "
        "['plain', 'skb_verdict'], [], 20); "
        "print(json.dumps({'env': env, 'res': {v: [c.passed for c in r] for v, r in res.items()}}))"
    )
    proc = subprocess.run(
        [PY, "-c", code, str(test_cgroup)],
        preexec_fn=lambda: (test_cgroup / "cgroup.procs").write_text(str(os.getpid())),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    got = json.loads(proc.stdout)
    assert got["env"].endswith(f"cgroup {test_cgroup}")
    assert all(got["res"]["skb_verdict"]) and len(got["res"]["plain"]) == len(CHECKS)


@kernel
def test_with_only_the_charts_capabilities_the_checks_run_on_loopback(test_cgroup: Path) -> None:
    # BPF + NET_ADMIN + PERFMON and no SYS_ADMIN: no netns of its own, so the checks run on
    # a random 127.x.y.z of the netns the agent is in (the node's, with hostNetwork).
    require_root()
    caps = ["setpriv", "--bounding-set=-all,+bpf,+net_admin,+perfmon", "--"]
    code = (
        "import dataclasses, json; from eztunnel_plugin import selftest; "
        "print(json.dumps(dataclasses.asdict(selftest.run(allow_workaround=True))))"
    )
    proc = subprocess.run(
        [*caps, PY, "-c", code],
        preexec_fn=lambda: (test_cgroup / "cgroup.procs").write_text(str(os.getpid())),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    st = json.loads(proc.stdout)
    assert st["environment"].startswith("the agent's netns, on loopback (127.")
    assert f"cgroup {test_cgroup}/{selftest.CGROUP_PREFIX}" in st["environment"]
    assert st["decision"] in (ATTACH, ATTACH_WORKAROUND), st["reason"]
    assert [p.name for p in test_cgroup.iterdir() if p.is_dir()] == []


# ---- `eztunnel-plugin selftest` ---------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eztunnel_plugin", "selftest", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@kernel
def test_the_selftest_command_prints_a_table_or_json_and_exits_0_here() -> None:
    require_root()
    table = _cli()
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "WITHOUT", "WORKAROUND", "WITH", "SK_SKB", "WORKAROUND"]
    assert [ln.split()[0] for ln in lines[2 : 2 + len(CHECKS)]] == list(CHECKS)
    assert any(ln.startswith("decision:  attach") for ln in lines)
    doc = json.loads(_cli("--json").stdout)
    assert doc["decision"] in (ATTACH, ATTACH_WORKAROUND) and doc["kernel"] == os.uname().release
    assert {c["name"].split("/")[0] for c in doc["checks"]} == set(CHECKS)


@kernel
def test_the_selftest_command_exits_1_when_this_object_may_not_splice(tmp_path: Path) -> None:
    require_root()
    junk = tmp_path / "junk.bpf.o"
    junk.write_bytes(b"\x7fELF nope")
    done = _cli("--object", str(junk), "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["decision"] == NO_SPLICE
    assert "Traceback" not in done.stderr


@kernel
def test_the_selftest_command_decides_as_the_agent_would_with_or_without_the_workaround() -> None:
    require_root()
    default = json.loads(_cli("--json").stdout)
    # The flag of the releases that refused by default means the default.
    assert (
        json.loads(_cli("--allow-workaround", "--json").stdout)["decision"] == default["decision"]
    )
    refused = _cli("--refuse-workaround", "--json")
    doc = json.loads(refused.stdout)
    if default["decision"] == ATTACH_WORKAROUND:  # this kernel needs it: refused, no splice
        assert refused.returncode == 1 and doc["decision"] == NO_SPLICE
        assert "--refuse-workaround" in doc["reason"]
    else:  # nothing needs refusing
        assert refused.returncode == 0 and doc["decision"] == default["decision"]


def test_the_selftest_command_refuses_a_missing_object_in_one_line(tmp_path: Path) -> None:
    done = _cli("--object", str(tmp_path / "none.o"))
    assert done.returncode == 2
    assert done.stderr == f"eztunnel-plugin: error: --object: {tmp_path / 'none.o'} is not a file\n"
