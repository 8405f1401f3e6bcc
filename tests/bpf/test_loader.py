"""bpf/loader.py on the real kernel: install, reuse, uninstall under live flows, and upgrades
over existing pins (programs swapped in place, a new generation for a new layout, a start
that dies at each step of a migration).

Every object here is compiled from the tree's bpf/ sources into a temporary directory:
`base` as they are, `variant` with two observable code changes (sockops counts each
socket 1000 times, sk_msg counts each message 1,000,000 times), and `old_layout` with
another layout (half the sockets per map), installed and then marked with the previous
layout version, as the previous release would have left it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from eztunnel_lab.netlab import Lab, Pod
from eztunnel_plugin.bpf import layout, loader, paths, syscalls
from eztunnel_plugin.bpf.maps import Dataplane
from eztunnel_plugin.errors import BpfError, DataplaneError

from ..conftest import (
    PY,
    enroll,
    finish_hold,
    flowcheck_server,
    hold_client,
    hold_server,
    wait_for,
    wait_line,
)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
KB = 1024
MB = 1 << 20
SOCKOPS_STEP = 1000  # variant: sockets_seen per socket
MSG_STEP = 1_000_000  # variant: msgs_redirected per message
OLD_VERSION = layout.LAYOUT_VERSION - 1

Objects = dict[str, Path]


def _build(out: Path, edits: dict[str, list[tuple[str, str]]]) -> Path:
    """Compile a copy of bpf/ with each (regex, replacement) applied exactly once."""
    out.mkdir(parents=True)
    for name in ("eztunnel.bpf.c", "eztunnel.h"):
        text = (REPO / "bpf" / name).read_text()
        for pattern, repl in edits.get(name, []):
            text, n = re.subn(pattern, repl, text)
            assert n == 1, f"{pattern!r} matched {n} times in bpf/{name}: update this test"
        (out / name).write_text(text)
    obj = out / "eztunnel.bpf.o"
    # The Makefile's BPF_CFLAGS; the copied header shadows bpf/'s, vmlinux.h comes from bpf/.
    arch = {"x86_64": "x86", "aarch64": "arm64"}[
        subprocess.check_output(["uname", "-m"]).decode().strip()
    ]
    subprocess.run(
        ["clang", "-g", "-O2", "-target", "bpf", "-mcpu=v3", f"-D__TARGET_ARCH_{arch}",
         "-Wall", "-Werror", "-I", str(out), "-I", str(REPO / "bpf"),
         "-c", str(out / "eztunnel.bpf.c"), "-o", str(obj)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return obj


@pytest.fixture(scope="session")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Objects:
    root = tmp_path_factory.mktemp("bpf-variants")
    return {
        "base": _build(root / "base", {}),
        "variant": _build(
            root / "variant",
            {
                "eztunnel.bpf.c": [
                    (
                        r"count\(EZ_CNT_SOCKETS_SEEN, 1\);",
                        f"count(EZ_CNT_SOCKETS_SEEN, {SOCKOPS_STEP});",
                    ),
                    (
                        r"count\(EZ_CNT_MSGS_REDIRECTED, 1\);",
                        f"count(EZ_CNT_MSGS_REDIRECTED, {MSG_STEP});",
                    ),
                ]
            },
        ),
        "old_layout": _build(
            root / "old_layout",
            {
                "eztunnel.h": [
                    (r"EZ_LAYOUT_VERSION = \d+,", f"EZ_LAYOUT_VERSION = {OLD_VERSION},"),
                    (r"EZ_MAX_SOCKETS = 65536,", "EZ_MAX_SOCKETS = 32768,"),
                ]
            },
        ),
    }


# ---- helpers -------------------------------------------------------------------------------


def _tags(obj: Path) -> dict[str, str]:
    loaded = syscalls.load_object(obj)
    try:
        return {name: syscalls.prog_info(fd).tag for name, fd in loaded.prog_fds.items()}
    finally:
        loaded.close()


def _attached(bpffs: Path, link: str) -> syscalls.ProgInfo:
    """The program a pinned link runs (opened by id: the tests run with CAP_SYS_ADMIN)."""
    fd = syscalls.obj_get(bpffs / link)
    try:
        prog_id = syscalls.link_info(fd).prog_id
    finally:
        fd_close(fd)
    pfd = syscalls.prog_get_fd_by_id(prog_id)
    try:
        return syscalls.prog_info(pfd)
    finally:
        fd_close(pfd)


def _attached_map_ids(bpffs: Path, link: str) -> set[int]:
    pfd = syscalls.prog_get_fd_by_id(_attached(bpffs, link).id)
    try:
        return set(syscalls.prog_map_ids(pfd))
    finally:
        fd_close(pfd)


def fd_close(fd: int) -> None:
    os.close(fd)


def _link_id(bpffs: Path, link: str) -> int:
    fd = syscalls.obj_get(bpffs / link)
    try:
        return syscalls.link_info(fd).id
    finally:
        fd_close(fd)


def _map_id(path: Path) -> int:
    fd = syscalls.obj_get(path)
    try:
        return syscalls.map_info(fd).id
    finally:
        fd_close(fd)


def _map_ids(gen: Path) -> dict[str, int]:
    return {name: _map_id(gen / name) for name in layout.MAPS}


def _sockets_in(gen: Path) -> int:
    fd = syscalls.obj_get(gen / "ez_socks")
    try:
        return len(syscalls.map_keys(fd, 8, limit=layout.MAX_SOCKETS))
    finally:
        fd_close(fd)


def _counter(gen: Path, counter: layout.Counter) -> int:
    """A counter of any generation, read straight from its pinned map."""
    fd = syscalls.obj_get(gen / "ez_counters")
    try:
        slots = syscalls.percpu_lookup(fd, counter.value.to_bytes(4, "little"), 8)
    finally:
        fd_close(fd)
    return sum(int.from_bytes(s, "little") for s in slots)


def _prog_gone(prog_id: int) -> bool:
    try:
        fd_close(syscalls.prog_get_fd_by_id(prog_id))
    except BpfError:
        return True
    return False


class Held:
    """A held, spliced echo connection: more rounds on demand, each checked byte for byte."""

    def __init__(self, lab: Lab, client: Pod, server: Pod, size: int = 256 * KB) -> None:
        self.proc = hold_client(lab, client, server.ip4, 9000, "--size", str(size))
        self.rounds = 0

    def exchange(self, n: int = 2) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"x\n" * n)
        self.proc.stdin.flush()
        self.rounds += n
        wait_line(self.proc, f"round {self.rounds}")

    def finish(self) -> None:
        finish_hold(self.proc, rounds=2)


def _pods(lab: Lab, dp: Dataplane) -> tuple[Pod, Pod]:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    hold_server(lab, b, "0.0.0.0", 9000)
    return a, b


def _install_previous_release(lab: Lab, objects: Objects) -> Dataplane:
    """Pins as a release with the previous layout version would have left them."""
    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["old_layout"])
    cfg = dp.config.read()
    cfg.layout_version = OLD_VERSION
    syscalls.map_update(dp.maps["ez_config"], bytes(4), bytes(cfg))
    return dp


def _cgroup_programs(lab: Lab) -> str:
    return subprocess.run(
        ["bpftool", "cgroup", "show", str(lab.cgroup)], capture_output=True, text=True, check=True
    ).stdout


# ---- install, reuse, uninstall ---------------------------------------------------------


def _attached_prog_ids(dp: Dataplane) -> set[int]:
    return {info.prog_id for info in dp.attachments().values()}


def _prog_exists(prog_id: int) -> bool:
    return (
        subprocess.run(
            ["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True, check=False
        ).returncode
        == 0
    )


def test_uninstall_during_live_flows(lab: Lab, dp: Dataplane) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    flowcheck_server(lab, b, 9000, "--read-delay", "0.0005")
    hold_server(lab, b, "0.0.0.0", 9001)
    held = hold_client(lab, a, b.ip4, 9001, "--size", str(MB))
    prog_ids = _attached_prog_ids(dp)
    assert len(prog_ids) == 2
    bulk = lab.spawn(
        a,
        [
            PY,
            "-m",
            "eztunnel_lab.traffic.flowcheck",
            "client",
            "--connect",
            b.ip4,
            "--port",
            "9000",
            "--conns",
            "8",
            "--min-size",
            str(24 * MB),
            "--max-size",
            str(24 * MB),
            "--timeout",
            "90",
        ],
        stdout=subprocess.PIPE,
    )
    wait_for(lambda: len(dp.sockinfo.flows()) >= 5, what="bulk flows spliced")
    dp.close()

    report = loader.uninstall(lab.bpffs)
    assert report.paired_sockets >= 2
    assert not lab.bpffs.exists()
    cg = subprocess.run(
        ["bpftool", "cgroup", "show", str(lab.cgroup)], capture_output=True, text=True, check=True
    )
    assert "ez_sockops" not in cg.stdout

    out, _ = bulk.communicate(timeout=100)
    assert b'"ok": true' in out, out
    finish_hold(held, rounds=3)
    # Once the last spliced socket closed, nothing of ours is left in the kernel.
    wait_for(
        lambda: not any(_prog_exists(p) for p in prog_ids),
        timeout=15,
        what="programs released after the last paired socket closed",
    )


def test_reuse_over_pins_attaches_nothing_twice(lab: Lab, dp: Dataplane) -> None:
    again = loader.install_or_reuse(lab.bpffs, lab.cgroup)
    try:
        assert again.reused
        assert _attached_prog_ids(again) == _attached_prog_ids(dp)
        cg = subprocess.run(
            ["bpftool", "cgroup", "show", str(lab.cgroup)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert cg.stdout.count("ez_sockops") == 1
    finally:
        again.close()


# ---- same layout: programs swapped in place ----------------------------------------------


def test_changed_programs_are_swapped_in_place(lab: Lab, objects: Objects) -> None:
    dp0 = loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["base"])
    a, b = _pods(lab, dp0)
    live = Held(lab, a, b)
    (old_flow,) = dp0.sockinfo.flows()
    links = {name: _link_id(lab.bpffs, name) for name in ("link_sockops", "link_msg")}
    progs = {name: _attached(lab.bpffs, name) for name in links}
    maps = _map_ids(lab.bpffs)
    dp0.close()

    # The agent's path: the upgrade runs in the short-lived loader process.
    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["variant"], isolated=True)
    try:
        assert dp.action == "updated" and dp.reused
        want = _tags(objects["variant"])
        for link, prog in (("link_sockops", "ez_sockops"), ("link_msg", "ez_msg")):
            now = _attached(lab.bpffs, link)
            assert _link_id(lab.bpffs, link) == links[link], "the link itself must stay"
            assert now.id != progs[link].id and now.tag == want[prog] != progs[link].tag
            # The new programs run on the pinned maps, not on fresh ones: nothing but their
            # own .rodata is new.
            uses = _attached_map_ids(lab.bpffs, link)
            assert len(uses - set(maps.values())) == 1
            assert link != "link_sockops" or set(maps.values()) <= uses
            pin = syscalls.obj_get(lab.bpffs / loader.PROG_PINS[link])
            assert syscalls.prog_info(pin).id == now.id
            fd_close(pin)
        assert _map_ids(lab.bpffs) == maps
        assert _cgroup_programs(lab).count("ez_sockops") == 1

        # The live pair keeps the sk_msg program it joined the sockhash with: still spliced,
        # by the old code (+1 per message), every byte intact.
        before = dp.counters.read()
        live.exchange(2)
        moved = dp.counters.read()["msgs_redirected"] - before["msgs_redirected"]
        assert 0 < moved < MSG_STEP
        (still,) = [f for f in dp.sockinfo.flows() if f.active_cookie == old_flow.active_cookie]
        assert still.state_active is layout.SockState.PAIRED
        assert still.bytes_active_to_passive >= old_flow.bytes_active_to_passive + 512 * KB

        # A new pair runs the new code in both programs.
        before = dp.counters.read()
        new = Held(lab, a, b)
        after = dp.counters.read()
        assert after["sockets_seen"] - before["sockets_seen"] == 2 * SOCKOPS_STEP
        assert after["pairs"] - before["pairs"] == 1
        assert after["msgs_redirected"] - before["msgs_redirected"] >= MSG_STEP
        live.finish()
        new.finish()
    finally:
        dp.close()


def test_same_programs_are_left_alone(lab: Lab, objects: Objects) -> None:
    dp0 = loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["base"])
    a, b = _pods(lab, dp0)
    live = Held(lab, a, b)
    progs = {name: _attached(lab.bpffs, name).id for name in ("link_sockops", "link_msg")}
    pins = sorted(p.name for p in lab.bpffs.iterdir())
    dp0.close()
    for isolated in (False, True):
        dp = loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["base"], isolated=isolated)
        assert dp.action == "reused"
        assert {name: _attached(lab.bpffs, name).id for name in progs} == progs
        assert sorted(p.name for p in lab.bpffs.iterdir()) == pins
        dp.close()
    live.finish()


def test_a_concurrent_switch_is_detected_not_overwritten(
    lab: Lab, objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["base"]).close()
    before = _attached(lab.bpffs, "link_sockops").id
    # Someone else switched link_sockops after we read it: our BPF_F_REPLACE names the
    # program we saw, the kernel sees another one and refuses.
    real = loader._attached_prog

    def stale(bpffs: Path, link: str, prog_id: int) -> int | None:
        if link == loader.LINK_SOCKOPS:
            return syscalls.obj_get(bpffs / loader.PROG_PINS[loader.LINK_MSG])
        return real(bpffs, link, prog_id)

    monkeypatch.setattr(loader, "_attached_prog", stale)
    with pytest.raises(DataplaneError, match=r"switched to another program.*start again"):
        loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["variant"])
    assert _attached(lab.bpffs, "link_sockops").id == before


def test_reusing_maps_of_another_shape_is_refused(lab: Lab, objects: Objects) -> None:
    # Same layout version, other map sizes (a layout change without a version bump):
    # the programs would run on maps they were not built for.
    loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["base"]).close()
    before = _attached(lab.bpffs, "link_sockops").id
    with pytest.raises(DataplaneError, match=r"ez_socks.*EZ_LAYOUT_VERSION"):
        loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["old_layout"])
    assert _attached(lab.bpffs, "link_sockops").id == before


# ---- another layout: a new generation beside the old one ------------------------------------


def test_layout_change_migrates_and_keeps_old_flows(lab: Lab, objects: Objects) -> None:
    old = _install_previous_release(lab, objects)
    a, b = _pods(lab, old)
    live = Held(lab, a, b)
    assert len(old.sockinfo.flows()) == 1
    old_socks = _map_id(lab.bpffs / "ez_socks")
    link = _link_id(lab.bpffs, "link_sockops")
    endpoints = old.endpoints.read_all()
    old.close()

    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup, isolated=True)
    try:
        assert dp.action == "migrated" and dp.config.read().layout_version == layout.LAYOUT_VERSION
        (gen,) = paths.old_generations(lab.bpffs)
        assert gen.name == f"old-v{OLD_VERSION}-m{old_socks}"
        assert _map_id(gen / "ez_socks") == old_socks and _sockets_in(gen) == 2
        # One cgroup link all along, now running the new program on the new maps.
        assert _link_id(lab.bpffs, "link_sockops") == link
        uses = _attached_map_ids(lab.bpffs, "link_sockops")
        assert _map_id(lab.bpffs / "ez_socks") in uses and old_socks not in uses
        assert _cgroup_programs(lab).count("ez_sockops") == 1
        assert dp.endpoints.read_all() == endpoints  # carried over: no gap before the sync

        # The old pair is still spliced by the old generation, byte for byte.
        moved = _counter(gen, layout.Counter.BYTES_REDIRECTED)
        live.exchange(2)
        assert _counter(gen, layout.Counter.BYTES_REDIRECTED) >= moved + 4 * 256 * KB
        # A new pair is spliced by the new generation only.
        new = Held(lab, a, b)
        assert len(dp.sockinfo.flows()) == 1 and dp.counters.read()["pairs"] == 1
        assert _sockets_in(gen) == 2

        # A later start keeps the old generation while its sockets live...
        again = loader.install_or_reuse(lab.bpffs, lab.cgroup)
        assert again.action == "reused" and paths.old_generations(lab.bpffs) == [gen]
        again.close()
        old_msg = _attached(gen, "link_msg").id
        live.finish()
        wait_for(lambda: _sockets_in(gen) == 0, what="old sockets left the old sockhash")
        # ...and retires it at the first start after they closed.
        again = loader.install_or_reuse(lab.bpffs, lab.cgroup)
        again.close()
        assert paths.old_generations(lab.bpffs) == []
        wait_for(lambda: _prog_gone(old_msg), what="the old sk_msg program was released")
        new.exchange(2)
        new.finish()
    finally:
        dp.close()


def test_drained_generation_is_retired_periodically(lab: Lab, objects: Objects) -> None:
    old = _install_previous_release(lab, objects)
    a, b = _pods(lab, old)
    live = Held(lab, a, b)
    old.close()
    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup)
    try:
        (gen,) = paths.old_generations(lab.bpffs)
        assert loader.retire_drained(lab.bpffs, wait=0) == []  # a socket still uses it
        live.finish()
        wait_for(lambda: _sockets_in(gen) == 0, what="old sockets left the old sockhash")
        assert loader.retire_drained(lab.bpffs, wait=0) == [gen.name]
        assert not gen.exists() and paths.old_generations(lab.bpffs) == []
    finally:
        dp.close()


def test_kill_switch_reaches_the_old_generation(lab: Lab, objects: Objects) -> None:
    old = _install_previous_release(lab, objects)
    a, b = _pods(lab, old)
    live = Held(lab, a, b)
    old.close()
    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup)
    try:
        (gen,) = paths.old_generations(lab.bpffs)
        dp.config.set_enabled(False)
        moved = _counter(gen, layout.Counter.BYTES_REDIRECTED)
        passed = _counter(gen, layout.Counter.MSGS_PASSED)
        live.exchange(2)  # intact, through TCP now
        assert _counter(gen, layout.Counter.BYTES_REDIRECTED) == moved
        assert _counter(gen, layout.Counter.MSGS_PASSED) > passed
        live.finish()
    finally:
        dp.close()


def test_uninstall_after_upgrades_removes_every_generation(lab: Lab, objects: Objects) -> None:
    old = _install_previous_release(lab, objects)
    a, b = _pods(lab, old)
    first = Held(lab, a, b)
    old.close()
    loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["base"]).close()
    second = Held(lab, a, b)
    upgraded = loader.install_or_reuse(lab.bpffs, lab.cgroup, obj=objects["variant"])
    assert upgraded.action == "updated"
    upgraded.close()
    (gen,) = paths.old_generations(lab.bpffs)
    progs = [
        _attached(gen, "link_msg").id,
        *(_attached(lab.bpffs, n).id for n in ("link_msg", "link_sockops")),
    ]

    report = loader.uninstall(lab.bpffs)
    assert not lab.bpffs.exists(), "every generation's pins are gone"
    assert f"{gen.name}/link_msg" in report.detached and "link_sockops" in report.detached
    assert report.paired_sockets >= 4  # two spliced pairs, one per generation
    assert "ez_sockops" not in _cgroup_programs(lab)
    first.exchange(2)  # both still intact (on TCP now)
    first.finish()
    second.finish()
    wait_for(lambda: all(_prog_gone(p) for p in progs), timeout=15, what="programs released")


# ---- a start that dies half-way through a migration ---------------------------------------


def _die(*_: object, **__: object) -> None:
    raise RuntimeError("killed here")


def _migration_dies(
    lab: Lab, objects: Objects, patch: Callable[[pytest.MonkeyPatch], None]
) -> tuple[Held, Pod, Pod]:
    """A live old pair, then a migrating start that dies where `patch` says (no cleanup
    runs after a real kill either, unless the patch leaves it in)."""
    old = _install_previous_release(lab, objects)
    a, b = _pods(lab, old)
    live = Held(lab, a, b)
    old.close()
    with pytest.MonkeyPatch.context() as m:
        patch(m)
        with pytest.raises(RuntimeError, match="killed here"):
            loader.install_or_reuse(lab.bpffs, lab.cgroup)
    return live, a, b


def _recovers(lab: Lab, live: Held, a: Pod, b: Pod, action: str) -> None:
    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup)
    try:
        assert dp.action == action
        (gen,) = paths.old_generations(lab.bpffs)
        assert _sockets_in(gen) == 2
        assert not (lab.bpffs / "parking").exists() and not (lab.bpffs / "pending").exists()
        uses = _attached_map_ids(lab.bpffs, "link_sockops")
        assert _map_id(lab.bpffs / "ez_socks") in uses
        live.exchange(2)
        new = Held(lab, a, b)
        assert len(dp.sockinfo.flows()) == 1
        live.finish()
        new.finish()
    finally:
        dp.close()


def test_died_while_parking(lab: Lab, objects: Objects) -> None:
    def half_parked(bpffs: Path, old_version: int) -> str:
        (bpffs / "parking").mkdir()
        os.link(bpffs / "ez_socks", bpffs / "parking" / "ez_socks")
        raise RuntimeError("killed here")

    live, a, b = _migration_dies(lab, objects, lambda m: m.setattr(loader, "_park", half_parked))
    assert paths.old_generations(lab.bpffs) == []
    _recovers(lab, live, a, b, "migrated")


def test_died_after_parking(lab: Lab, objects: Objects) -> None:
    live, a, b = _migration_dies(lab, objects, lambda m: m.setattr(loader, "_attach_new", _die))
    # Only link_sockops is left at the top, still running the old program: connections are
    # still spliced (by the old generation), never without a program.
    assert {p.name for p in lab.bpffs.iterdir() if not p.is_dir()} == {"link_sockops"}
    (gen,) = paths.old_generations(lab.bpffs)
    probe = Held(lab, a, b)
    assert _sockets_in(gen) == 4
    probe.finish()
    _recovers(lab, live, a, b, "installed")


def test_died_before_the_switch(lab: Lab, objects: Objects) -> None:
    # The new generation is complete at the top, but link_sockops still runs the old
    # program (same code: equal tags, other maps), and nothing was cleaned up.
    real = loader._switch

    def switch(bpffs: Path, link: str, new_fd: int, uses: set[int]) -> object:
        if link == loader.LINK_SOCKOPS:
            raise RuntimeError("killed here")
        return real(bpffs, link, new_fd, uses)

    def patch(m: pytest.MonkeyPatch) -> None:
        m.setattr(loader, "_switch", switch)
        m.setattr(loader, "_remove_pins", lambda *a, **k: None)

    live, a, b = _migration_dies(lab, objects, patch)
    assert _map_id(lab.bpffs / "ez_socks") not in _attached_map_ids(lab.bpffs, "link_sockops")
    _recovers(lab, live, a, b, "updated")


def test_only_our_pins_move_and_go(lab: Lab, objects: Objects) -> None:
    _install_previous_release(lab, objects).close()
    foreign = lab.bpffs / "someone_else"  # not one of our names: never moved or removed
    fd = syscalls.obj_get(lab.bpffs / "ez_ports")
    syscalls.obj_pin(fd, foreign)
    fd_close(fd)
    loader.install_or_reuse(lab.bpffs, lab.cgroup).close()
    assert foreign.exists()
    with pytest.raises(DataplaneError, match=r"not ours.*someone_else"):
        loader.uninstall(lab.bpffs)
    foreign.unlink()
    loader.uninstall(lab.bpffs)
    assert not lab.bpffs.exists()


# ---- with the chart's capabilities ----------------------------------------------------------

UPGRADE_AS_AGENT = """
import sys
from pathlib import Path
from eztunnel_plugin.bpf import loader
bpffs, cgroup, obj = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dp = loader.install_or_reuse(bpffs, cgroup, obj=Path(obj) if obj else None, isolated=True)
print("action", dp.action)
dp.close()
"""


def _chart_capabilities() -> list[str]:
    helpers = (REPO / "charts" / "eztunnel" / "templates" / "_helpers.tpl").read_text()
    block = helpers[helpers.index('define "eztunnel.capabilities"') :]
    block = block[block.index("add:") : block.index("{{- range .Values.extraCapabilities")]
    caps = re.findall(r"^\s+- ([A-Z_]+)\s*$", block, re.MULTILINE)
    assert caps, "no capabilities found in the chart's helpers"
    return caps


def _as_agent(lab: Lab, obj: Path | None) -> str:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to run with the chart's capability set")
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in _chart_capabilities())])
    proc = subprocess.run(
        [setpriv, "--bounding-set", bounding, "--inh-caps", "-all", "--", sys.executable,
         "-c", UPGRADE_AS_AGENT, str(lab.bpffs), str(lab.cgroup), str(obj or "")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split("action ")[-1].strip()


def test_upgrades_need_no_more_than_the_chart_capabilities(lab: Lab, objects: Objects) -> None:
    old = _install_previous_release(lab, objects)
    a, b = _pods(lab, old)
    live = Held(lab, a, b)
    old.close()
    assert _as_agent(lab, objects["base"]) == "migrated"
    assert _as_agent(lab, objects["variant"]) == "updated"
    assert _as_agent(lab, objects["variant"]) == "reused"
    assert _attached(lab.bpffs, "link_sockops").tag == _tags(objects["variant"])["ez_sockops"]
    live.exchange(2)
    live.finish()


def test_died_after_parking_without_live_flows(lab: Lab, objects: Objects) -> None:
    # The parked generation has no socket, but link_sockops still serves it: the next start
    # must carry its endpoints over (not retire it first), so new pairs are spliced at once.
    old = _install_previous_release(lab, objects)
    a, b = _pods(lab, old)
    old.close()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loader, "_attach_new", _die)
        with pytest.raises(RuntimeError, match="killed here"):
            loader.install_or_reuse(lab.bpffs, lab.cgroup)
    dp = loader.install_or_reuse(lab.bpffs, lab.cgroup)
    try:
        assert dp.action == "installed"
        new = Held(lab, a, b)
        assert len(dp.sockinfo.flows()) == 1
        new.finish()
        # Switched away from it now, and empty: the next start retires it.
        loader.install_or_reuse(lab.bpffs, lab.cgroup).close()
        assert paths.old_generations(lab.bpffs) == []
    finally:
        dp.close()
