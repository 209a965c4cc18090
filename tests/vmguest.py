"""The VM tests' guest: a small Linux built at test time from Debian packages (a test stand-in).

No NixOS image can be built here, so the VM tests boot this instead: the Debian cloud
kernel (``linux-image-cloud-amd64``, fetched with ``apt-get download``), a busybox
initramfs with bash, util-linux, parted, dosfstools, e2fsprogs and udev (so
``/dev/disk/by-id/virtio-<serial>`` exists), and ``tests/vmguest_init.sh`` as PID 1.

API (stable; vmlab's lab tests use it too)::

    guest = build_guest()                     # Guest(kernel, initrd), cached
    cfg = GuestConfig(host="olaf", ip="10.0.0.11/24", gateway="10.0.0.1",
                      mac="52:54:00:12:34:56", serial="S4EVNX0R123456", boot="efi",
                      job="install", setup_script=rendered_system_setup_sh)
    iso = guest_iso(tmp / "olaf.iso", config=cfg)   # BIOS (SeaBIOS) + EFI (OVMF) bootable
    initrd = guest_initrd(tmp / "initrd", config=cfg)  # for a direct -kernel boot
    with Vm(tmp / "vm", firmware="efi", iso=iso, disks=[Disk(img, "S4EVNX0R123456")],
            nic=Nic("tap0", cfg.mac), netns="k3st-1") as vm:
        vm.wait_for(r"K3SGUEST serving")          # bounded; the console's tail on failure
        vm.powerdown()                            # QMP system_powerdown (ACPI)
        vm.wait_exit(60)
    facts = parse_facts(vm.console())             # [("disk", "/dev/vda serial=..."), ...]

The guest's jobs (``GuestConfig.job``, or ``k3sguest.job=`` on the kernel command line):
``install`` runs the rendered ``system-setup.sh`` with ``SKIP_INSTALL=1`` against the disk
with the planned serial, then makes the disk an installed system (kernel, initrd and GRUB
carried in the ISO's initrd, ``/etc/NIXOS`` and a system profile link as an installed
NixOS has them, an ssh host key and ``/etc/nixos/hardware-configuration.nix`` as
nixos-generate-config writes it in a QEMU guest), prints the layout and powers off;
``serve`` answers ping at the planned address, and ssh as root with
``GuestConfig.authorized_keys`` (the host key and the hardware file read from the disk),
until the power button or the console command ``poweroff``; ``facts`` reports and powers
off. A disk installed this way boots (from the firmware, no medium) into
``serve``. Console lines meant for tests start with ``K3SGUEST ``.

The guest is cached under ``$K3SCLUSTER_TEST_CACHE`` (default
``/var/cache/k3scluster-tests``) in ``guest-<key>/``, the key hashing the Debian package
versions it is made of and this module's and the init script's source, so a warm run
reuses it. QEMU always runs with ``-accel tcg``: ``/dev/kvm`` on these machines is a nested
device on which a guest hangs. Needs root (QEMU taps, loop devices) and the Debian
packages in scripts/setup's DEBS (qemu-system-x86, qemu-utils, ovmf, busybox-static, zstd,
grub-pc-bin, grub-efi-amd64-bin, grub-common, xorriso, mtools).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

HERE = Path(__file__).resolve().parent
INIT = HERE / "vmguest_init.sh"

#: Debian packages fetched with apt-get download (not installed on the machine)
KERNEL_META = "linux-image-cloud-amd64"
DOWNLOADED = ("udev",)
#: installed Debian packages whose files are copied into the guest
INSTALLED = (
    "busybox-static",
    "bash",
    "util-linux",
    "mount",
    "parted",
    "dosfstools",
    "e2fsprogs",
    "libc6",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub-common",
    "zstd",
    "openssh-server",
    "openssh-client",
)
#: commands copied from the machine with their shared libraries (busybox provides the rest)
COMMANDS = (
    "bash",
    "mount",
    "umount",
    "mountpoint",
    "findmnt",
    "lsblk",
    "blkid",
    "wipefs",
    "blockdev",
    "partx",
    "parted",
    "partprobe",
    "mkfs.vfat",
    "mkfs.fat",
    "fatlabel",
    "fsck.vfat",
    "mkfs.ext4",
    "mke2fs",
    "e2label",
    "tune2fs",
    "dumpe2fs",
    "e2fsck",
    # the installed guest's sshd (its host key made at install, kept on the disk)
    "sshd",
    "ssh-keygen",
)
#: kernel modules the init loads (with their dependencies)
MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859-1",
    "button",
    "evdev",
)
GRUB_MODULES = (
    "part_gpt",
    "part_msdos",
    "fat",
    "ext2",
    "search",
    "search_label",
    "configfile",
    "normal",
    "linux",
    "serial",
    "terminal",
    "echo",
    "test",
)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
FACT_PREFIX = "K3SGUEST "


class GuestError(RuntimeError):
    """Building or running the guest failed (the message says what, with the console's tail)."""


def cache_dir() -> Path:
    return Path(os.environ.get("K3SCLUSTER_TEST_CACHE", "/var/cache/k3scluster-tests"))


def _run(argv: Sequence[str | os.PathLike[str]], **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise GuestError(
            f"{shlex.join(str(a) for a in argv)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc


# --- what the guest is made of -------------------------------------------------------------


def _candidate(package: str) -> str:
    """The version apt-get download fetches (from the local package lists, no network)."""
    out = _run(["apt-cache", "policy", package]).stdout
    m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.MULTILINE)
    if not m or m.group(1) == "(none)":
        raise GuestError(f"apt knows no version of {package}: run 'apt-get update' first")
    return m.group(1)


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META]).stdout
    m = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if not m:
        raise GuestError(f"cannot tell which kernel {KERNEL_META} depends on: {out.strip()}")
    return m.group(1)


