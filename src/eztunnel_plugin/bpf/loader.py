"""Bring the pins under a bpffs directory to this build's object, and remove them.

Install (load, pin, attach through pinned BPF links), reuse complete pins, swap changed
programs in place (BPF_LINK_UPDATE), migrate a new layout as a new generation beside the
old one until it drains, uninstall without dropping a queued byte (docs/dataplane.md,
"Upgrades"). The agent runs it in a short-lived child, `python -m eztunnel_plugin.bpf.loader`,
so libbpf never takes memory in the long-running process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from eztunnel_plugin import log
from eztunnel_plugin.bpf import layout, maps, paths, syscalls
from eztunnel_plugin.bpf.maps import Dataplane
from eztunnel_plugin.errors import BpfError, DataplaneError, LoadError

LINK_SOCKOPS = "link_sockops"
LINK_MSG = "link_msg"
LINK_SKB = "link_skb"
# The program behind each link, and the pin that keeps it reachable: opening the
# attached program by id would need CAP_SYS_ADMIN, which the agent does not have.
PROGRAMS = {LINK_SOCKOPS: "ez_sockops", LINK_MSG: "ez_msg", LINK_SKB: "ez_skb_verdict"}
PROG_PINS = {LINK_SOCKOPS: "prog_sockops", LINK_MSG: "prog_msg", LINK_SKB: "prog_skb"}
_PARKING = "parking"  # transient: a generation being moved aside
_PENDING = "pending"  # transient: a program pin about to replace another
_LOCK_WAIT = 30.0
_CHILD_TIMEOUT = 120.0

_log = log.get(__name__)


@dataclass
class Prepared:
    """What install_or_reuse did to the pins (the isolated loader reports it as JSON)."""

    action: str  # installed | reused | updated | migrated
    updated: list[dict[str, str | int]] = field(default_factory=list)  # per link swapped
    from_layout: int = 0  # migrated: the previous generation's layout version
    parked: str = ""  # migrated: where the previous generation now lives
    retired: list[str] = field(default_factory=list)  # drained generations unpinned
    removed: list[str] = field(default_factory=list)  # pins of an incomplete install


@dataclass
class UninstallReport:
    bpffs: Path
    detached: list[str]
    unpinned: list[str]
    # Still alive: they keep the programs until they close (the current generation's
    # paired sockets, plus every socket still in a previous generation's sockhash).
    paired_sockets: int


# ---- the entry points ---------------------------------------------------------------------


def install_or_reuse(
    bpffs: Path = paths.DEFAULT_BPFFS,
    cgroup: Path | None = None,
    obj: Path | None = None,
    capture_ports: tuple[int, ...] = layout.DEFAULT_CAPTURE_PORTS,
    skb_verdict: bool = False,
    isolated: bool = False,
) -> Dataplane:
    """Reuse complete pins under `bpffs` (swapping in changed programs, migrating an
    older layout), or load, pin and attach from scratch; returns the open handle.

    isolated: load in a short-lived child process, so that libbpf and the object's
    loading never take memory in a long-running agent.
    """
    cgroup = cgroup or paths.cgroup2_root()
    paths.check_bpffs_dir(bpffs)
    paths.check_cgroup_dir(cgroup)
    if isolated:
        done = _prepare_in_child(bpffs, cgroup, obj, capture_ports, skb_verdict)
    else:
        done = _prepare(bpffs, cgroup, obj or paths.default_object(), capture_ports, skb_verdict)
    dp = _reuse(bpffs, cgroup, _expected_links(skb_verdict))
    dp.action = done.action
    dp.reused = done.action != "installed"
    _log_prepared(done, bpffs, cgroup)
    return dp


def uninstall(bpffs: Path = paths.DEFAULT_BPFFS) -> UninstallReport:
    """Turn pairing off, detach, unpin every generation; never deletes a socket from a
    SOCKHASH."""
    report = UninstallReport(bpffs, [], [], 0)
    if not bpffs.is_dir():
        return report
    paths.check_bpffs_dir(bpffs)
    with _locked(bpffs):
        _discard_transient(bpffs)
        gens = [bpffs, *paths.old_generations(bpffs)]
        # 1. Kill switch first, in every generation: paired sockets fall back to TCP on
        #    their next send, and what they already queued stays deliverable (their
        #    psock lives on).
        for gen in gens:
            if (gen / "ez_config").exists():
                with contextlib.suppress(DataplaneError, OSError):
                    maps.write_enabled(gen / "ez_config", False)
            report.paired_sockets += _live_sockets(gen, current=gen == bpffs)
        # 2. Detach links: sockops first (no new sockets), then the map programs.
        for name in (LINK_SOCKOPS, LINK_SKB, LINK_MSG):
            for gen in gens:
                if (gen / name).exists():
                    _detach(gen / name)
                    report.detached.append(name if gen == bpffs else f"{gen.name}/{name}")
        # 3. Unpin our maps, links and programs; anything else is not ours to remove.
        for gen in reversed(gens):
            prefix = "" if gen == bpffs else f"{gen.name}/"
            for name in sorted(_pins(gen)):
                (gen / name).unlink()
                report.unpinned.append(prefix + name)
            if gen != bpffs:
                _rmdir_ours(gen)
        _rmdir_ours(bpffs)
    _log.info(
        "dataplane uninstalled",
        bpffs=str(bpffs),
        detached=report.detached,
        live_paired_sockets=report.paired_sockets,
    )
    return report


def retire_drained(bpffs: Path = paths.DEFAULT_BPFFS, wait: float = _LOCK_WAIT) -> list[str]:
    """Unpin every previous generation whose sockhash is empty: no socket runs its
    programs or reads its maps any more. Returns the generations retired. Cheap when
    there is none (a periodic caller passes wait=0 and retries later when busy)."""
    if not paths.old_generations(bpffs):
        return []
    with _locked(bpffs, wait):
        retired = _retire_drained(bpffs)
    for name in retired:
        _log.info("old generation retired", bpffs=str(bpffs), generation=name)
    return retired


# ---- install, reuse, update ---------------------------------------------------------------


def _reuse(bpffs: Path, cgroup: Path, expected: set[str]) -> Dataplane:
    dp = Dataplane.open(bpffs)
    try:
        dp.links = {name: syscalls.obj_get(bpffs / name) for name in expected}
        _check_cgroup(bpffs, cgroup)
    except BaseException:
        dp.close()
        raise
    return dp


def _install(
    bpffs: Path,
    cgroup: Path,
    obj: Path,
    capture_ports: tuple[int, ...],
    skb_verdict: bool,
    enabled: bool = True,
    endpoints: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A fresh generation at the top of `bpffs`; an existing sockops link is switched."""
    bpffs.mkdir(mode=0o700, exist_ok=True)
    loaded = _load(obj, {})
    try:
        _attach_new(bpffs, cgroup, loaded, capture_ports, skb_verdict, enabled, endpoints)
    finally:
        loaded.close()  # the pins and links hold what they need now


