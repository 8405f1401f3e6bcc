"""bpf/paths.py: the pin directory, the cgroup, the object, the generations' directories.

The pin directory may itself be a bpffs mount whose parent is not bpffs: what a container
sees when only its own pin directory is mounted (charts/eztunnel bind-mounts the node's
<bpffs>/<pinDir> alone). Each test mounts private bpffs (and tmpfs) instances and bind mounts
under its tmp dir and unmounts them in a finalizer, whatever happens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eztunnel_lab.netlab import Lab
from eztunnel_plugin.bpf import layout, loader, paths
from eztunnel_plugin.errors import DataplaneError

from .conftest import Mount


def container_pin_dir(mount: Mount, tmp_path: Path) -> tuple[Path, Path]:
    """(the node's pin directory, the same directory as the container sees it): a directory
    on a bpffs instance (the node's /sys/fs/bpf/eztunnel, made as kubelet's DirectoryOrCreate
    makes it), bind-mounted alone at the chart's mountPath under a scratch root."""
    node = mount(tmp_path / "node-bpffs", "bpf") / "eztunnel"
    node.mkdir(mode=0o755)
    inside = mount(tmp_path / "rootfs" / "host" / "sys" / "fs" / "bpf" / "eztunnel", f"bind:{node}")
    return node, inside


# A hybrid host: cgroup v1 controllers at /sys/fs/cgroup, the v2 hierarchy elsewhere.
HYBRID_MOUNTINFO = """\
22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
25 22 0:23 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/cpu rw,nosuid shared:11 - cgroup cgroup rw,cpu
"""


def test_cgroup2_root_is_found_where_it_is_mounted() -> None:
    assert paths.cgroup2_root(HYBRID_MOUNTINFO) == Path("/sys/fs/cgroup/unified")
    # This machine's own: a directory of a cgroup2 filesystem.
    assert paths.cgroup2_root().is_dir()


def test_no_cgroup2_mount_is_a_clear_error() -> None:
    v1_only = "\n".join(HYBRID_MOUNTINFO.splitlines()[:2] + HYBRID_MOUNTINFO.splitlines()[3:])
    with pytest.raises(DataplaneError, match="no cgroup2 filesystem is mounted"):
        paths.cgroup2_root(v1_only)


def test_a_missing_cgroup_is_a_clear_error(tmp_path: Path) -> None:
    paths.check_cgroup_dir(tmp_path)
    with pytest.raises(DataplaneError, match=f"cgroup directory {tmp_path}/gone does not exist"):
        paths.check_cgroup_dir(tmp_path / "gone")


def test_the_default_object_is_the_packaged_one() -> None:
    obj = paths.default_object()
    assert obj.name == "eztunnel.bpf.o" and obj.parent.name == "data"
    assert obj.read_bytes()[:4] == b"\x7fELF"


def test_a_pin_directory_name_with_a_dot_is_refused(mount: Mount, tmp_path: Path) -> None:
    root = mount(tmp_path / "bpf", "bpf")
    with pytest.raises(DataplaneError, match=r"'ez\.tunnel' must not contain a dot"):
        paths.check_bpffs_dir(root / "ez.tunnel")


def test_old_generations_are_the_old_directories_only(tmp_path: Path) -> None:
    assert paths.old_generations(tmp_path / "missing") == []
    for name in ("old-v2-m9", "old-v1-m12", "parking", "pending"):
        (tmp_path / name).mkdir()
    (tmp_path / "old-file").touch()  # not a directory: not a generation
    assert [p.name for p in paths.old_generations(tmp_path)] == ["old-v1-m12", "old-v2-m9"]


def test_a_directory_that_is_itself_bpffs_is_accepted(mount: Mount, tmp_path: Path) -> None:
    _, pins = container_pin_dir(mount, tmp_path)
    assert not paths.is_bpffs(pins.parent), "the parent must not be bpffs for this test"
    paths.check_bpffs_dir(pins)


def test_a_missing_directory_is_accepted_in_a_bpffs_parent(mount: Mount, tmp_path: Path) -> None:
    root = mount(tmp_path / "bpf", "bpf")
    paths.check_bpffs_dir(root / "eztunnel")


def test_an_existing_directory_on_another_filesystem_is_refused(
    mount: Mount, tmp_path: Path
) -> None:
    """Its parent being bpffs is not enough: pins would go to the filesystem mounted over it."""
    root = mount(tmp_path / "bpf", "bpf")
    covered = mount(root / "eztunnel", "tmpfs")
    with pytest.raises(DataplaneError, match=f"{covered} is not a bpf filesystem"):
        paths.check_bpffs_dir(covered)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(DataplaneError, match=f"{plain} is not a bpf filesystem"):
        paths.check_bpffs_dir(plain)


def test_a_missing_directory_outside_bpffs_names_its_parent(tmp_path: Path) -> None:
    with pytest.raises(DataplaneError, match=f"{tmp_path} is not a bpf filesystem; mount one with"):
        paths.check_bpffs_dir(tmp_path / "eztunnel")


def test_uninstall_cli_on_an_empty_mounted_directory_succeeds_and_keeps_it(
    mount: Mount, tmp_path: Path
) -> None:
    """The teardown on a node where the agent never ran: nothing to do, and the mount point
    (which rmdir cannot remove) is not an error."""
    _, pins = container_pin_dir(mount, tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "eztunnel_plugin", "uninstall", f"--bpffs={pins}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing pinned" in done.stdout
    assert paths.is_bpffs(pins)


def test_uninstall_still_refuses_foreign_objects_in_a_mounted_directory(
    mount: Mount, tmp_path: Path
) -> None:
    _, pins = container_pin_dir(mount, tmp_path)
    (pins / "someone-else").mkdir()
    with pytest.raises(DataplaneError, match="not ours: \\['someone-else'\\]"):
        loader.uninstall(pins)
    assert (pins / "someone-else").is_dir()


@pytest.mark.kernel
def test_install_reuse_and_uninstall_in_a_mounted_directory(
    lab: Lab, mount: Mount, tmp_path: Path
) -> None:
    node, pins = container_pin_dir(mount, tmp_path)
    dp = loader.install_or_reuse(pins, lab.cgroup, isolated=True)
    dp.close()
    assert not dp.reused
    pinned = set(os.listdir(pins))
    assert pinned >= {*layout.MAPS, loader.LINK_SOCKOPS, loader.LINK_MSG}, pinned
    assert set(os.listdir(node)) == pinned, "the pins are the node's"
    again = loader.install_or_reuse(pins, lab.cgroup)
    assert again.reused
    assert again.attachments()[loader.LINK_SOCKOPS].target_id == os.stat(lab.cgroup).st_ino
    again.close()
    report = loader.uninstall(pins)
    assert loader.LINK_SOCKOPS in report.detached
    assert set(report.unpinned) >= set(layout.MAPS)
    assert os.listdir(node) == [], "pins left behind"
    assert paths.is_bpffs(pins), "the mount point stays"