def _installed_versions() -> dict[str, str]:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Status}\n", *INSTALLED],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    got = {}
    for line in out.splitlines():
        name, version, status = line.split()
        if status == "installed":
            got[name] = version
    missing = [p for p in INSTALLED if p not in got]
    if missing:
        raise GuestError(
            "the test guest needs these Debian packages: " + " ".join(missing),
            # (scripts/setup installs them; by hand: apt-get install -y ...)
        )
    return got


def _recipe() -> dict[str, object]:
    kernel = _kernel_package()
    fetch = {kernel: _candidate(kernel)} | {p: _candidate(p) for p in DOWNLOADED}
    return {
        "fetch": fetch,
        "installed": _installed_versions(),
        "source": hashlib.sha256(Path(__file__).read_bytes() + INIT.read_bytes()).hexdigest(),
    }


@dataclass(frozen=True)
class Guest:
    """The built guest: a kernel and its base initramfs (a zstd-compressed newc cpio)."""

    kernel: Path
    initrd: Path
    kernel_version: str


def build_guest() -> Guest:
    """The guest, from the cache when its recipe is unchanged, else built (about a minute)."""
    recipe = _recipe()
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir()
    done = root / f"guest-{key}"
    if not (done / "guest.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".guest-{key}-", dir=root))
        try:
            _build(work, recipe)
            (work / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True))
            try:
                work.rename(done)
            except OSError:  # another run finished the same guest first
                if not (done / "guest.json").exists():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    meta = json.loads((done / "guest.json").read_text())
    return Guest(done / "vmlinuz", done / "initrd.img", meta["kernel_version"])


