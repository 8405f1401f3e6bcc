"""The pin directory may itself be a bpffs mount whose parent is not bpffs: what a container
sees when only its own pin directory is mounted (charts/eztunnel bind-mounts the node's
<bpffs>/<pinDir> alone). Each test mounts private bpffs (and tmpfs) instances and bind mounts
under its tmp dir and unmounts them in a finalizer, whatever happens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eztunnel_lab.netlab import Lab
from eztunnel_plugin.bpf import dataplane, layout

Mount = Callable[[Path, str], Path]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    """mount(dir, fstype): a fresh filesystem instance at dir (created); fstype "bind:<src>"
    bind-mounts src there instead. Unmounted at the end, last first."""
    if os.geteuid() != 0:
        pytest.fail("these tests mount bpffs: they need root")
    mounted: list[Path] = []

    def do(path: Path, fstype: str) -> Path:
        assert path.is_relative_to(tmp_path), "mount only below the test's own tmp dir"
        path.mkdir(parents=True, exist_ok=True)
        if fstype.startswith("bind:"):
            argv = ["mount", "--bind", fstype.removeprefix("bind:"), str(path)]
        else:
            argv = ["mount", "-t", fstype, fstype, str(path)]
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
        mounted.append(path)
        return path

    yield do
    for path in reversed(mounted):
        # Unmounting drops a private bpffs instance with whatever is still pinned in it.
        done = subprocess.run(["umount", str(path)], check=False, capture_output=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def container_pin_dir(mount: Mount, tmp_path: Path) -> tuple[Path, Path]:
    """(the node's pin directory, the same directory as the container sees it): a directory
    on a bpffs instance (the node's /sys/fs/bpf/eztunnel, made as kubelet's DirectoryOrCreate
    makes it), bind-mounted alone at the chart's mountPath under a scratch root."""
    node = mount(tmp_path / "node-bpffs", "bpf") / "eztunnel"
    node.mkdir(mode=0o755)
    inside = mount(tmp_path / "rootfs" / "host" / "sys" / "fs" / "bpf" / "eztunnel", f"bind:{node}")
    return node, inside


def test_a_directory_that_is_itself_bpffs_is_accepted(mount: Mount, tmp_path: Path) -> None:
    _, pins = container_pin_dir(mount, tmp_path)
    assert not dataplane._is_bpffs(pins.parent), "the parent must not be bpffs for this test"
    dataplane._check_bpffs_dir(pins)


def test_a_missing_directory_is_accepted_in_a_bpffs_parent(mount: Mount, tmp_path: Path) -> None:
    root = mount(tmp_path / "bpf", "bpf")
    dataplane._check_bpffs_dir(root / "eztunnel")


def test_an_existing_directory_on_another_filesystem_is_refused(
    mount: Mount, tmp_path: Path
) -> None:
    """Its parent being bpffs is not enough: pins would go to the filesystem mounted over it."""
    root = mount(tmp_path / "bpf", "bpf")
    covered = mount(root / "eztunnel", "tmpfs")
    with pytest.raises(dataplane.DataplaneError, match=f"{covered} is not a bpf filesystem"):
        dataplane._check_bpffs_dir(covered)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(dataplane.DataplaneError, match=f"{plain} is not a bpf filesystem"):
        dataplane._check_bpffs_dir(plain)


def test_a_missing_directory_outside_bpffs_names_its_parent(tmp_path: Path) -> None:
    with pytest.raises(
        dataplane.DataplaneError, match=f"{tmp_path} is not a bpf filesystem; mount one with"
    ):
        dataplane._check_bpffs_dir(tmp_path / "eztunnel")


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
    assert dataplane._is_bpffs(pins)


def test_uninstall_still_refuses_foreign_objects_in_a_mounted_directory(
    mount: Mount, tmp_path: Path
) -> None:
    _, pins = container_pin_dir(mount, tmp_path)
    (pins / "someone-else").mkdir()
    with pytest.raises(dataplane.DataplaneError, match="not ours: \\['someone-else'\\]"):
        dataplane.uninstall(pins)
    assert (pins / "someone-else").is_dir()


@pytest.mark.kernel
def test_install_reuse_and_uninstall_in_a_mounted_directory(
    lab: Lab, mount: Mount, tmp_path: Path
) -> None:
    node, pins = container_pin_dir(mount, tmp_path)
    dp = dataplane.Dataplane.install_or_reuse(pins, lab.cgroup, isolated=True)
    dp.close()
    assert not dp.reused
    pinned = set(os.listdir(pins))
    assert pinned >= {*layout.MAPS, dataplane.LINK_SOCKOPS, dataplane.LINK_MSG}, pinned
    assert set(os.listdir(node)) == pinned, "the pins are the node's"
    again = dataplane.Dataplane.install_or_reuse(pins, lab.cgroup)
    assert again.reused
    assert again.attachments()[dataplane.LINK_SOCKOPS].target_id == os.stat(lab.cgroup).st_ino
    again.close()
    report = dataplane.uninstall(pins)
    assert dataplane.LINK_SOCKOPS in report.detached
    assert set(report.unpinned) >= set(layout.MAPS)
    assert os.listdir(node) == [], "pins left behind"
    assert dataplane._is_bpffs(pins), "the mount point stays"
