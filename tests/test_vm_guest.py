"""Inside a VM: the planned disk serial and MAC, the planned IP, system-setup.sh on a virtio disk.

Real QEMU under TCG booting the Debian test guest (tests/vmguest.py), one guest build
shared by every test. Networking only inside a network namespace made here (a bridge
carrying the plan's gateway address and a tap per VM), with plan addresses only.
The disk layout the guest made is read back on this side from the image (qemu-img,
parted, blkid at the partitions' offsets, mtools for the FAT file system this kernel cannot mount).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import vmguest as vg

from k3scluster import plans
from k3scluster.installer import find_iso, render_installer
from k3scluster.lab import spec as lab_spec
from k3scluster.lab.spec import planned_macs
from k3scluster.model import Cluster, Host
from k3scluster.render import render_to_dir

pytestmark = pytest.mark.vm

TOOLS = ("qemu-system-x86_64", "qemu-img", "grub-mkrescue", "xorriso", "mdir", "ip", "parted")


@pytest.fixture(scope="session")
def guest() -> vg.Guest:
    if os.geteuid() != 0:
        pytest.fail("the vm tests need root (QEMU taps in a network namespace)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"the vm tests need {', '.join(missing)}: run scripts/setup")
    return vg.build_guest()


@pytest.fixture(scope="module")
def cluster(example_src_module: Path) -> Cluster:
    result = plans.load(example_src_module)
    assert result.cluster is not None, result.diagnostics
    return result.cluster


@pytest.fixture(scope="module")
def example_src_module() -> Path:
    return Path(__file__).resolve().parent.parent / "examples" / "cluster"


def planned_serial(h: Host) -> str:
    """The serial as the disk itself reports it: the hosts.csv cell, in its own case."""
    serial = h.column_map["disk"]
    assert serial and serial.lower() == h.disk
    return serial


def gateway_cidr(cluster: Cluster) -> str:
    return f"{cluster.network.gateway}/{cluster.network.prefix_length}"


def host_cidr(cluster: Cluster, h: Host) -> str:
    return f"{h.ip}/{cluster.network.prefix_length}"


def setup_script(cluster: Cluster, host: str, tmp: Path) -> str:
    return render_installer(cluster, host, tmp)[f"installers/{host}/system-setup.sh"]


def raw_copy(disk: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(out)], check=True)
    return out


def digest(disk: Path, tmp: Path) -> str:
    raw = raw_copy(disk, tmp / f"digest-{uuid.uuid4().hex}.raw")
    try:
        h = hashlib.sha256()
        with open(raw, "rb") as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
        return h.hexdigest()
    finally:
        raw.unlink()


def parted(image: Path) -> list[list[str]]:
    out = subprocess.run(
        ["parted", "-s", "-m", str(image), "unit", "MiB", "print"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.rstrip(";").split(":") for line in out.splitlines()[1:]]


def blkid_parts(image: Path) -> dict[int, dict[str, str]]:
    """TYPE/LABEL of each partition's file system, probed in the image at its offset."""
    out = subprocess.run(
        ["parted", "-s", "-m", str(image), "unit", "B", "print"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = {}
    for line in out.splitlines()[2:]:
        number, start = line.split(":")[:2]
        probe = subprocess.run(
            ["blkid", "-p", "-o", "export", "-O", start.rstrip("B"), str(image)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        result[int(number)] = dict(x.split("=", 1) for x in probe.splitlines() if "=" in x)
    return result


@dataclass
class Lab:
    ns: str
    taps: list[str]


@dataclass
class Installed:
    host: str
    serial: str
    disk: Path
    bystander: Path
    bystander_digest: str
    iso: Path
    console: str
    firmware: str


def _install(guest, cluster, host: str, tmp: Path) -> Installed:
    h = cluster.host(host)
    serial = planned_serial(h)
    cfg = vg.GuestConfig(
        host=host,
        serial=serial,
        boot=h.boot.value,
        job="install",
        setup_script=setup_script(cluster, host, tmp),
        setup_args=("ESP_SIZE_MIB=64",),
    )
    iso = vg.guest_iso(tmp / f"{host}.iso", config=cfg, guest=guest)
    disk = vg.make_disk(tmp / f"{host}.qcow2", 300)
    # a second disk with data and another serial: it must never change
    bystander = vg.make_disk(tmp / "bystander.qcow2", 32)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 0 1M", str(bystander)], check=True, capture_output=True
    )
    before = digest(bystander, tmp)
    firmware = h.boot.value
    vm = vg.Vm(
        tmp / "install",
        firmware=firmware,
        iso=iso,
        disks=[vg.Disk(bystander, "OTHER-DISK-ZZZ999"), vg.Disk(disk, serial)],
    )
    console = vm.run(300)
    return Installed(host, serial, disk, bystander, before, iso, console, firmware)


STACK = "test-vms"
NIX = Path(__file__).resolve().parent / "bin" / "nix"


@pytest.fixture(scope="module")
def vm_render(cluster, tmp_path_factory) -> Path:
    """The example cluster rendered for a VM stack (NICs named by the VMs' MACs)."""
    out = tmp_path_factory.mktemp("render") / "render"
    render_to_dir(cluster, out, [], lab_spec.vm_render(cluster, STACK, out))
    return out


@pytest.fixture(scope="module")
def lab_module(cluster):
    """A network namespace with the lab bridge (the plan's gateway), for a module's VMs."""
    name = f"k3st-{uuid.uuid4().hex[:8]}"
    with vg.netns(name) as ns:
        vg.lab_bridge(ns, gateway_cidr(cluster), ["tap0"])
        yield Lab(ns, ["tap0"])


@pytest.fixture(scope="module")
def installed_efi(guest, cluster, vm_render, lab_module, tmp_path_factory) -> Installed:
    """olaf installed from the ISO the stand-in nix builds from the VM stack's render."""
    tmp = tmp_path_factory.mktemp("efi")
    link = tmp / "result-olaf"
    r = subprocess.run(
        [str(NIX), "--extra-experimental-features", "nix-command", "build", "--file",
         str(vm_render / "installers" / "olaf"), "--out-link", str(link)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    iso = find_iso(link)
    h = cluster.host("olaf")
    serial = planned_serial(h)
    disk = vg.make_disk(tmp / "olaf.qcow2", 1024)  # the plan's 512 MiB ESP and a root
    bystander = vg.make_disk(tmp / "bystander.qcow2", 32)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 0 1M", str(bystander)], check=True, capture_output=True
    )
    before = digest(bystander, tmp)
    vm = vg.Vm(
        tmp / "install",
        firmware="efi",
        iso=iso,
        disks=[vg.Disk(bystander, "OTHER-DISK-ZZZ999"), vg.Disk(disk, serial)],
        nic=vg.Nic(lab_module.taps[0], planned_macs(cluster, STACK)["olaf"]),
        netns=lab_module.ns,
    )
    console = vm.run(400)
    return Installed("olaf", serial, disk, bystander, before, iso, console, "efi")


@pytest.fixture(scope="module")
def installed_bios(guest, cluster, tmp_path_factory) -> Installed:
    return _install(guest, cluster, "rolf", tmp_path_factory.mktemp("bios"))


def _boots_from_disk(inst: Installed, tmp: Path) -> str:
    vm = vg.Vm(
        tmp / "boot",
        firmware=inst.firmware,
        boot="disk",
        disks=[
            vg.Disk(inst.bystander, "OTHER-DISK-ZZZ999"),
            vg.Disk(inst.disk, inst.serial, boot=True),
        ],
    )
    with vm:
        vm.wait_for(r"^K3SGUEST serving", 240)
        assert vm.running()
        vm.send("poweroff")  # typed on the serial console
        assert vm.wait_exit(60) == 0
    return vm.console()


def test_system_setup_efi_in_guest(installed_efi: Installed, tmp_path):
    inst = installed_efi
    text = inst.console
    assert "K3SGUEST boot host=olaf job=install firmware=efi" in text
    # found by serial, through udev's by-id link, on the second virtio disk
    assert f"find-disk: virtio-{inst.serial.lower()} -> /dev/vdb" in text
    assert "install disk: /dev/vdb" in text
    # the vfat step loop devices on this machine cannot cover (test_system_setup.py)
    assert "mounting /dev/vdb2 at /mnt and /dev/vdb1 at /mnt/boot" in text
    assert "K3SGUEST job install done rc=0" in text, text
    assert digest(inst.bystander, tmp_path) == inst.bystander_digest

    raw = raw_copy(inst.disk, tmp_path / "olaf.raw")
    table = parted(raw)
    assert table[0][5] == "gpt"
    p1, p2 = table[1], table[2]
    assert (p1[0], p1[1], p1[2], p1[4], p1[5]) == ("1", "1.00MiB", "513MiB", "fat32", "boot")
    assert "esp" in p1[6]
    assert (p2[0], p2[4], p2[5]) == ("2", "ext4", "nixos")
    fs = blkid_parts(raw)
    assert (fs[1]["TYPE"], fs[1]["LABEL"]) == ("vfat", "boot")
    assert (fs[2]["TYPE"], fs[2]["LABEL"]) == ("ext4", "nixos")
    # the guest wrote onto the FAT file system: the boot loader and kernel are there
    listing = subprocess.run(
        ["mdir", "-b", "-i", f"{raw}@@1M", "::/EFI/BOOT"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "BOOTX64.EFI" in listing.stdout.upper(), listing.stderr


def test_efi_disk_boots_installed_system_at_its_planned_ip_and_nic_name(
    installed_efi: Installed, cluster, lab_module, tmp_path
):
    olaf = cluster.host("olaf")
    mac = planned_macs(cluster, STACK)["olaf"]
    inst = installed_efi
    vm = vg.Vm(
        tmp_path / "boot",
        firmware="efi",
        boot="disk",
        disks=[
            vg.Disk(inst.bystander, "OTHER-DISK-ZZZ999"),
            vg.Disk(inst.disk, inst.serial, boot=True),
        ],
        nic=vg.Nic(lab_module.taps[0], mac),
        netns=lab_module.ns,
    )
    with vm:
        vm.wait_for(r"^K3SGUEST serving", 240)
        text = vm.console()
        assert "K3SGUEST boot host=olaf job=serve firmware=efi" in text
        assert f"/dev/vdb serial={inst.serial}" in vg.fact_values(text, "disk")
        assert f"virtio-{inst.serial} /dev/vdb" in vg.fact_values(text, "byid")
        # the render's .link (VM stacks) names the NIC as planned; udev applied it
        assert vg.fact_values(text, "nic") == [f"{olaf.interface} mac={mac}"]
        assert vg.fact_values(text, "net") == [
            f"{olaf.interface} ip={host_cidr(cluster, olaf)} gateway={cluster.network.gateway}"
        ]
        assert vg.ping_until(lab_module.ns, str(olaf.ip), 60), vm.tail()
        # another plan address, with no VM behind it, does not answer: the ping tells apart
        assert not vg.ping_until(lab_module.ns, str(cluster.host("ulf").ip), 2)
        # sshd answers with the host key made at the install (read from the disk)
        (fingerprint,) = vg.fact_values(text, "sshd")
        scan = vg.ns_run(lab_module.ns, "ssh-keyscan", "-t", "ed25519", str(olaf.ip))
        key = tmp_path / "scanned.pub"
        key.write_text(scan.stdout.split(None, 1)[1])
        assert fingerprint in subprocess.run(
            ["ssh-keygen", "-l", "-f", str(key)], capture_output=True, text=True, check=True
        ).stdout
        vm.powerdown()
        assert vm.wait_exit(60) == 0
    assert "K3SGUEST poweroff power button" in vm.console()


def test_system_setup_bios_in_guest(installed_bios: Installed, tmp_path):
    inst = installed_bios
    text = inst.console
    assert "K3SGUEST boot host=rolf job=install firmware=bios" in text
    # hosts.csv has WD-WCC4N1234567, the plan lowercases it: matched case-insensitively
    assert f"find-disk: virtio-{inst.serial} -> /dev/vdb" in text
    assert "install disk: /dev/vdb" in text
    assert "K3SGUEST job install done rc=0" in text, text
    assert digest(inst.bystander, tmp_path) == inst.bystander_digest

    raw = raw_copy(inst.disk, tmp_path / "rolf.raw")
    table = parted(raw)
    assert table[0][5] == "gpt"
    assert len(table) == 3
    assert (table[1][0], table[1][1], table[1][2], table[1][5]) == ("1", "1.00MiB", "2.00MiB", "bios")
    assert "bios_grub" in table[1][6]
    assert (table[2][0], table[2][1], table[2][4], table[2][5]) == ("2", "2.00MiB", "ext4", "nixos")
    fs = blkid_parts(raw)
    assert (fs[2]["TYPE"], fs[2]["LABEL"]) == ("ext4", "nixos")
    with open(raw, "rb") as f:
        mbr = f.read(512)
    assert mbr[510:] == b"\x55\xaa" and mbr[:440].strip(b"\0"), "no boot code in the MBR"
    # the protective MBR entry (type 0xee) carries the boot flag (pmbr_boot)
    assert mbr[446 + 4] == 0xEE and mbr[446] == 0x80


def test_bios_disk_boots_installed_system_until_the_console_says_poweroff(
    installed_bios: Installed, tmp_path
):
    text = _boots_from_disk(installed_bios, tmp_path)
    assert "K3SGUEST boot host=rolf job=serve firmware=bios" in text
    assert "K3SGUEST poweroff console command" in text


def test_refuses_two_disks_with_the_planned_serial(guest, cluster, tmp_path):
    h = cluster.host("rolf")
    serial = planned_serial(h)
    cfg = vg.GuestConfig(
        host="rolf",
        serial=serial,
        boot="bios",
        job="install",
        setup_script=setup_script(cluster, "rolf", tmp_path),
        poweroff_on_failure=True,  # as a VM stack's image: the script powers off
    )
    a = vg.make_disk(tmp_path / "a.qcow2", 64)
    b = vg.make_disk(tmp_path / "b.qcow2", 64)
    for disk, pattern in ((a, "0x61"), (b, "0x62")):
        subprocess.run(
            ["qemu-io", "-c", f"write -P {pattern} 0 1M", str(disk)],
            check=True,
            capture_output=True,
        )
    before = digest(a, tmp_path), digest(b, tmp_path)
    initrd = vg.guest_initrd(tmp_path / "initrd", config=cfg, guest=guest)
    vm = vg.Vm(
        tmp_path / "vm",
        kernel=guest.kernel,
        initrd=initrd,
        append=vg.kernel_cmdline(cfg),
        disks=[vg.Disk(a, serial), vg.Disk(b, serial)],
    )
    text = vm.run(240)
    assert "2 disks match the serial" in text
    assert 'ERROR in step "find-disk"' in text
    assert "k3scluster-install: FAILED host=rolf step=find-disk exit=1" in text
    assert "k3scluster-install: OK" not in text
    assert "K3SGUEST job install done" not in text  # the script powered off itself
    assert (digest(a, tmp_path), digest(b, tmp_path)) == before


def _reinstall_vm(guest, inst: Installed, cluster, tmp: Path, cmdline: tuple[str, ...]):
    h = cluster.host(inst.host)
    cfg = vg.GuestConfig(
        host=inst.host,
        serial=inst.serial,
        boot=h.boot.value,
        job="install",
        setup_script=setup_script(cluster, inst.host, tmp),
        setup_args=("ESP_SIZE_MIB=64",),
        cmdline=cmdline,
    )
    # (no system to carry: these runs are about the disk already there)
    initrd = vg.guest_initrd(tmp / "initrd", config=cfg, guest=guest)
    return vg.Vm(
        tmp / "vm",
        kernel=guest.kernel,
        initrd=initrd,
        append=vg.kernel_cmdline(cfg),
        disks=[vg.Disk(inst.disk, inst.serial)],
    )


def test_refuses_to_wipe_an_installed_disk_unless_reinstall_is_asked(
    guest, cluster, installed_bios: Installed, tmp_path
):
    # a copy of the installed disk: the other tests keep theirs
    copy = tmp_path / "installed.qcow2"
    shutil.copyfile(installed_bios.disk, copy)
    inst = Installed(**{**installed_bios.__dict__, "disk": copy})
    before = digest(copy, tmp_path)

    # a hardware stack's image: after the refusal it stays up (nothing powers it off), as
    # the real image does when its system_setup.service failed
    with _reinstall_vm(guest, inst, cluster, tmp_path / "again", ()) as vm:
        vm.wait_for(r"^K3SGUEST job install done rc=3", 240)
        time.sleep(2)
        assert vm.running()
        text = vm.console()
    assert 'REFUSED in step "check-installed"' in text, text
    assert "already holds an installed NixOS" in text
    assert "/nix/var/nix/profiles/system ->" in text
    assert "k3scluster-install: FAILED host=rolf step=check-installed exit=3" in text
    assert "k3scluster-install: OK" not in text
    assert digest(copy, tmp_path) == before

    text = _reinstall_vm(
        guest, inst, cluster, tmp_path / "reinstall", ("k3scluster.reinstall=1",)
    ).run(240)
    assert "k3scluster.reinstall=1 on the kernel command line: replacing" in text, text
    assert "K3SGUEST job install done rc=0" in text
    assert "k3scluster-install: OK host=rolf" in text
    assert digest(copy, tmp_path) != before
