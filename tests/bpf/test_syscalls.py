"""bpf/syscalls.py: each bpf(2) command on small throwaway objects (anonymous maps, the
object's programs on a private bpffs and the lab's cgroup), and how failures surface."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from eztunnel_lab.netlab import Lab
from eztunnel_plugin.bpf import layout, paths, syscalls
from eztunnel_plugin.errors import BpfError, EztunnelError, LoadError

from .conftest import Mount

pytestmark = pytest.mark.kernel  # bpf(2) needs root here


def _key(n: int) -> bytes:
    return struct.pack("=Q", n)


@pytest.fixture
def hash_map() -> Iterator[int]:
    """An anonymous hash map u64 -> u64 with room for 64 entries."""
    if os.geteuid() != 0:
        pytest.fail("bpf(2) needs root")
    fd = syscalls.map_create(syscalls.MAP_TYPE_HASH, 8, 8, 64)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def loaded() -> Iterator[syscalls.LoadedObject]:
    """This build's object, loaded (nothing attached, nothing pinned)."""
    obj = syscalls.load_object(paths.default_object())
    try:
        yield obj
    finally:
        obj.close()


@pytest.fixture
def bpffs(mount: Mount, tmp_path: Path) -> Path:
    """A private bpffs instance: whatever is pinned there goes with its unmount."""
    return mount(tmp_path / "bpffs", "bpf")


# ---- maps --------------------------------------------------------------------------------


def test_map_update_lookup_delete(hash_map: int) -> None:
    assert syscalls.map_lookup(hash_map, _key(1), 8) is None
    syscalls.map_update(hash_map, _key(1), _key(10))
    assert syscalls.map_lookup(hash_map, _key(1), 8) == _key(10)
    syscalls.map_update(hash_map, _key(1), _key(11))  # ANY: replaces
    assert syscalls.map_lookup(hash_map, _key(1), 8) == _key(11)
    with pytest.raises(BpfError) as e:
        syscalls.map_update(hash_map, _key(1), _key(12), syscalls.NOEXIST)
    assert e.value.errno == errno.EEXIST
    assert syscalls.map_lookup(hash_map, _key(1), 8) == _key(11)
    assert syscalls.map_delete(hash_map, _key(1)) is True
    assert syscalls.map_delete(hash_map, _key(1)) is False  # absent: False, no error
    assert syscalls.map_lookup(hash_map, _key(1), 8) is None


def test_map_info_describes_the_map(hash_map: int) -> None:
    info = syscalls.map_info(hash_map)
    assert (info.type, info.key_size, info.value_size, info.max_entries) == (
        syscalls.MAP_TYPE_HASH, 8, 8, 64,
    )  # fmt: skip
    assert info.id > 0 and info.name == ""
    assert syscalls.fd_kind(hash_map) == "bpf-map"


def test_map_keys_lists_every_key_once_within_the_limit(hash_map: int) -> None:
    want = {_key(n) for n in range(1, 41)}
    for k in want:
        syscalls.map_update(hash_map, k, k)
    keys = syscalls.map_keys(hash_map, 8)
    assert len(keys) == len(want) and set(keys) == want
    assert len(syscalls.map_keys(hash_map, 8, limit=5)) == 5


def test_a_full_map_refuses_a_new_key(hash_map: int) -> None:
    for n in range(64):
        syscalls.map_update(hash_map, _key(n), _key(n))
    with pytest.raises(BpfError) as e:
        syscalls.map_update(hash_map, _key(64), _key(64))
    assert e.value.errno == errno.E2BIG


def _walk(fd: int, count: int) -> tuple[list[bytes], int]:
    """Every key by batches of about `count` from bucket 0 on; and the batches taken."""
    keys: list[bytes] = []
    cursor: int | None = 0
    batches = 0
    while cursor is not None and batches < 1000:
        bucket, size = cursor, count
        while True:
            try:
                entries, cursor = syscalls.map_lookup_batch(fd, 8, 8, bucket, size)
                break
            except BpfError as e:
                assert e.errno == errno.ENOSPC and size < 64, e  # a bucket holds more than size
                size *= 2
        for k, v in entries:
            assert k == v
        keys += [k for k, _ in entries]
        batches += 1
    return keys, batches


def test_batch_lookup_walks_every_entry_exactly_once(hash_map: int) -> None:
    want = sorted(_key(n) for n in range(1, 51))
    for k in want:
        syscalls.map_update(hash_map, k, k)
    keys, batches = _walk(hash_map, 8)
    assert sorted(keys) == want
    assert batches > 1, "a walk of 50 entries by 8 must take several batches"
    keys, batches = _walk(hash_map, 64)
    assert sorted(keys) == want and batches == 1


def test_batch_lookup_of_an_empty_map_is_the_end(hash_map: int) -> None:
    assert syscalls.map_lookup_batch(hash_map, 8, 8, 0, 8) == ([], None)


def test_per_cpu_values_come_one_per_possible_cpu() -> None:
    fd = syscalls.map_create(syscalls.MAP_TYPE_PERCPU_ARRAY, 4, 4, 2)  # 4-byte values
    try:
        cpus = syscalls.possible_cpus()
        assert cpus >= (os.cpu_count() or 1)
        # Each slot is rounded up to 8 bytes on the wire.
        syscalls.map_update(fd, bytes(4), b"".join(struct.pack("=II", c, 0) for c in range(cpus)))
        want = [struct.pack("=I", c) for c in range(cpus)]
        assert syscalls.percpu_lookup(fd, bytes(4), 4) == want
        assert syscalls.percpu_lookup(fd, struct.pack("=I", 5), 4) == []  # past the array
    finally:
        os.close(fd)