def _attach_new(
    bpffs: Path,
    cgroup: Path,
    loaded: syscalls.LoadedObject,
    capture_ports: tuple[int, ...],
    skb_verdict: bool,
    enabled: bool = True,
    endpoints: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, str | int] | None:
    """Pin a loaded object's maps at the top of `bpffs`, configure them, attach its map
    programs, then its sockops program: a new link, or the pinned one switched in one
    step (a migration or a salvaged install). On failure, unpin only what it pinned.
    Returns the switch of link_sockops, if it was one."""
    progs = loaded.prog_fds
    fds = {name: os.dup(loaded.map_fds[name]) for name in layout.MAPS}
    links: dict[str, int] = {}
    pinned: list[str] = []
    switched = None

    def attach(name: str, target_fd: int, attach_type: int) -> None:
        pinned.extend([name, PROG_PINS[name]])
        prog_fd = progs[PROGRAMS[name]]
        links[name] = syscalls.link_create(prog_fd, target_fd, attach_type)
        syscalls.obj_pin(links[name], bpffs / name)
        syscalls.obj_pin(prog_fd, bpffs / PROG_PINS[name])

    try:
        for name, fd in fds.items():
            syscalls.obj_pin(fd, bpffs / name)
            pinned.append(name)
        maps.ConfigMap(fds["ez_config"]).reset(enabled)
        maps.CapturePortMap(fds["ez_ports"]).set(capture_ports)
        for key, value in endpoints or []:
            syscalls.map_update(fds["ez_endpoints"], key, value)
        # sk_msg (and the optional verdict) first: a socket takes the map's
        # programs when it is added, and sockops adds sockets.
        attach(LINK_MSG, fds["ez_socks"], syscalls.SK_MSG_VERDICT)
        if skb_verdict:
            attach(LINK_SKB, fds["ez_socks"], syscalls.SK_SKB_STREAM_VERDICT)
        if (bpffs / LINK_SOCKOPS).exists():
            uses = {syscalls.map_info(fd).id for fd in fds.values()}
            switched = _switch(bpffs, LINK_SOCKOPS, progs["ez_sockops"], uses)
        else:
            cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                attach(LINK_SOCKOPS, cg_fd, syscalls.CGROUP_SOCK_OPS)
            finally:
                os.close(cg_fd)
    except BaseException:
        _remove_pins(bpffs, set(pinned) & _pins(bpffs), kill_switch=False)
        raise
    finally:
        for fd in [*fds.values(), *links.values()]:
            os.close(fd)
    return switched


