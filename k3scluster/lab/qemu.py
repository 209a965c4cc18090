"""QEMU pieces of the lab: firmware lookup, the KVM probe, qemu-img and qemu-system argv.

Why QEMU directly and not libvirt: the lab needs one bridge, one tap and one process per
host, all of which ``ip`` and ``qemu-system-x86_64`` do without a daemon; libvirt would add
libvirtd (and its own networks, which NAT and DHCP by default) to every user's machine and
to CI, where there is no systemd to run it. The VM runs daemonized (``-daemonize``) with a
pidfile and a QMP socket in its directory, so it survives ``pulumi up``. The machine is
``pc`` (i440fx): its PIIX IDE CD drive is the one every installer kernel drives, and OVMF's
non-SMM build and SeaBIOS both run on it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from k3scluster.errors import K3sClusterError
from k3scluster.lab.spec import VmSpec

FIRMWARE_DIRS = (Path("/usr/share/qemu/firmware"), Path("/etc/qemu/firmware"))
# QEMU resets an x86 CPU to the last 16 bytes of the BIOS image: write 0x31 to port 0xf4
# (isa-debug-exit) and halt. QEMU then exits with status (0x31 << 1) | 1 = 99.
PROBE_CODE = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
PROBE_EXIT = 99
PROBE_TIMEOUT = 10.0
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class Ovmf:
    code: Path  # read-only firmware
    vars_template: Path  # copied once per VM (its own EFI variables)


def find_ovmf(dirs: tuple[Path, ...] = FIRMWARE_DIRS) -> Ovmf:
    """The UEFI firmware for x86_64 without Secure Boot, from QEMU's firmware descriptors
    (Debian's ``ovmf`` installs ``/usr/share/qemu/firmware/60-edk2-x86_64.json``)."""
    candidates: list[tuple[str, Ovmf]] = []
    for d in dirs:
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                desc = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if "uefi" not in desc.get("interface-types", []):
                continue
            feats = set(desc.get("features", []))
            if feats & {"secure-boot", "enrolled-keys", "requires-smm"}:
                continue
            if not any(t.get("architecture") == "x86_64" for t in desc.get("targets", [])):
                continue
            m = desc.get("mapping", {})
            if m.get("device") != "flash" or "nvram-template" not in m:
                continue
            code = Path(m["executable"]["filename"])
            tmpl = Path(m["nvram-template"]["filename"])
            if code.is_file() and tmpl.is_file():
                candidates.append((f.name, Ovmf(code, tmpl)))
    if not candidates:
        raise K3sClusterError(
            "no UEFI firmware (OVMF) for x86_64 found in " + ", ".join(map(str, dirs)),
            hint="install it (Debian: apt-get install ovmf), or make the host boot=bios",
        )
    return min(candidates, key=lambda c: c[0])[1]


def write_probe_bios(path: Path) -> Path:
    """The probe guest: a 64 KiB BIOS image whose reset vector exits QEMU with PROBE_EXIT."""
    image = bytearray(65536)
    image[0xFFF0 : 0xFFF0 + len(PROBE_CODE)] = PROBE_CODE
    path.write_bytes(bytes(image))
    return path


def require_tools(qemu: str, qemu_img: str) -> None:
    """Raise, before anything is made, when a tool the lab runs is missing."""
    import shutil

    missing = [t for t in (qemu, qemu_img, "ip") if shutil.which(t) is None]
    if not (shutil.which("ping") or shutil.which("busybox")):
        missing.append("ping")
    if missing:
        raise K3sClusterError(
            "a VM stack (k3scluster:vms) needs " + ", ".join(missing) + " on this machine",
            hint="Debian: apt-get install qemu-system-x86 qemu-utils ovmf iproute2 iputils-ping",
        )


def probe_argv(qemu: str, bios: Path, accel: str = "kvm") -> list[str]:
    cpu = ["-cpu", "host"] if accel == "kvm" else []
    return [
        qemu, "-accel", accel, *cpu, "-machine", "pc", "-m", "16",
        "-nodefaults", "-display", "none", "-bios", str(bios),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]


def kvm_works(qemu: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Run a 64 KiB guest under KVM with ``-cpu host`` (what a KVM VM runs with) and see it
    exit by itself within ``timeout``; (works, why not)."""
    if not KVM_DEVICE.exists():
        return False, f"{KVM_DEVICE} does not exist"
    with tempfile.TemporaryDirectory(prefix="k3scluster-kvm-") as tmp:
        bios = write_probe_bios(Path(tmp) / "probe.bin")
        try:
            proc = subprocess.run(
                probe_argv(qemu, bios), capture_output=True, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL, check=False,
            )
        except subprocess.TimeoutExpired:
            return False, f"a KVM guest did not finish in {timeout:g} s"
        except OSError as exn:
            return False, f"cannot run {qemu}: {exn.strerror or exn}"
    if proc.returncode == PROBE_EXIT:
        return True, ""
    lines = proc.stderr.strip().splitlines()
    return False, lines[-1] if lines else f"exit status {proc.returncode}"


def choose_accel(setting: str, qemu: str) -> tuple[str, str | None]:
    """(``kvm`` | ``tcg``, a warning or None) for ``k3scluster:vmAccel``."""
    if setting == "tcg":
        return "tcg", None
    ok, why = kvm_works(qemu)
    if ok:
        return "kvm", None
    if setting == "kvm":
        raise K3sClusterError(
            f"k3scluster:vmAccel is kvm, but KVM does not work here: {why}",
            hint="pulumi config set k3scluster:vmAccel auto (falls back to the much slower TCG)",
        )
    return "tcg", f"KVM does not work here ({why}); the VMs run under TCG, much slower"


def _opt(value: object) -> str:
    """A value inside a QEMU ``-drive``/``-device`` option list: commas doubled."""
    return str(value).replace(",", ",,")


def disk_create_argv(qemu_img: str, disk: Path, size_gib: int) -> list[str]:
    return [qemu_img, "create", "-q", "-f", "qcow2", str(disk), f"{size_gib}G"]


def files(spec: VmSpec) -> dict[str, Path]:
    """The files of one VM, all in its directory (the manifest lists exactly these)."""
    d = spec.path
    return {
        "disk": d / "disk.qcow2",
        "efivars": d / "efivars.fd",
        "pid": d / "qemu.pid",
        "qmp": d / "qmp.sock",
        "console": d / "console.log",
        "qemu-log": d / "qemu.log",
        # the VM's hardware configuration, read from it by the stack's hardware fetch
        # (render.VmRender.hardware_file): it goes with the VM's disk
        "hardware": d / "hardware.nix",
    }


def vm_argv(
    spec: VmSpec, accel: str, *, ovmf: Ovmf | None, iso: Path | None
) -> list[str]:
    """The daemonized QEMU of ``spec``. With ``iso`` it is the install boot: the ISO on a CD
    drive that boots first, and ``-no-reboot`` (the installer's reboot ends QEMU, so the
    installed disk is never booted with the installer beside it)."""
    f = files(spec)
    argv = [
        spec.qemu,
        "-name", f"guest={spec.name},process={spec.name}",
        "-machine", "pc",
        "-accel", accel,
        *(["-cpu", "host"] if accel == "kvm" else []),
        "-m", str(spec.memory_mib),
        "-smp", str(spec.cpus),
        "-nodefaults",
        "-display", "none",
        "-vga", "std",
        "-chardev", f"file,id=console,path={_opt(f['console'])},append=on",
        "-serial", "chardev:console",
    ]
    if spec.boot == "efi":
        if ovmf is None:
            raise ValueError("an EFI VM needs OVMF")
        argv += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(ovmf.code)}",
            "-drive", f"if=pflash,format=raw,unit=1,file={_opt(f['efivars'])}",
        ]
    disk = f"virtio-blk-pci,drive=disk,bootindex={2 if iso else 1}"
    if spec.serial:
        disk += f",serial={spec.serial}"
    argv += [
        "-drive", f"if=none,id=disk,format=qcow2,file={_opt(f['disk'])}",
        "-device", disk,
    ]
    if iso is not None:
        argv += [
            "-drive", f"if=none,id=cd,media=cdrom,readonly=on,format=raw,file={_opt(iso)}",
            "-device", "ide-cd,drive=cd,bus=ide.1,bootindex=1",
            "-no-reboot",
        ]
    argv += [
        # entropy from the host: a fresh guest's CRNG is not ready for seconds otherwise
        # (under TCG every libuuid call in parted and mkfs waited ~1 s for it)
        "-object", "rng-random,id=rng,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng",
        "-netdev", f"tap,id=net,ifname={spec.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=net,mac={spec.mac}",
        "-qmp", f"unix:{_opt(f['qmp'])},server=on,wait=off",
        "-pidfile", str(f["pid"]),
        "-D", str(f["qemu-log"]),
        "-daemonize",
    ]
    return argv
