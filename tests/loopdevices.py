"""Loop devices for the disk tests: real block devices on sparse files, never a real disk.

``loop_factory`` (a fixture, import it into a test module) makes a loop device on a new
sparse file and detaches it afterwards, unmounting whatever the test left mounted on it,
even when the test fails. Tests skip with a reason when not root or losetup fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def unmount_under(path: Path) -> None:
    """Unmount everything mounted at or below ``path`` (deepest first)."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == str(path) or mp.startswith(str(path) + "/"):
                mounts.append(mp)
    for mp in sorted(mounts, key=len, reverse=True):
        _run("umount", "-l", mp)


def unmount_device(dev: str) -> None:
    """Unmount every file system on ``dev`` or its partitions."""
    name = os.path.basename(dev)
    numbers = set()
    sysdir = Path("/sys/class/block") / name
    for d in [sysdir, *sysdir.glob(f"{name}p*")]:
        try:
            numbers.add((d / "dev").read_text().strip())
        except OSError:
            pass
    with open("/proc/self/mountinfo") as f:
        mps = [line.split()[4] for line in f if line.split()[2] in numbers]
    for mp in sorted(mps, key=len, reverse=True):
        _run("umount", "-l", mp)


def sha256_of(dev: str) -> str:
    """sha256 of the device's bytes as they are on the backing file.

    Read with O_DIRECT (dd iflag=direct): the disk's page cache may still hold what was read
    through it before a write went through one of its partitions (another block device,
    another cache), so a buffered read could hash an unchanged disk differently later.
    """
    h = hashlib.sha256()
    with subprocess.Popen(
        ["dd", f"if={dev}", "bs=4M", "iflag=direct", "status=none"], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(4 << 20):
            h.update(chunk)
    assert proc.returncode == 0, f"dd could not read {dev}"
    return h.hexdigest()


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices")
    for tool in ("losetup", "parted", "mkfs.ext4", "wipefs", "blkid", "lsblk"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (util-linux, parted, e2fsprogs)")


@pytest.fixture
def loop_factory(tmp_path: Path) -> Iterator[Callable[..., str]]:
    need_root()
    made: list[str] = []

    def make(size_mib: int = 300, name: str | None = None, fill: bytes | None = None) -> str:
        backing = tmp_path / (name or f"disk{len(made)}.img")
        with open(backing, "wb") as f:
            f.truncate(size_mib << 20)
            if fill:
                f.seek(0)
                f.write(fill)
        proc = _run("losetup", "-fP", "--show", str(backing))
        if proc.returncode != 0:
            pytest.skip(f"losetup failed: {proc.stderr.strip()}")
        dev = proc.stdout.strip()
        made.append(dev)
        return dev

    yield make
    for dev in reversed(made):
        unmount_device(dev)
        _run("losetup", "-d", dev)