def _check_cgroup(bpffs: Path, cgroup: Path) -> None:
    """The pinned sockops link is attached to `cgroup`."""
    with syscalls.pin_fd(bpffs / LINK_SOCKOPS) as fd:
        attached = syscalls.link_info(fd).target_id
    cg_id = os.stat(cgroup).st_ino
    if attached != cg_id:
        raise DataplaneError(
            f"pins under {bpffs} are attached to another cgroup (id {attached}), "
            f"not {cgroup} (id {cg_id}); uninstall first to move them"
        )


def _load(obj: Path, reuse: dict[str, int]) -> syscalls.LoadedObject:
    try:
        return syscalls.load_object(obj, reuse)
    except LoadError as e:
        raise DataplaneError(f"loading {obj} failed: {e}") from e


def _attached_prog(bpffs: Path, link: str, prog_id: int) -> int | None:
    """An fd of the program `link` runs, from its program pin (top first, then previous
    generations); None when no pin holds it (pins made before program pins existed)."""
    for gen in [bpffs, *paths.old_generations(bpffs)]:
        try:
            fd = syscalls.obj_get(gen / PROG_PINS[link])
        except BpfError as e:
            if e.errno == errno.ENOENT:
                continue
            raise
        if syscalls.prog_info(fd).id == prog_id:
            return fd
        os.close(fd)
    return None


def _switch(bpffs: Path, link: str, new_fd: int, uses: set[int]) -> dict[str, str | int] | None:
    """Point the pinned `link` at program `new_fd` in one BPF_LINK_UPDATE, unless it already
    runs the same code (equal tag) on the maps `new_fd` uses among `uses`. Returns what
    changed, or None."""
    with syscalls.pin_fd(bpffs / link) as link_fd:
        attached = syscalls.link_info(link_fd).prog_id
        cur_fd = _attached_prog(bpffs, link, attached)
        try:
            new = syscalls.prog_info(new_fd)
            wanted = set(syscalls.prog_map_ids(new_fd)) & uses
            old_tag = "unknown"
            if cur_fd is not None:
                old_tag = syscalls.prog_info(cur_fd).tag
                if old_tag == new.tag and wanted <= set(syscalls.prog_map_ids(cur_fd)):
                    return None
            try:
                # With the old program known, the kernel refuses (EPERM) if someone
                # switched the link meanwhile instead of silently overwriting it.
                syscalls.link_update(link_fd, new_fd, cur_fd)
            except BpfError as e:
                if e.errno == errno.EPERM and cur_fd is not None:
                    raise DataplaneError(
                        f"{bpffs / link} was switched to another program during this upgrade "
                        "(a second eztunnel-plugin?); start again"
                    ) from e
                raise
        finally:
            if cur_fd is not None:
                os.close(cur_fd)
    _pin_replace(new_fd, bpffs, PROG_PINS[link])
    return {
        "link": link,
        "old_prog_id": attached,
        "new_prog_id": new.id,
        "old_tag": old_tag,
        "new_tag": new.tag,
    }