# ---- pins ----------------------------------------------------------------------------------


def test_pin_and_open_a_pin(hash_map: int, bpffs: Path) -> None:
    syscalls.map_update(hash_map, _key(7), _key(70))
    syscalls.obj_pin(hash_map, bpffs / "m")
    with syscalls.pin_fd(bpffs / "m") as fd:
        assert fd != hash_map
        assert syscalls.map_info(fd).id == syscalls.map_info(hash_map).id
        assert syscalls.map_lookup(fd, _key(7), 8) == _key(70)
    assert syscalls.fd_kind(fd) != "bpf-map", "pin_fd closes its fd"
    with pytest.raises(BpfError) as e:
        syscalls.obj_pin(hash_map, bpffs / "m")
    assert e.value.errno == errno.EEXIST


def test_errors_carry_errno_and_what_failed(bpffs: Path) -> None:
    with pytest.raises(BpfError, match=f"open pin {bpffs}/missing: No such file") as e:
        syscalls.obj_get(bpffs / "missing")
    assert e.value.errno == errno.ENOENT
    assert isinstance(e.value, OSError) and isinstance(e.value, EztunnelError)
    with pytest.raises(BpfError, match="map update: Bad file descriptor"):
        syscalls.map_update(1 << 20, _key(1), _key(1))
    with pytest.raises(BpfError) as e:
        syscalls.map_create(syscalls.MAP_TYPE_HASH, 0, 8, 4)  # a hash map needs a key
    assert e.value.errno == errno.EINVAL


# ---- programs and links ----------------------------------------------------------------


def test_loaded_programs_and_their_maps(loaded: syscalls.LoadedObject) -> None:
    assert {"ez_sockops", "ez_msg", "ez_skb_verdict"} <= set(loaded.prog_fds)
    assert set(layout.MAPS) <= set(loaded.map_fds)
    sockops = loaded.prog_fds["ez_sockops"]
    info = syscalls.prog_info(sockops)
    assert info.name == "ez_sockops" and len(info.tag) == 16 and info.id > 0
    uses = set(syscalls.prog_map_ids(sockops))
    assert syscalls.map_info(loaded.map_fds["ez_sockinfo"]).id in uses
    assert syscalls.own_prog_fds()["ez_sockops"] > 0
    again = syscalls.prog_get_fd_by_id(info.id)
    try:
        assert syscalls.prog_info(again) == info
    finally:
        os.close(again)


def test_a_sockmap_link_and_its_update(loaded: syscalls.LoadedObject) -> None:
    msg, verdict = loaded.prog_fds["ez_msg"], loaded.prog_fds["ez_skb_verdict"]
    socks = loaded.map_fds["ez_socks"]
    link = syscalls.link_create(msg, socks, syscalls.SK_MSG_VERDICT)
    try:
        assert syscalls.fd_kind(link) == "bpf_link"
        info = syscalls.link_info(link)
        assert info.type == syscalls.LINK_TYPE_SOCKMAP
        assert info.prog_id == syscalls.prog_info(msg).id
        assert info.target_id == syscalls.map_info(socks).id
        assert info.attach_type == syscalls.SK_MSG_VERDICT
        # With the program it is expected to run, an update refuses if another one runs.
        with pytest.raises(BpfError) as e:
            syscalls.link_update(link, msg, old_prog_fd=verdict)
        assert e.value.errno == errno.EPERM
        syscalls.link_update(link, msg, old_prog_fd=msg)
        assert syscalls.link_info(link).prog_id == info.prog_id
    finally:
        os.close(link)


def test_a_cgroup_link_pinned_then_detached(
    loaded: syscalls.LoadedObject, lab: Lab, bpffs: Path
) -> None:
    cg = os.open(lab.cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = syscalls.link_create(loaded.prog_fds["ez_sockops"], cg, syscalls.CGROUP_SOCK_OPS)
    finally:
        os.close(cg)
    try:
        info = syscalls.link_info(link)
        assert info.type == syscalls.LINK_TYPE_CGROUP
        assert info.target_id == os.stat(lab.cgroup).st_ino
        assert info.attach_type == syscalls.CGROUP_SOCK_OPS
        syscalls.obj_pin(link, bpffs / "link")
        with syscalls.pin_fd(bpffs / "link") as pinned:
            assert syscalls.link_info(pinned).id == info.id
            syscalls.link_detach(pinned)
        # Detached: the link object lives on (pinned), attached to nothing.
        assert syscalls.link_info(link).target_id == 0
    finally:
        os.close(link)


def test_loading_what_is_not_an_object_says_why(tmp_path: Path) -> None:
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(LoadError, match=f"opening {junk}"):
        syscalls.load_object(junk)


def test_reusing_a_map_of_another_shape_is_refused(hash_map: int) -> None:
    obj = paths.default_object()
    with pytest.raises(LoadError, match=r"pinned map ez_sockinfo .* differs from the object's"):
        syscalls.load_object(obj, {"ez_sockinfo": hash_map})
    with pytest.raises(LoadError, match="has no map ez_nothing"):
        syscalls.load_object(obj, {"ez_nothing": hash_map})