def _copy_file(src: Path, dst_root: Path, rel: str) -> None:
    """Copy ``src`` to ``dst_root/rel`` (the guest's path), keeping a symlink chain as links."""
    dst = dst_root / rel.lstrip("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dst):
        return
    shutil.copy2(src, dst, follow_symlinks=True)


def _add_binary(path: Path, root: Path, dest: str | None = None) -> None:
    """Copy an ELF binary (to ``dest``, default its own path) and the shared libraries
    ldd names for it into the guest."""
    _copy_file(path, root, dest or str(path))
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return  # static (ldd says "not a dynamic executable")
    for line in proc.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if not m:
            if "not found" in line:
                raise GuestError(f"{path}: {line.strip()}")
            continue
        lib = Path(m.group(1))
        _copy_file(lib, root, str(lib))


def _ignore_hwdb(directory: str, names: list[str]) -> set[str]:
    return {"hwdb.d"} & set(names)


def _build(work: Path, recipe: dict[str, object]) -> None:
    debs = work / "debs"
    debs.mkdir()
    fetch = recipe["fetch"]
    assert isinstance(fetch, dict)
    _run(
        ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root"]
        + [f"{p}={v}" for p, v in fetch.items()],
        cwd=debs,
    )
    pkg = work / "pkg"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", deb, pkg])
    kver = next((pkg / "lib" / "modules").iterdir()).name

    root = work / "root"
    for d in (
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "mnt",
        "root",
        "var",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")

    # udev from its package: rules, the daemon (udevadm under another name)
    _add_binary(pkg / "bin" / "udevadm", root, "/usr/bin/udevadm")
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/lib/systemd/systemd-udevd").symlink_to("/usr/bin/udevadm")
    # (no hwdb: nothing here looks up vendors or models)
    shutil.copytree(pkg / "lib/udev", root / "usr/lib/udev", symlinks=True, ignore=_ignore_hwdb)
    shutil.copytree(pkg / "lib/systemd/network", root / "usr/lib/systemd/network")
    (root / "etc/udev").mkdir(parents=True)
    shutil.copy2(pkg / "etc/udev/udev.conf", root / "etc/udev/udev.conf")

    for cmd in COMMANDS:
        found = shutil.which(cmd, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if found is None:
            raise GuestError(f"{cmd} is not installed (see INSTALLED in tests/vmguest.py)")
        real = Path(found)
        _add_binary(real.resolve(), root)
        guest_path = root / str(real).lstrip("/")
        if real.resolve() != real and not os.path.lexists(guest_path):
            guest_path.parent.mkdir(parents=True, exist_ok=True)
            guest_path.symlink_to(real.resolve())

    busybox = Path("/usr/bin/busybox")
    shutil.copy2(busybox, root / "usr/bin/busybox")
    applets = _run([busybox, "--list"]).stdout.split()
    for name in applets:
        for d in ("usr/bin", "usr/sbin"):
            if os.path.lexists(root / d / name):
                break
        else:
            (root / "usr/bin" / name).symlink_to("busybox")

    # kernel modules the init loads, with their dependencies (busybox depmod makes modules.dep)
    _run([busybox, "depmod", "-b", pkg, kver])
    moddir = pkg / "lib/modules" / kver
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    want: set[str] = set()
    todo = []
    for name in MODULES:
        key = name.replace("-", "_")
        if key not in by_name:
            raise GuestError(f"kernel {kver} has no module {name}")
        todo.append(by_name[key])
    while todo:
        m = todo.pop()
        if m not in want:
            want.add(m)
            todo.extend(deps[m])
    gmod = root / "usr/lib/modules" / kver
    for m in sorted(want):
        (gmod / m).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / m, gmod / m)
    for f in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        shutil.copy2(moddir / f, gmod / f)
    _run([busybox, "depmod", "-b", root, kver])

    # GRUB for the installed disk: a core image for the MBR gap (BIOS) and a removable-path
    # EFI binary; both find their partition by label and read k3sguest.cfg from it
    share = root / "usr/share/k3sguest"
    share.mkdir(parents=True)
    bios_cfg = work / "bios.cfg"
    bios_cfg.write_text(
        "search --no-floppy --label nixos --set=root\n"
        "set prefix=($root)/boot/grub\n"
        "configfile ($root)/boot/k3sguest.cfg\n"
    )
    _run(
        [
            "grub-mkimage",
            "-O",
            "i386-pc",
            "-o",
            share / "core.img",
            "-c",
            bios_cfg,
            "-p",
            "/boot/grub",
            "biosdisk",
            *GRUB_MODULES,
        ]
    )
    shutil.copy2("/usr/lib/grub/i386-pc/boot.img", share / "boot.img")
    efi_cfg = work / "efi.cfg"
    efi_cfg.write_text(
        "search --no-floppy --label boot --set=root\n"
        "set prefix=($root)/EFI/BOOT\n"
        "configfile ($root)/k3sguest.cfg\n"
    )
    _run(
        [
            "grub-mkimage",
            "-O",
            "x86_64-efi",
            "-o",
            share / "BOOTX64.EFI",
            "-c",
            efi_cfg,
            "-p",
            "/EFI/BOOT",
            *GRUB_MODULES,
        ]
    )

    shutil.copy2(INIT, root / "init")
    (root / "init").chmod(0o755)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
    )
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n")
    (root / "etc/shadow").chmod(0o600)
    # as the rendered NixOS host has it: root by key only, nothing else
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text(
        "Port 22\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "AuthorizedKeysFile /root/.ssh/authorized_keys\n"
        "PidFile /run/sshd.pid\n"
    )
    (root / "etc/mtab").symlink_to("/proc/self/mounts")

    # zstd: the kernel unpacks it about twice as fast as gzip under TCG
    raw = work / "initrd.cpio"
    raw.write_bytes(_cpio_tree(root, extra_devices=True))
    _run(["zstd", "-q", "-10", "--rm", raw, "-o", work / "initrd.img"])
    shutil.copy2(pkg / "boot" / f"vmlinuz-{kver}", work / "vmlinuz")
    shutil.rmtree(root)
    shutil.rmtree(pkg)
    shutil.rmtree(debs)
    (work / "guest.json").write_text(json.dumps({"kernel_version": kver}))


# --- cpio (newc), the initramfs format ------------------------------------------------------


class _Cpio:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % v for v in fields))
        self.buf.write(nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.buf.getvalue()


def _cpio_tree(root: Path, *, extra_devices: bool = False) -> bytes:
    c = _Cpio()
    if extra_devices:
        c.add("dev", stat.S_IFDIR | 0o755)
        c.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        c.add("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            p = base / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if extra_devices and rel == "dev":
                continue
            if stat.S_ISLNK(st.st_mode):
                c.add(rel, stat.S_IFLNK | 0o777, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                c.add(rel, stat.S_IFDIR | 0o755)
            else:
                c.add(rel, stat.S_IFREG | (st.st_mode & 0o777), p.read_bytes())
    return c.finish()


def _cpio_files(files: dict[str, tuple[bytes, int]]) -> bytes:
    c = _Cpio()
    dirs: set[str] = set()
    for name in sorted(files):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                c.add(d, stat.S_IFDIR | 0o755)
        data, mode = files[name]
        c.add(name, stat.S_IFREG | mode, data)
    return c.finish()


# --- per-host configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class GuestConfig:
    """A host's values for the guest (an extra cpio appended to the initrd).

    ``ip`` is ``address/prefix``; ``mac`` the MAC to expect (the NIC with it gets ``ip``);
    ``serial`` the planned disk serial; ``setup_script`` the rendered system-setup.sh
    (needed by ``job="install"``), run with ``SKIP_INSTALL=1`` and ``setup_args``;
    ``cmdline`` extra kernel parameters of the ISO's boot entry (``k3scluster.reinstall=1``).
    """

    host: str = "guest"
    ip: str = ""
    gateway: str = ""
    mac: str = ""
    serial: str = ""
    boot: str = "bios"
    job: str = "facts"
    setup_script: str = ""
    setup_args: tuple[str, ...] = ()
    cmdline: tuple[str, ...] = ()
    extra_files: dict[str, str] = field(default_factory=dict)
    authorized_keys: tuple[str, ...] = ()  # root's, for the installed guest's sshd
    poweroff_on_failure: bool = False  # installer.json powerOffOnFailure (VM stacks)

    def config_text(self) -> str:
        values = {
            "HOST": self.host,
            "IP": self.ip,
            "GATEWAY": self.gateway,
            "MAC": self.mac,
            "SERIAL": self.serial,
            "BOOT": self.boot,
            "JOB": self.job,
            "SETUP_ARGS": " ".join(shlex.quote(a) for a in self.setup_args),
            "POWEROFF_ON_FAILURE": "1" if self.poweroff_on_failure else "0",
        }
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def config_cpio(config: GuestConfig) -> bytes:
    files = {"etc/k3sguest/config": (config.config_text().encode(), 0o644)}
    if config.setup_script:
        files["etc/k3sguest/system-setup.sh"] = (config.setup_script.encode(), 0o755)
    for path, text in config.extra_files.items():
        files[path.lstrip("/")] = (text.encode(), 0o644)
    if config.authorized_keys:
        files["root/.ssh/authorized_keys"] = ("".join(
            f"{k}\n" for k in config.authorized_keys).encode(), 0o600)
    return gzip.compress(_cpio_files(files), mtime=0)


def guest_initrd(
    out: Path, *, config: GuestConfig, guest: Guest | None = None, carry_system: bool = False
) -> Path:
    """The base initrd with the host's config appended (for a direct ``-kernel`` boot).

    ``carry_system`` also appends the kernel and this same initrd (without them) for the
    ``install`` job to put on the disk; ``guest_iso`` does that.
    """
    guest = guest or build_guest()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    system = guest.initrd.read_bytes() + config_cpio(config)
    with open(out, "wb") as f:
        f.write(system)
        if carry_system:
            # uncompressed: the kernel does not shrink, and unpacking stays cheap under TCG.
            # The kernel takes an uncompressed archive only at a 4-byte aligned offset of
            # the initrd (zeros before it are skipped)
            f.write(b"\0" * (-len(system) % 4))
            f.write(
                _cpio_files(
                    {
                        "usr/share/k3sguest/disk/vmlinuz": (guest.kernel.read_bytes(), 0o644),
                        "usr/share/k3sguest/disk/initrd.img": (system, 0o644),
                    }
                )
            )
    return out


def kernel_cmdline(config: GuestConfig) -> str:
    return " ".join(("console=ttyS0,115200", "panic=-1", "loglevel=4", *config.cmdline))


def guest_iso(out: Path, *, config: GuestConfig, guest: Guest | None = None) -> Path:
    """A bootable ISO (BIOS and EFI, by grub-mkrescue) with the kernel, initrd and config."""
    guest = guest or build_guest()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="k3sguest-iso-") as tmp:
        tree = Path(tmp) / "iso"
        (tree / "boot/grub").mkdir(parents=True)
        shutil.copy2(guest.kernel, tree / "boot/vmlinuz")
        guest_initrd(tree / "boot/initrd.img", config=config, guest=guest, carry_system=True)
        (tree / "boot/grub/grub.cfg").write_text(
            "set timeout=0\n"
            "serial --unit=0 --speed=115200\n"
            "terminal_input serial console\n"
            "terminal_output serial console\n"
            f'menuentry "k3sguest {config.host} ({config.job})" {{\n'
            f"  linux /boot/vmlinuz {kernel_cmdline(config)}\n"
            "  initrd /boot/initrd.img\n"
            "}\n"
        )
        _run(["grub-mkrescue", "-o", out, tree, "--", "-volid", "K3SGUEST"])
    return out


# --- the console --------------------------------------------------------------------------


def parse_facts(text: str) -> list[tuple[str, str]]:
    """The guest's report lines as (kind, rest): ``K3SGUEST disk /dev/vda serial=X`` ->
    ``("disk", "/dev/vda serial=X")``. Lines the kernel interleaved are skipped."""
    out = []
    for line in text.splitlines():
        i = line.find(FACT_PREFIX)
        if i < 0:
            continue
        kind, _, rest = line[i + len(FACT_PREFIX) :].strip().partition(" ")
        out.append((kind, rest.strip()))
    return out


def fact_values(text: str, kind: str) -> list[str]:
    return [rest for k, rest in parse_facts(text) if k == kind]


# --- QEMU ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str
    format: str = "qcow2"
    boot: bool = False  # the firmware boots this disk first (else the first disk, boot="disk")


@dataclass(frozen=True)
class Nic:
    tap: str
    mac: str


def make_disk(path: Path, size_mib: int, fmt: str = "qcow2") -> Path:
    _run(["qemu-img", "create", "-q", "-f", fmt, path, f"{size_mib}M"])
    return Path(path)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (no stray QEMU)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class Vm:
    """One QEMU guest under TCG: console logged to ``<workdir>/console.log``, QMP socket.

    ``boot`` is ``"cd"`` (the ISO first) or ``"disk"`` (the first disk first); with
    ``kernel``/``initrd`` QEMU boots the kernel directly. ``netns`` runs QEMU inside that
    network namespace (where the tap must exist). ``machine`` is pc as in the lab
    (k3scluster/lab/qemu.py); q35 works too: the guest reads nothing from its CD drive
    after the boot (its kernel has no AHCI driver).
    Leaving the ``with`` block kills QEMU.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        firmware: str = "bios",
        disks: Iterable[Disk] = (),
        nic: Nic | None = None,
        iso: Path | None = None,
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str = "",
        boot: str = "cd",
        memory_mib: int = 512,
        netns: str | None = None,
        machine: str = "pc",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "console.log"
        self.qmp_path = self.workdir / "qmp.sock"
        self.console_path = self.workdir / "console.sock"
        self.firmware = firmware
        self.proc: subprocess.Popen[bytes] | None = None
        argv = [
            "qemu-system-x86_64",
            "-machine", machine,
            "-accel", "tcg",
            "-m", str(memory_mib),
            "-smp", "1",
            "-display", "none",
            "-vga", "none",
            "-no-reboot",
            "-chardev",
            f"socket,id=con0,path={self.console_path},server=on,wait=off,logfile={self.log}",
            "-serial", "chardev:con0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            # entropy: without it the kernel's CRNG is not ready for seconds under TCG
            # (no RDRAND), and every libuuid call (parted, mkfs.ext4) waits about 1 s
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        if firmware == "efi":
            vars_copy = self.workdir / "OVMF_VARS.fd"
            if not vars_copy.exists():
                shutil.copy2(OVMF_VARS, vars_copy)
            argv += [
                "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={vars_copy}",
            ]  # fmt: skip
        elif firmware != "bios":
            raise ValueError(f"firmware must be bios or efi, not {firmware!r}")
        disks = list(disks)
        boot_disk = next((d for d in disks if d.boot), disks[0] if disks else None)
        for i, d in enumerate(disks):
            idx = ",bootindex=1" if boot == "disk" and d is boot_disk else ""
            argv += [
                "-drive", f"if=none,id=d{i},file={d.path},format={d.format}",
                "-device", f"virtio-blk-pci,drive=d{i},serial={d.serial}{idx}",
            ]  # fmt: skip
        if iso is not None:
            idx = ",bootindex=1" if boot == "cd" else ",bootindex=2"
            argv += [
                "-drive", f"if=none,id=cd0,file={iso},format=raw,media=cdrom,readonly=on",
                "-device", f"ide-cd,drive=cd0,bus=ide.0{idx}",
            ]  # fmt: skip
        if kernel is not None:
            argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
        if nic is not None:
            argv += [
                "-netdev", f"tap,id=n0,ifname={nic.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={nic.mac}",
            ]  # fmt: skip
        else:
            argv += ["-nic", "none"]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.argv = argv

    def start(self) -> Self:
        self.log.write_bytes(b"")
        for s in (self.qmp_path, self.console_path):
            with contextlib.suppress(FileNotFoundError):
                s.unlink()
        self.proc = subprocess.Popen(
            self.argv,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (the tests start no threads)
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "qemu.out", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        return self

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def console(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        qemu = self.workdir / "qemu.out"
        out = qemu.read_text(errors="replace") if qemu.exists() else ""
        return (
            "--- console (last lines) ---\n"
            + "\n".join(self.console().splitlines()[-lines:])
            + ("\n--- qemu ---\n" + out[-2000:] if out.strip() else "")
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the console matches ``pattern`` (re, multiline); GuestError on timeout."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console())
            if m:
                return m
            if not self.running():
                raise GuestError(
                    f"QEMU exited ({self.proc and self.proc.returncode}) before the console "
                    f"showed {pattern!r}\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise GuestError(f"no {pattern!r} on the console in {timeout}s\n{self.tail()}")
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"the guest did not power off in {timeout}s\n{self.tail()}") from None

    def qmp(self, command: str, **arguments: object) -> dict[str, object]:
        """One QMP command; its answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": command}):
                if cmd["execute"] == command and arguments:
                    cmd = {"execute": command, "arguments": arguments}
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    answer = json.loads(f.readline())
                    if "return" in answer or "error" in answer:
                        break
            return answer

    def powerdown(self) -> None:
        """ACPI power button (QMP system_powerdown)."""
        self.qmp("system_powerdown")

    def send(self, line: str) -> None:
        """Type a line on the guest's serial console."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.console_path))
            s.sendall(line.encode() + b"\r\n")
            time.sleep(0.5)

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def run(self, timeout: float) -> str:
        """Start, wait for the guest to power off by itself; its console."""
        with self:
            self.wait_exit(timeout)
        return self.console()


# --- network namespaces -------------------------------------------------------------------


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    """A network namespace made for the test (deleted afterwards)."""
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def ns_run(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", ns, *argv]
    if check:
        return _run(cmd)
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def lab_bridge(ns: str, gateway_cidr: str, taps: Sequence[str], bridge: str = "br0") -> None:
    """In ``ns``: a bridge carrying the gateway address, with the given taps in it."""
    ns_run(ns, "ip", "link", "add", bridge, "type", "bridge")
    ns_run(ns, "ip", "addr", "add", gateway_cidr, "dev", bridge)
    ns_run(ns, "ip", "link", "set", bridge, "up")
    for tap in taps:
        ns_run(ns, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
        ns_run(ns, "ip", "link", "set", tap, "master", bridge)
        ns_run(ns, "ip", "link", "set", tap, "up")


def ping_until(ns: str, ip: str, timeout: float) -> bool:
    """Ping ``ip`` from inside ``ns`` once a second until it answers or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns_run(ns, "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0:
            return True
        time.sleep(0.5)
    return False