def _pin_replace(fd: int, bpffs: Path, name: str) -> None:
    """Pin `fd` as bpffs/name in one rename, replacing what was there."""
    pending = bpffs / _PENDING
    pending.mkdir(mode=0o700, exist_ok=True)
    syscalls.obj_pin(fd, pending / name)
    os.rename(pending / name, bpffs / name)
    pending.rmdir()


def _update_programs(bpffs: Path, obj: Path, pins: set[str]) -> list[dict[str, str | int]]:
    """Same layout: load the object on the pinned maps and swap each link whose program
    differs. Map programs first (a socket takes them when it joins the sockhash)."""
    fds = {name: syscalls.obj_get(bpffs / name) for name in layout.MAPS}
    try:
        try:
            loaded = syscalls.load_object(obj, fds)
        except LoadError as e:
            raise DataplaneError(
                f"{obj} cannot run on the maps pinned under {bpffs}: {e}; its layout changed "
                "without a new EZ_LAYOUT_VERSION (bpf/eztunnel.h), which a migration needs"
            ) from e
        try:
            pinned_ids = {syscalls.map_info(fd).id for fd in fds.values()}
            changes = []
            for link in (LINK_MSG, LINK_SKB, LINK_SOCKOPS):
                if link in pins:
                    change = _switch(bpffs, link, loaded.prog_fds[PROGRAMS[link]], pinned_ids)
                    if change:
                        changes.append(change)
            return changes
        finally:
            loaded.close()
    finally:
        for fd in fds.values():
            os.close(fd)


# ---- generations -------------------------------------------------------------------------
#
# The current generation's pins are at the top of the bpffs directory (its maps, link_msg,
# link_skb, their prog_* pins), beside the one cgroup link, link_sockops. A layout
# migration moves the previous generation into old-v<layout>-m<sockhash id>/ (hard links,
# then one directory rename, then the old names go), pins the new one at the top and
# switches link_sockops to the new program with one BPF_LINK_UPDATE. Each step leaves a
# state the next start recognises and completes (tests/bpf/test_loader.py breaks each one).


def _endpoints_to_carry(path: Path) -> list[tuple[bytes, bytes]]:
    """The previous generation's endpoints, when their layout is this build's: new
    connections are spliced from the first moment, before the agent's first sync."""
    key_size, value_size = layout.size_of(layout.Addr), layout.size_of(layout.Endpoint)
    out: list[tuple[bytes, bytes]] = []
    with syscalls.pin_fd(path) as fd:
        info = syscalls.map_info(fd)
        if (info.key_size, info.value_size) != (key_size, value_size):
            return out
        for key in syscalls.map_keys(fd, key_size, limit=layout.MAX_ENDPOINTS):
            value = syscalls.map_lookup(fd, key, value_size)
            if value is not None:
                out.append((key, value))
    return out


