"""``k3scluster boot-stick``: write a host's installer image to a USB stick, safely.

Order of work: get the image (``--image`` or a build), check the device (exists, whole
block device, removable or on USB, not mounted, not holding the running system, large
enough), ask, write in 4 MiB blocks with a progress bar, fsync, read back and compare
sha256. Every refusal is a ``K3sClusterError`` with a hint, raised before the first byte
is written. Nothing here imports pulumi.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import K3sClusterError
from .installer import find_iso, installer_dir, iso_build_argv, iso_out_link
from .model import Cluster

BLOCK = 4 * 1024 * 1024
#: mount points whose device holds the running system
SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/efi", "/nix", "/nix/store", "/usr")


@dataclass(frozen=True)
class DeviceInfo:
    path: str  # the device node as resolved (/dev/sdb)
    name: str  # kernel name (sdb)
    type: str  # lsblk TYPE: disk, loop, ...
    size: int  # bytes
    removable: bool
    transport: str  # lsblk TRAN: usb, sata, nvme, "" ...
    model: str
    serial: str

    def describe(self) -> str:
        parts = [self.model or self.type, human_size(self.size)]
        if self.serial:
            parts.append(f"serial {self.serial}")
        return ", ".join(parts)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- image


def _image(
    cluster: Cluster,
    host: str,
    image: Path | str | None,
    nix: str,
    out: Path | None,
    progress: IO[str],
) -> Path:
    if image is not None:
        path = Path(image)
        if not path.is_file():
            raise K3sClusterError(
                f"image {path} does not exist or is not a file",
                hint="pass the .iso the installer build produced (result/iso/*.iso)",
            )
        if path.stat().st_size == 0:
            raise K3sClusterError(f"image {path} is empty", hint="build the installer again")
        return path
    render_dir = Path(out) if out is not None else cluster.root / ".k3scluster" / "render"
    default_nix = render_dir / installer_dir(host) / "default.nix"
    nix_path = shutil.which(nix)
    if nix_path is None:
        raise K3sClusterError(
            f"cannot build the installer image for {host}: {nix!r} is not installed here",
            hint=(
                f"build it where Nix is installed (nix build --file {render_dir / installer_dir(host)})"
                " and pass the ISO with --image PATH"
            ),
        )
    if not default_nix.is_file():
        raise K3sClusterError(
            f"no installer for {host} in {render_dir}",
            hint="run `k3scluster render` first (or pass the render directory with --out)",
        )
    argv = iso_build_argv(nix_path, render_dir, host)
    iso_out_link(render_dir, host).parent.mkdir(parents=True, exist_ok=True)
    print(f"building the installer image of {host}: {' '.join(argv)}", file=progress)
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise K3sClusterError(
            f"building the installer image of {host} failed (exit code {proc.returncode})",
            hint="the build log is above; or build it elsewhere and pass it with --image PATH",
        )
    return find_iso(iso_out_link(render_dir, host))


# --------------------------------------------------------------------------- device facts


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _lsblk(device: str) -> dict[str, object]:
    argv = [
        "lsblk",
        "--json",
        "--bytes",
        "--nodeps",
        "-o",
        "NAME,TYPE,SIZE,RM,TRAN,MODEL,SERIAL",
        device,
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise K3sClusterError("lsblk is not installed", hint="install util-linux") from None
    if proc.returncode != 0:
        raise K3sClusterError(
            f"lsblk cannot read {device}: {proc.stderr.strip()}",
            hint="give the whole device of the stick, e.g. /dev/sdb",
        )
    devices = json.loads(proc.stdout).get("blockdevices") or []
    if len(devices) != 1:
        raise K3sClusterError(f"lsblk reports no device {device}", hint="check the device path")
    return dict(devices[0])


def _flag(value: object) -> bool:
    return value is True or str(value).strip() in ("1", "true")


def device_info(device: str) -> DeviceInfo:
    """Facts about a whole block device; refuses what is not one."""
    if not os.path.exists(device):
        raise K3sClusterError(
            f"{device} does not exist",
            hint="plug the stick in and find it with `lsblk -o NAME,SIZE,MODEL,TRAN,RM`",
        )
    real = os.path.realpath(device)
    if not stat.S_ISBLK(os.stat(real).st_mode):
        raise K3sClusterError(
            f"{device} is not a block device", hint="give the stick's device, e.g. /dev/sdb"
        )
    name = os.path.basename(real)
    sysdir = Path("/sys/class/block") / name
    if (sysdir / "partition").exists():
        parent = Path(os.path.realpath(sysdir)).parent.name
        raise K3sClusterError(
            f"{device} is a partition, not a whole device",
            hint=f"give the whole device: /dev/{parent}",
        )
    row = _lsblk(real)
    dtype = str(row.get("type") or "")
    if dtype not in ("disk", "loop"):
        raise K3sClusterError(
            f"{device} is a {dtype or 'unknown'} device, not a disk",
            hint="give the stick's whole device, e.g. /dev/sdb",
        )
    size = row.get("size")
    return DeviceInfo(
        path=real,
        name=name,
        type=dtype,
        size=int(str(size)) if size not in (None, "") else 0,
        removable=_flag(row.get("rm")),
        transport=str(row.get("tran") or ""),
        model=str(row.get("model") or "").strip(),
        serial=str(row.get("serial") or "").strip(),
    )


def _names_of(name: str) -> set[str]:
    """The kernel names of a device and its partitions."""
    names = {name}
    sysdir = Path("/sys/class/block") / name
    for child in sysdir.glob(f"{name}*"):
        if (child / "partition").exists():
            names.add(child.name)
    return names


def _numbers(names: Iterable[str]) -> set[str]:
    return {n for n in (_read(Path("/sys/class/block") / x / "dev") for x in names) if n}


def _underlying(name: str, seen: set[str] | None = None) -> set[str]:
    """A device and everything below it (dm/md slaves), recursively, with partitions' disks."""
    seen = set() if seen is None else seen
    if name in seen:
        return seen
    seen.add(name)
    sysdir = Path("/sys/class/block") / name
    if (sysdir / "partition").exists():
        seen.add(Path(os.path.realpath(sysdir)).parent.name)
    for slave in (sysdir / "slaves").glob("*"):
        _underlying(slave.name, seen)
    return seen