def _park(bpffs: Path, old_version: int) -> str:
    """Move the top generation (all but link_sockops) into old-v<layout>-m<sockhash id>/:
    hard links made in a parking directory, one rename, then the top names go."""
    with syscalls.pin_fd(bpffs / "ez_socks") as fd:
        socks_id = syscalls.map_info(fd).id
    name = f"{paths.OLD_PREFIX}v{old_version}-m{socks_id}"
    target = bpffs / name
    moving = _pins(bpffs) - {LINK_SOCKOPS}
    if not target.is_dir():
        parking = bpffs / _PARKING
        parking.mkdir(mode=0o700)
        for pin in moving:
            os.link(bpffs / pin, parking / pin)
        parking.rename(target)
    for pin in moving:
        if not (target / pin).exists():  # a start that died after the rename
            os.link(bpffs / pin, target / pin)
        (bpffs / pin).unlink()
    return name


def _migrate(
    bpffs: Path,
    cgroup: Path,
    obj: Path,
    capture_ports: tuple[int, ...],
    skb_verdict: bool,
    old_version: int,
) -> Prepared:
    """Another layout: the new generation beside the old one, one switch of link_sockops."""
    loaded = _load(obj, {})  # verified before anything changes
    try:
        enabled, _, _ = maps.config_head(bpffs / "ez_config")
        endpoints = _endpoints_to_carry(bpffs / "ez_endpoints")
        parked = _park(bpffs, old_version)
        switched = _attach_new(
            bpffs, cgroup, loaded, capture_ports, skb_verdict, bool(enabled), endpoints
        )
    finally:
        loaded.close()
    return Prepared(
        "migrated", updated=[switched] if switched else [], from_layout=old_version, parked=parked
    )


def _served_generation(bpffs: Path) -> Path | None:
    """The previous generation whose maps the attached sockops program uses, if any."""
    if not (bpffs / LINK_SOCKOPS).exists():
        return None
    with syscalls.pin_fd(bpffs / LINK_SOCKOPS) as fd:
        prog_fd = _attached_prog(bpffs, LINK_SOCKOPS, syscalls.link_info(fd).prog_id)
    if prog_fd is None:
        return None
    try:
        uses = set(syscalls.prog_map_ids(prog_fd))
    finally:
        os.close(prog_fd)
    for gen in paths.old_generations(bpffs):
        with contextlib.suppress(OSError), syscalls.pin_fd(gen / "ez_socks") as socks:
            if syscalls.map_info(socks).id in uses:
                return gen
    return None


def _salvage(bpffs: Path, cgroup: Path, pins: set[str]) -> list[str]:
    """An incomplete top generation (an install or a migration died half-way): remove it,
    but keep a link_sockops attached to this cgroup, so the install switches it rather than
    leaving a moment without a program. Second names of a parked generation just go."""
    keep = set()
    if LINK_SOCKOPS in pins:
        with contextlib.suppress(DataplaneError, OSError):
            _check_cgroup(bpffs, cgroup)
            keep = {LINK_SOCKOPS, PROG_PINS[LINK_SOCKOPS]} & pins
    parked = {
        os.stat(Path(e.path)).st_ino
        for gen in paths.old_generations(bpffs)
        for e in os.scandir(gen)
        if not e.is_dir()
    }
    leftovers = pins - keep
    seconds = {name for name in leftovers if os.stat(bpffs / name).st_ino in parked}
    for name in seconds:
        (bpffs / name).unlink()
    _remove_pins(bpffs, leftovers - seconds, kill_switch=True)
    return sorted(leftovers)


def _prepare(
    bpffs: Path,
    cgroup: Path,
    obj: Path,
    capture_ports: tuple[int, ...],
    skb_verdict: bool,
) -> Prepared:
    """Bring the pins under `bpffs` to this object: install, keep, swap programs, or
    migrate. Logs nothing (it may run in the isolated child); the caller logs the result."""
    bpffs.mkdir(mode=0o700, exist_ok=True)
    with _locked(bpffs):
        _discard_transient(bpffs)
        # Before any migration of this start: a generation parked now may still have a
        # sockops call in flight, one parked at an earlier start cannot.
        retired = _retire_drained(bpffs)
        pins = _pins(bpffs)
        done: Prepared | None = None
        if {"ez_config", "ez_socks", LINK_SOCKOPS} <= pins:
            _check_cgroup(bpffs, cgroup)
            _, version, _ = maps.config_head(bpffs / "ez_config")
            if version != layout.LAYOUT_VERSION:
                done = _migrate(bpffs, cgroup, obj, capture_ports, skb_verdict, version)
            elif pins >= set(layout.MAPS) | _expected_links(skb_verdict):
                with contextlib.ExitStack() as stack:
                    fds = {n: stack.enter_context(syscalls.pin_fd(bpffs / n)) for n in layout.MAPS}
                    problem = maps.sizes_problem(fds)
                if problem:
                    raise DataplaneError(
                        f"pinned map {bpffs}/{problem}, with the same layout version "
                        f"{version}; run `eztunnel-plugin uninstall --bpffs {bpffs}` first"
                    )
                changes = _update_programs(bpffs, obj, pins)
                done = Prepared("updated" if changes else "reused", updated=changes)
        if done is None:
            removed = _salvage(bpffs, cgroup, pins) if pins else []
            # A migration that died after parking: the parked generation still serves
            # link_sockops; carry its switch and endpoints over as the migration would.
            enabled, endpoints = True, None
            if (replaced := _served_generation(bpffs)) is not None:
                enabled = bool(maps.config_head(replaced / "ez_config")[0])
                endpoints = _endpoints_to_carry(replaced / "ez_endpoints")
            _install(bpffs, cgroup, obj, capture_ports, skb_verdict, enabled, endpoints)
            done = Prepared("installed", removed=removed)
        done.retired = retired
        return done


def _log_prepared(done: Prepared, bpffs: Path, cgroup: Path) -> None:
    where = {"bpffs": str(bpffs), "cgroup": str(cgroup)}
    if done.removed:
        _log.warning("removed incomplete pins", pins=done.removed, **where)
    for name in done.retired:
        _log.info("old generation retired", generation=name, **where)
    for change in done.updated:
        _log.info("program updated", **change, **where)
    if done.action == "migrated":
        _log.info(
            "dataplane migrated",
            from_layout=done.from_layout,
            to_layout=layout.LAYOUT_VERSION,
            previous_generation=done.parked,
            **where,
        )
    elif done.action == "reused":
        _log.info("programs unchanged", **where)
    _log.info(f"dataplane {'installed' if done.action == 'installed' else 'reused'}", **where)


# ---- pins, links, the lock ------------------------------------------------------------------


def _ours(name: str) -> bool:
    return name.startswith(("ez_", "link_", "prog_"))


def _pins(directory: Path) -> set[str]:
    """Our pins directly in `directory` (sub-directories are other generations)."""
    if not directory.is_dir():
        return set()
    return {e.name for e in os.scandir(directory) if _ours(e.name) and not e.is_dir()}


def _expected_links(skb_verdict: bool) -> set[str]:
    return {LINK_SOCKOPS, LINK_MSG} | ({LINK_SKB} if skb_verdict else set())