def _mounts() -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) of every mount."""
    result = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        source = (
            line.split(" - ", 1)[1].split()[1] if len(line.split(" - ", 1)[1].split()) > 1 else ""
        )
        result.append((fields[2], fields[4].replace("\\040", " "), source))
    return result


def _name_of_number(number: str) -> str:
    link = Path("/sys/dev/block") / number
    return Path(os.path.realpath(link)).name if link.exists() else ""


def check_not_in_use(info: DeviceInfo) -> None:
    """Refuse a device that is mounted, swapped on, held, or under the running system."""
    names = _names_of(info.name)
    numbers = _numbers(names)
    devpaths = {f"/dev/{n}" for n in names}
    for number, mountpoint, source in _mounts():
        backing = _name_of_number(number)
        under = _underlying(backing) if backing else set()
        if number in numbers or source in devpaths or under & names:
            if mountpoint in SYSTEM_MOUNTS:
                raise K3sClusterError(
                    f"{info.path} holds the running system ({mountpoint} is on it)",
                    hint="this is not a USB stick: check the device name with lsblk",
                )
            raise K3sClusterError(
                f"{info.path} is mounted ({source or number} at {mountpoint})",
                hint=f"unmount it first: umount {mountpoint}",
            )
    for line in _read(Path("/proc/swaps")).splitlines()[1:]:
        swap = line.split()[0] if line.split() else ""
        swap_name = os.path.basename(os.path.realpath(swap)) if swap.startswith("/dev/") else ""
        if swap_name and _underlying(swap_name) & names:
            raise K3sClusterError(
                f"{info.path} holds swap in use ({swap})", hint=f"swapoff {swap} first"
            )
    for n in sorted(names):
        holders = sorted(p.name for p in (Path("/sys/class/block") / n / "holders").glob("*"))
        if holders:
            raise K3sClusterError(
                f"/dev/{n} is in use by {', '.join(holders)} (LVM, RAID or dm-crypt)",
                hint="release it (vgchange -an, mdadm --stop, cryptsetup close) first",
            )


def check_device(info: DeviceInfo, image_size: int, *, allow_non_removable: bool) -> None:
    """Every check before writing; raises ``K3sClusterError`` on the first refusal."""
    if not allow_non_removable and not (info.removable or info.transport == "usb"):
        raise K3sClusterError(
            f"{info.path} ({info.describe()}) is neither removable nor on USB",
            hint="a boot stick is a USB stick; if you really mean this device, add "
            "--allow-non-removable",
        )
    check_not_in_use(info)
    if info.size < image_size:
        raise K3sClusterError(
            f"{info.path} is too small: {human_size(info.size)} for an image of "
            f"{human_size(image_size)}",
            hint="use a larger stick",
        )


# --------------------------------------------------------------------------- writing


def _bar(done: int, total: int, started: float, progress: IO[str], final: bool = False) -> None:
    pct = 100.0 * done / total if total else 100.0
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = done / elapsed / (1024 * 1024)
    width = 30
    filled = int(width * done / total) if total else width
    end = "\n" if final else ""
    progress.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}%  {rate:7.1f} MiB/s{end}"
    )
    progress.flush()


def write_image(image: Path, device: str, progress: IO[str]) -> str:
    """Write ``image`` to ``device`` in 4 MiB blocks, fsync, read back, compare; its sha256."""
    total = image.stat().st_size
    digest = hashlib.sha256()
    try:
        fd = os.open(device, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        raise K3sClusterError(
            f"cannot open {device} for writing: {e.strerror}",
            hint="it may be in use (mounted or held); unplug and plug the stick and retry",
        ) from None
    started = time.monotonic()
    done = 0
    try:
        with image.open("rb") as src:
            while True:
                block = src.read(BLOCK)
                if not block:
                    break
                digest.update(block)
                view = memoryview(block)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                done += len(block)
                _bar(done, total, started, progress)
        os.fsync(fd)
        _bar(done, total, started, progress, final=True)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        raise K3sClusterError(
            f"writing to {device} failed after {human_size(done)}: {e.strerror}",
            hint="the stick may be faulty or was unplugged; try again or use another stick",
        ) from None
    finally:
        os.close(fd)
    print(f"verifying {human_size(total)} on {device}", file=progress)
    check = hashlib.sha256()
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        left = total
        while left > 0:
            chunk = os.read(fd, min(BLOCK, left))
            if not chunk:
                break
            check.update(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    if left != 0 or check.hexdigest() != digest.hexdigest():
        raise K3sClusterError(
            f"verification failed: what {device} holds differs from {image}",
            hint="the stick may be faulty; write it again or use another stick",
        )
    return digest.hexdigest()


def _confirm(image: Path, info: DeviceInfo, progress: IO[str]) -> bool:
    question = (
        f"Write {image} to {info.path} ({info.model or info.type}, {human_size(info.size)})? "
        "This erases it. [y/N] "
    )
    progress.write(question)
    progress.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def boot_stick(
    cluster: Cluster,
    host: str,
    device: str,
    *,
    yes: bool = False,
    image: Path | str | None = None,
    allow_non_removable: bool = False,
    nix: str = "nix",
    out: Path | None = None,
    progress: IO[str] = sys.stderr,
) -> None:
    """Write the installer image of ``host`` to ``device`` and verify it."""
    try:
        cluster.host(host)
    except KeyError:
        raise K3sClusterError(
            f"no host {host!r} in plans/hosts.csv",
            hint="hosts: " + ", ".join(h.name for h in cluster.hosts),
        ) from None
    # Check the device before a possibly long build, and again right before writing.
    info = device_info(device)
    check_device(info, 0, allow_non_removable=allow_non_removable)
    img = _image(cluster, host, image, nix, out, progress)
    size = img.stat().st_size
    info = device_info(device)
    check_device(info, size, allow_non_removable=allow_non_removable)
    print(
        f"device {info.path}: {info.model or info.type}, {human_size(info.size)}, "
        f"serial {info.serial or '-'}, transport {info.transport or '-'}",
        file=progress,
    )
    if not yes and not _confirm(img, info, progress):
        raise K3sClusterError(
            "nothing written: not confirmed", hint="answer y to write, or pass --yes"
        )
    print(f"writing {img} ({human_size(size)}) to {info.path}", file=progress)
    digest = write_image(img, info.path, progress)
    print(
        f"done: {info.path} holds {img.name} (sha256 {digest}); the stick is ready", file=progress
    )