@contextlib.contextmanager
def _locked(bpffs: Path, wait: float = _LOCK_WAIT) -> Iterator[None]:
    """One installer, upgrader or uninstaller at a time per bpffs directory."""
    fd = os.open(bpffs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DataplaneError(
                        f"another eztunnel-plugin process has held {bpffs} for {wait:.0f} s "
                        "(install, upgrade or uninstall); try again once it is done"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sockhash_sockets(path: Path, limit: int = layout.MAX_SOCKETS) -> int:
    with syscalls.pin_fd(path) as fd:
        return len(syscalls.map_keys(fd, syscalls.map_info(fd).key_size, limit=limit))


def _live_sockets(gen: Path, current: bool) -> int:
    if current and (gen / "ez_config").exists():
        with contextlib.suppress(DataplaneError, OSError), Dataplane.open(gen) as dp:
            socks = dp.sockinfo.sockets().values()
            spliced = (layout.SockState.PAIRED, layout.SockState.TCP_PAIRED)
            return sum(1 for s in socks if s.state in spliced)
    if (gen / "ez_socks").exists():
        with contextlib.suppress(OSError):
            return _sockhash_sockets(gen / "ez_socks")
    return 0


def _detach(path: Path) -> None:
    with syscalls.pin_fd(path) as fd:
        try:
            syscalls.link_detach(fd)
        except BpfError as e:
            if e.errno not in (errno.ENOLINK, errno.EINVAL):
                raise


def _remove_pins(directory: Path, names: set[str], kill_switch: bool) -> None:
    """Detach (sockops first) and unpin `names` of one generation."""
    if kill_switch and "ez_config" in names:
        with contextlib.suppress(DataplaneError, OSError):
            maps.write_enabled(directory / "ez_config", False)
    for link in (LINK_SOCKOPS, LINK_SKB, LINK_MSG):
        if link in names:
            _detach(directory / link)
    for name in sorted(names):
        (directory / name).unlink(missing_ok=True)


def _rmdir_ours(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError as e:
        left = sorted(os.listdir(directory))
        # EBUSY on an empty directory: it is a mount point (the chart's), clean but kept.
        if left or e.errno != errno.EBUSY:
            raise DataplaneError(
                f"{directory} still holds objects that are not ours: {left}"
            ) from e


def _discard_transient(bpffs: Path) -> None:
    """Leftovers of a start that died: a half-made parking directory holds only second
    names of pins that are still at the top; a pending program pin was never attached."""
    for name in (_PARKING, _PENDING):
        left = bpffs / name
        if left.is_dir():
            for entry in os.scandir(left):
                if _ours(entry.name) and not entry.is_dir():
                    os.unlink(entry.path)
            left.rmdir()


def _retire_drained(bpffs: Path) -> list[str]:
    retired = []
    serving = _served_generation(bpffs)  # a migration died before its switch: still live
    for gen in paths.old_generations(bpffs):
        socks = gen / "ez_socks"
        if gen == serving:
            continue
        if socks.exists() and _sockhash_sockets(socks, limit=1):
            continue
        # Empty: a socket joins a sockhash only from that generation's sockops program,
        # which stopped running when link_sockops was switched (at an earlier start).
        _remove_pins(gen, _pins(gen), kill_switch=False)
        with contextlib.suppress(OSError):
            gen.rmdir()
            retired.append(gen.name)
    return retired


# ---- the isolated loader: a child process, one JSON line back -------------------------------


def _prepare_in_child(
    bpffs: Path,
    cgroup: Path,
    obj: Path | None,
    capture_ports: tuple[int, ...],
    skb_verdict: bool,
) -> Prepared:
    ports = ",".join(map(str, capture_ports))
    argv = [sys.executable, "-m", "eztunnel_plugin.bpf.loader", str(bpffs), str(cgroup), ports,
            str(obj or ""), "1" if skb_verdict else "0"]  # fmt: skip
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=_CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise DataplaneError(
            f"the BPF loader process did not finish in {_CHILD_TIMEOUT:.0f} s"
        ) from e
    lines = proc.stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        reply = {}
    if "prepared" in reply:
        return Prepared(**reply["prepared"])
    if "error" in reply:
        raise DataplaneError(str(reply["error"]))
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise DataplaneError(f"the BPF loader process failed (exit {proc.returncode}): {last}")


def _child_main(argv: list[str]) -> int:
    """The isolated loader: install, keep, upgrade or migrate, report as one JSON line, exit
    (the pins keep everything)."""
    log.configure("console", "warning")
    bpffs, cgroup, ports, obj, skb = argv
    try:
        done = _prepare(
            Path(bpffs), Path(cgroup), Path(obj) if obj else paths.default_object(),
            tuple(int(p) for p in ports.split(",")), skb == "1",
        )  # fmt: skip
    except (DataplaneError, OSError) as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps({"prepared": dataclasses.asdict(done)}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
