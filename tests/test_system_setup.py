"""system-setup.sh run for real on loop devices (root only; never a real disk).

The script finds disks through a by-id directory the test makes (symlinks named like
udev's, pointing at loop devices), so it never sees the machine's disks. nixos-install
and the poweroff are skipped with SKIP_INSTALL=1, except in the re-run test where the
missing nixos-install is the failure, and in the install tests, which put stand-ins
for nixos-install and poweroff first on PATH (``standins``: nixos-install cannot run
here, and the machine must not power off).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import loopdevices
import pytest
from loopdevices import sha256_of, unmount_under

from k3scluster import plans
from k3scluster.bootdisk import udev_rules
from k3scluster.installer import render_installer

pytestmark = pytest.mark.root
loop_factory = loopdevices.loop_factory  # the fixture

VFAT = "vfat" in Path("/proc/filesystems").read_text()


@pytest.fixture
def cluster(example_src: Path):
    result = plans.load(example_src)
    assert result.cluster is not None, result.diagnostics
    return result.cluster


@pytest.fixture
def script(cluster, tmp_path: Path) -> Callable[[str], Path]:
    def make(host: str) -> Path:
        files = render_installer(cluster, host, tmp_path / "render")
        path = tmp_path / f"system-setup-{host}.sh"
        path.write_text(files[f"installers/{host}/system-setup.sh"])
        return path

    return make


@pytest.fixture
def mnt(tmp_path: Path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    unmount_under(path)


@pytest.fixture
def byid(tmp_path: Path) -> Path:
    path = tmp_path / "by-id"
    path.mkdir()
    return path


def run(script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "SKIP_INSTALL": "1"}
    full.update(env)
    return subprocess.run(
        ["bash", str(script)], env=full, capture_output=True, text=True, check=False, timeout=300
    )


def parted(dev: str) -> list[list[str]]:
    out = subprocess.run(
        ["parted", "-s", "-m", dev, "unit", "MiB", "print"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.rstrip(";").split(":") for line in out.splitlines()[1:]]


def disk_flags(dev: str) -> str:
    """The disk's own flags (`disk_set`), as `parted print` lists them."""
    out = subprocess.run(
        ["parted", "-s", dev, "print"], capture_output=True, text=True, check=True
    ).stdout
    return next(line for line in out.splitlines() if line.startswith("Disk Flags:"))


def blkid(dev: str) -> dict[str, str]:
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", dev], capture_output=True, text=True, check=False
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def mounted_at(path: Path) -> str:
    """The source device of the mount at ``path`` ('' when nothing is mounted there)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return line.split(" - ", 1)[1].split()[1]
    return ""


@pytest.fixture
def bystander(loop_factory, byid: Path):
    """A second disk with data and its own serial: it must never change."""
    dev = loop_factory(16, name="bystander.img", fill=os.urandom(1 << 20))
    (byid / "ata-Other_Disk_ZZZ999").symlink_to(dev)
    before = sha256_of(dev)
    yield dev
    assert sha256_of(dev) == before, "the bystander disk was touched"


def test_efi_layout(script, loop_factory, byid, mnt, bystander):
    dev = loop_factory(300)
    (byid / "ata-Samsung_SSD_860_EVO_S4EVNX0R123456").symlink_to(dev)
    # a partition link of the same serial is not a second disk
    (byid / "ata-Samsung_SSD_860_EVO_S4EVNX0R123456-part1").symlink_to(bystander)
    r = run(script("olaf"), BYID_DIR=str(byid), MNT=str(mnt), ESP_SIZE_MIB="64")

    table = parted(dev)
    assert table[0][5] == "gpt"
    p1, p2 = table[1], table[2]
    assert (p1[0], p1[4], p1[5]) == ("1", "fat32", "boot") and "esp" in p1[6]
    assert p1[1] == "1.00MiB" and p1[2] == "65.0MiB"
    assert (p2[0], p2[4], p2[5]) == ("2", "ext4", "nixos")
    assert blkid(dev + "p1")["TYPE"] == "vfat" and blkid(dev + "p1")["LABEL"] == "boot"
    assert blkid(dev + "p2")["TYPE"] == "ext4" and blkid(dev + "p2")["LABEL"] == "nixos"
    assert mounted_at(mnt) == dev + "p2"
    if VFAT:
        assert r.returncode == 0, r.stdout + r.stderr
        assert mounted_at(mnt / "boot") == dev + "p1"
    else:
        # this kernel cannot mount FAT: the script must stop right there, naming the step
        assert r.returncode != 0
        assert 'ERROR in step "mount"' in r.stdout and "$MNT/boot" in r.stdout
    assert "install disk: " + dev in r.stdout


def test_bios_layout_serial_case_insensitive(script, loop_factory, byid, mnt, bystander):
    dev = loop_factory(300)
    # plan has wd-wcc4n1234567 (lowercased); udev keeps the disk's own case
    (byid / "ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567").symlink_to(dev)
    r = run(script("rolf"), BYID_DIR=str(byid), MNT=str(mnt))
    assert r.returncode == 0, r.stdout + r.stderr
    # GPT (an msdos table stops at 2 TiB): a 1 MiB BIOS boot partition for GRUB's core
    # image, the ext4 root labelled nixos, the protective MBR marked bootable
    table = parted(dev)
    assert table[0][5] == "gpt"
    assert len(table) == 3
    p1, p2 = table[1], table[2]
    assert (p1[0], p1[1], p1[2], p1[5]) == ("1", "1.00MiB", "2.00MiB", "bios")
    assert "bios_grub" in p1[6]
    assert (p2[0], p2[1], p2[4], p2[5]) == ("2", "2.00MiB", "ext4", "nixos")
    assert "pmbr_boot" in disk_flags(dev)
    # the BIOS boot partition's GPT type (what grub-install looks for)
    assert blkid(dev + "p1")["PART_ENTRY_TYPE"] == "21686148-6449-6e6f-744e-656564454649"
    assert "TYPE" not in blkid(dev + "p1")
    assert blkid(dev + "p2")["LABEL"] == "nixos" and blkid(dev + "p2")["TYPE"] == "ext4"
    assert mounted_at(mnt) == dev + "p2"
    for step in ("find-disk", "check-disk", "wipe", "partition", "mkfs", "mount"):
        assert f"] {step}: " in r.stdout


def test_nvme_and_usb_names(script, loop_factory, byid, mnt, bystander):
    dev = loop_factory(300)
    (byid / "nvme-WDC_WDS100T2B0C_WD-WCC4N1234567_1").symlink_to(dev)
    (byid / "nvme-eui.0025388b71b12345").symlink_to(dev)
    r = run(script("rolf"), BYID_DIR=str(byid), MNT=str(mnt))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "install disk: " + dev in r.stdout


def test_refuses_when_no_disk_has_the_serial(script, loop_factory, byid, mnt, bystander):
    dev = loop_factory(64, fill=b"keep me" * 1000)
    (byid / "ata-Samsung_SSD_860_EVO_S4EVNX0R999999").symlink_to(dev)
    # a longer serial that merely ends like the planned one is another disk
    (byid / "ata-Disk_XS4EVNX0R123456").symlink_to(dev)
    before = sha256_of(dev)
    r = run(script("olaf"), BYID_DIR=str(byid), MNT=str(mnt), ESP_SIZE_MIB="64")
    assert r.returncode != 0
    assert 'ERROR in step "find-disk"' in r.stdout
    assert "no disk has the serial s4evnx0r123456" in r.stdout
    assert sha256_of(dev) == before


def test_refuses_two_disks_with_the_serial(script, loop_factory, byid, mnt, bystander):
    a = loop_factory(64, fill=b"disk a" * 1000)
    b = loop_factory(64, fill=b"disk b" * 1000)
    (byid / "ata-Samsung_SSD_860_EVO_S4EVNX0R123456").symlink_to(a)
    (byid / "usb-Samsung_SSD_860_EVO_S4EVNX0R123456-0:0").symlink_to(b)
    sums = sha256_of(a), sha256_of(b)
    r = run(script("olaf"), BYID_DIR=str(byid), MNT=str(mnt), ESP_SIZE_MIB="64")
    assert r.returncode != 0
    assert "2 disks match the serial" in r.stdout
    assert (sha256_of(a), sha256_of(b)) == sums


def test_refuses_a_mounted_disk(script, loop_factory, byid, mnt, tmp_path, bystander):
    dev = loop_factory(300)
    (byid / "ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567").symlink_to(dev)
    assert run(script("rolf"), BYID_DIR=str(byid), MNT=str(mnt)).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", dev + "p2", str(elsewhere)], check=True)
    try:
        (elsewhere / "data").write_text("precious")
        other_mnt = tmp_path / "mnt2"
        r = run(script("rolf"), BYID_DIR=str(byid), MNT=str(other_mnt))
        assert r.returncode != 0
        assert 'ERROR in step "check-disk"' in r.stdout and "is mounted" in r.stdout
        assert (elsewhere / "data").read_text() == "precious"
    finally:
        unmount_under(elsewhere)


def test_rerun_after_a_failure(script, loop_factory, byid, mnt, tmp_path, bystander):
    if shutil.which("nixos-install"):
        pytest.skip("nixos-install is installed here: the failure this test needs would not happen")
    dev = loop_factory(300)
    (byid / "ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567").symlink_to(dev)
    system = tmp_path / "system"
    system.mkdir()
    grub = tmp_path / "bootdisk"
    grub.symlink_to(dev)
    first = run(
        script("rolf"),
        BYID_DIR=str(byid),
        MNT=str(mnt),
        SKIP_INSTALL="0",
        SYSTEM=str(system),
        GRUB_DEVICES=str(grub),
    )
    assert first.returncode != 0
    assert 'ERROR in step "install"' in first.stdout
    assert mounted_at(mnt) == dev + "p2"  # left as it was when it failed
    second = run(script("rolf"), BYID_DIR=str(byid), MNT=str(mnt))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "unmounting what a previous run left" in second.stdout
    assert mounted_at(mnt) == dev + "p2"
    assert blkid(dev + "p2")["LABEL"] == "nixos"


def test_missing_system_stops_before_the_disk(script, loop_factory, byid, mnt, bystander):
    dev = loop_factory(64, fill=b"untouched" * 1000)
    (byid / "ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567").symlink_to(dev)
    before = sha256_of(dev)
    r = run(script("rolf"), BYID_DIR=str(byid), MNT=str(mnt), SKIP_INSTALL="0")
    assert r.returncode != 0 and 'ERROR in step "check"' in r.stdout and "SYSTEM" in r.stdout
    assert sha256_of(dev) == before


def _labelled(dev: str, *, efi: bool) -> None:
    if efi:
        subprocess.run(
            [
                "parted",
                "-s",
                dev,
                "--",
                "mklabel",
                "gpt",
                "mkpart",
                "boot",
                "fat32",
                "1MiB",
                "65MiB",
                "set",
                "1",
                "esp",
                "on",
                "mkpart",
                "nixos",
                "ext4",
                "65MiB",
                "100%",
            ],
            check=True,
            capture_output=True,
        )
    else:
        subprocess.run(
            [
                "parted",
                "-s",
                dev,
                "--",
                "mklabel",
                "msdos",
                "mkpart",
                "primary",
                "ext4",
                "1MiB",
                "100%",
            ],
            check=True,
            capture_output=True,
        )
    subprocess.run(["partprobe", dev], check=False, capture_output=True)
    root = dev + ("p2" if efi else "p1")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "nixos", root], check=True)


def test_no_serial_uses_labelled_partitions(script, loop_factory, tmp_path, mnt, bystander):
    dev = loop_factory(128)
    _labelled(dev, efi=False)
    bylabel = tmp_path / "by-label"
    bylabel.mkdir()
    (bylabel / "nixos").symlink_to(dev + "p1")
    # mark the file system: the script must use it as it is, not format it
    subprocess.run(["mount", dev + "p1", str(mnt)], check=True)
    (mnt / "marker").write_text("kept")
    unmount_under(mnt)
    table_before = parted(dev)
    r = run(script("ulf"), BYLABEL_DIR=str(bylabel), MNT=str(mnt), BOOT="bios")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no disk serial in the plan" in r.stdout
    assert mounted_at(mnt) == dev + "p1"
    assert (mnt / "marker").read_text() == "kept"
    assert parted(dev) == table_before


def test_no_serial_waits_for_udev_before_it_looks_for_labels(
    script, loop_factory, tmp_path, mnt, bystander
):
    # The installer unit no longer waits for systemd-udev-settle.service: the script settles
    # udev itself, also before it looks in by-label (a stand-in udevadm makes the link only
    # when `udevadm settle` runs, as udev would have made it by then)
    dev = loop_factory(128)
    _labelled(dev, efi=False)
    bylabel = tmp_path / "by-label"
    bylabel.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    udevadm = bindir / "udevadm"
    udevadm.write_text(
        "#!/bin/sh\n"
        "# stands in for udevadm: `settle` = udev has made the by-label links by now\n"
        f'[ "$1" = settle ] && ln -sfn {dev}p1 {bylabel}/nixos\n'
        "exit 0\n"
    )
    udevadm.chmod(0o755)
    path = f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    r = run(script("ulf"), BYLABEL_DIR=str(bylabel), MNT=str(mnt), BOOT="bios", PATH=path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert mounted_at(mnt) == dev + "p1"


def test_no_serial_without_labels_fails_clearly(script, loop_factory, tmp_path, mnt, bystander):
    dev = loop_factory(128)
    _labelled(dev, efi=True)
    bylabel = tmp_path / "by-label"
    bylabel.mkdir()
    (bylabel / "nixos").symlink_to(dev + "p2")  # no "boot": EFI needs it
    r = run(script("ulf"), BYLABEL_DIR=str(bylabel), MNT=str(mnt))
    assert r.returncode != 0
    assert "no partition labelled 'boot'" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(script("ulf"), BYLABEL_DIR=str(empty), MNT=str(mnt))
    assert r.returncode != 0 and "no partition labelled 'nixos'" in r.stdout
    assert mounted_at(mnt) == ""


def test_arguments_override_the_plan(script, loop_factory, byid, mnt, bystander):
    dev = loop_factory(300)
    (byid / "virtio-MYSERIAL1").symlink_to(dev)
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SKIP_INSTALL": "1"}
    r = subprocess.run(
        [
            "bash",
            str(script("olaf")),
            "SERIAL=myserial1",
            "BOOT=bios",
            f"BYID_DIR={byid}",
            f"MNT={mnt}",
        ],
        env=full,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert parted(dev)[0][5] == "gpt" and parted(dev)[1][5] == "bios"
    bad = subprocess.run(
        ["bash", str(script("olaf")), "DISK=/dev/sda"],
        env=full,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_installer_json_matches_script_defaults(cluster, tmp_path):
    files = render_installer(cluster, "rolf", tmp_path)
    data = json.loads(files["installers/rolf/installer.json"])
    assert data["host"] == "rolf" and data["boot"] == "bios"
    assert data["serial"] == "wd-wcc4n1234567"
    assert data["udevRules"] == udev_rules("wd-wcc4n1234567")
    text = files["installers/rolf/system-setup.sh"]
    assert "PLAN_SERIAL=wd-wcc4n1234567\n" in text and "PLAN_BOOT=bios\n" in text


# --- never wipe twice, power off when done ---------------------------------------------

# Stand-in for nixos-install (it cannot run here): records its arguments and leaves in the
# target what the real one leaves there (nixos-install.sh: `touch $mountPoint/etc/NIXOS`;
# nix-env --profile $mountPoint/nix/var/nix/profiles/system --set $system).
NIXOS_INSTALL = """#!/usr/bin/env bash
set -eu
echo "$*" >> "$STANDIN_LOG/nixos-install"
root=""; system=""
while (($#)); do
  case "$1" in --root) root="$2"; shift ;; --system) system="$2"; shift ;; esac
  shift
done
mkdir -p "$root/etc" "$root/nix/var/nix/profiles"
touch "$root/etc/NIXOS"
ln -sfn "$system" "$root/nix/var/nix/profiles/system-1-link"
ln -sfn system-1-link "$root/nix/var/nix/profiles/system"
"""
POWEROFF = """#!/usr/bin/env bash
echo "poweroff $*" >> "$STANDIN_LOG/poweroff"
"""


@pytest.fixture
def standins(tmp_path: Path) -> dict[str, str]:
    """Environment for a full run: stand-ins first on PATH, the poweroff recorded, a command line."""
    bindir = tmp_path / "standin-bin"
    bindir.mkdir()
    logs = tmp_path / "standin-log"
    logs.mkdir()
    for name, text in (("nixos-install", NIXOS_INSTALL), ("poweroff-standin", POWEROFF)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    system = tmp_path / "nix-store-system-rolf"
    system.mkdir()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(
        "BOOT_IMAGE=/boot/bzImage init=/nix/store/x-init root=LABEL=nixos-minimal quiet\n"
    )
    return {
        "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "STANDIN_LOG": str(logs),
        "POWEROFF": str(bindir / "poweroff-standin"),
        "PROC_CMDLINE": str(cmdline),
        "SYSTEM": str(system),
        "SKIP_INSTALL": "0",
        "TMPDIR": str(scratch),
    }


def _log(env: dict[str, str], name: str) -> list[str]:
    path = Path(env["STANDIN_LOG"]) / name
    return path.read_text().splitlines() if path.exists() else []


def _reinstall(env: dict[str, str], tmp_path: Path, cmdline: str) -> dict[str, str]:
    path = tmp_path / "cmdline-reinstall"
    path.write_text(cmdline + "\n")
    return dict(env, PROC_CMDLINE=str(path))


def test_installs_powers_off_and_never_wipes_twice(
    script, loop_factory, byid, mnt, tmp_path, bystander, standins
):
    dev = loop_factory(300)
    (byid / "ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567").symlink_to(dev)
    grub = tmp_path / "k3scluster-bootdisk"  # what the udev rule makes on the image
    grub.symlink_to(dev)
    env = dict(standins, BYID_DIR=str(byid), MNT=str(mnt), GRUB_DEVICES=str(grub))
    first = run(script("rolf"), **env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _log(env, "nixos-install") == [
        f"--system {env['SYSTEM']} --root {mnt} --no-root-passwd --no-channel-copy"
    ]
    assert _log(env, "poweroff") == ["poweroff "]
    assert "remove the stick, then power on" in first.stdout
    # the line the VM lab requires before it counts an install, before the poweroff
    assert "k3scluster-install: OK host=rolf\n" in first.stdout
    assert "k3scluster-install: FAILED" not in first.stdout
    assert f"GRUB goes to {grub} -> {dev}" in first.stdout
    assert mounted_at(mnt) == ""  # unmounted before the poweroff
    uuid = blkid(dev + "p2")["UUID"]

    # The stick is still in and the machine boots it again: nothing may change.
    before = sha256_of(dev)
    second = run(script("rolf"), **env)
    assert second.returncode == 3, second.stdout + second.stderr
    assert 'REFUSED in step "check-installed"' in second.stdout
    assert f"{dev} already holds an installed NixOS" in second.stdout
    assert f"{dev}p2 (ext4, label nixos): /nix/var/nix/profiles/system -> system-1-link" in (
        second.stdout
    )
    assert "add k3scluster.reinstall=1 to the kernel command line" in second.stdout
    assert "nothing was changed" in second.stdout
    assert second.stdout.splitlines()[-1] == (
        "k3scluster-install: FAILED host=rolf step=check-installed exit=3"
    )
    assert sha256_of(dev) == before
    # a machine's image does not power off after a refusal (the user reads why)...
    assert len(_log(env, "nixos-install")) == 1 and len(_log(env, "poweroff")) == 1
    # ... a VM stack's does (POWEROFF_ON_FAILURE=1), after saying so
    vm_run = run(script("rolf"), **dict(env, POWEROFF_ON_FAILURE="1"))
    assert vm_run.returncode == 3
    assert "k3scluster-install: FAILED host=rolf step=check-installed exit=3" in vm_run.stdout
    assert len(_log(env, "poweroff")) == 2 and sha256_of(dev) == before
    assert mounted_at(mnt) == ""
    assert not list(Path(env["TMPDIR"]).iterdir()), "the inspection mount was left behind"

    # Words that merely look like the switch do not count.
    near = _reinstall(env, tmp_path, "quiet k3scluster.reinstall=10 xk3scluster.reinstall=1")
    assert run(script("rolf"), **near).returncode == 3
    assert sha256_of(dev) == before

    # Asked on purpose: erased and installed again.
    again = run(
        script("rolf"), **_reinstall(env, tmp_path, "quiet k3scluster.reinstall=1 loglevel=4")
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "k3scluster.reinstall=1 on the kernel command line: replacing" in again.stdout
    assert blkid(dev + "p2")["UUID"] != uuid  # a new file system
    assert len(_log(env, "nixos-install")) == 2 and len(_log(env, "poweroff")) == 3


def test_any_file_system_with_etc_nixos_counts(script, loop_factory, byid, mnt, tmp_path, standins):
    """Evidence is what a NixOS root holds, whatever the partition's label."""
    dev = loop_factory(128)
    _labelled(dev, efi=False)
    subprocess.run(["e2label", dev + "p1", "data"], check=True)
    subprocess.run(["mount", dev + "p1", str(mnt)], check=True)
    (mnt / "etc").mkdir()
    (mnt / "etc" / "NIXOS").write_text("")
    unmount_under(mnt)
    (byid / "ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567").symlink_to(dev)
    before = sha256_of(dev)
    r = run(script("rolf"), **dict(standins, BYID_DIR=str(byid), MNT=str(mnt)))
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"{dev}p1 (ext4, label data): /etc/NIXOS" in r.stdout
    assert sha256_of(dev) == before
    assert _log(standins, "nixos-install") == [] and _log(standins, "poweroff") == []


def test_no_serial_refuses_an_installed_root(script, loop_factory, tmp_path, mnt, standins):
    dev = loop_factory(128)
    _labelled(dev, efi=False)
    subprocess.run(["mount", dev + "p1", str(mnt)], check=True)
    profiles = mnt / "nix" / "var" / "nix" / "profiles"
    profiles.mkdir(parents=True)
    (profiles / "system-4-link").symlink_to("/nix/store/abc-nixos-system-ulf-25.05")
    (profiles / "system").symlink_to("system-4-link")
    unmount_under(mnt)
    bylabel = tmp_path / "by-label"
    bylabel.mkdir()
    (bylabel / "nixos").symlink_to(dev + "p1")
    env = dict(standins, BYLABEL_DIR=str(bylabel), MNT=str(mnt), BOOT="bios")
    grub = tmp_path / "grubdisk"
    grub.symlink_to(dev)
    env["GRUB_DEVICES"] = str(grub)
    before = sha256_of(dev)
    r = run(script("ulf"), **env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "no disk serial in the plan" in r.stdout
    assert f"{dev}p1 already holds an installed NixOS" in r.stdout
    assert "/nix/var/nix/profiles/system -> system-4-link" in r.stdout
    assert sha256_of(dev) == before
    assert _log(env, "nixos-install") == []
    r = run(script("ulf"), **_reinstall(env, tmp_path, "k3scluster.reinstall=1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(_log(env, "nixos-install")) == 1 and _log(env, "poweroff") == ["poweroff "]


def test_grub_device_checked_before_the_disk_is_erased(
    script, loop_factory, byid, mnt, tmp_path, bystander, standins
):
    dev = loop_factory(64, fill=b"old data" * 1000)
    (byid / "ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567").symlink_to(dev)
    before = sha256_of(dev)
    env = dict(standins, BYID_DIR=str(byid), MNT=str(mnt))
    cases = {
        str(tmp_path / "missing"): "does not exist on this machine",
        bystander: "not the install disk",
        "": "GRUB_DEVICES is empty",
    }
    for grub, why in cases.items():
        r = run(script("rolf"), **dict(env, GRUB_DEVICES=grub))
        assert r.returncode == 1, r.stdout + r.stderr
        assert 'ERROR in step "check-installed"' in r.stdout and why in r.stdout, r.stdout
        assert sha256_of(dev) == before
    assert _log(env, "nixos-install") == []


def test_no_serial_grub_device_must_hold_the_root(
    script, loop_factory, tmp_path, mnt, bystander, standins
):
    """BIOS without a serial: GRUB's device is checked against the disk of the nixos partition."""
    dev = loop_factory(128)
    _labelled(dev, efi=False)
    bylabel = tmp_path / "by-label"
    bylabel.mkdir()
    (bylabel / "nixos").symlink_to(dev + "p1")
    env = dict(standins, BYLABEL_DIR=str(bylabel), MNT=str(mnt), BOOT="bios")
    before = sha256_of(dev)
    # boot.loader.grub.device names another disk (by a by-id style link): refused first
    other = tmp_path / "ata-Other_Disk_ZZZ999"
    other.symlink_to(bystander)
    r = run(script("ulf"), **dict(env, GRUB_DEVICES=str(other)))
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'ERROR in step "check-installed"' in r.stdout
    assert f"GRUB's device {other} is {bystander}, but the root file system {dev}p1" in r.stdout
    assert f"is on {dev} and GRUB must go to that disk" in r.stdout
    assert mounted_at(mnt) == "" and sha256_of(dev) == before
    assert _log(env, "nixos-install") == []
    # the disk holding the partition, through a link: installed
    grub = tmp_path / "grubdisk"
    grub.symlink_to(dev)
    r = run(script("ulf"), **dict(env, GRUB_DEVICES=f"{grub}"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"GRUB goes to {grub} -> {dev}" in r.stdout
    assert len(_log(env, "nixos-install")) == 1


def test_warns_when_a_bios_host_booted_the_stick_in_uefi_mode(
    script, loop_factory, byid, mnt, tmp_path, bystander
):
    dev = loop_factory(64)
    (byid / "ata-WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567").symlink_to(dev)
    efi = tmp_path / "sys-firmware-efi"
    efi.mkdir()
    warning = "WARNING: the plan says boot=bios but this machine booted the stick in UEFI mode"
    r = run(script("rolf"), BYID_DIR=str(byid), MNT=str(mnt), EFI_DIR=str(efi))
    assert r.returncode == 0, r.stdout + r.stderr  # a warning: it still installs
    assert warning in r.stdout and f"({efi} exists)" in r.stdout
    unmount_under(mnt)
    r = run(
        script("rolf"),
        BYID_DIR=str(byid),
        MNT=str(mnt),
        EFI_DIR=str(tmp_path / "none"),
        PROC_CMDLINE=str(tmp_path / "none"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout
    unmount_under(mnt)
    # the other way round stops: an EFI host whose stick booted in BIOS mode
    r = run(
        script("olaf"),
        BYID_DIR=str(byid),
        MNT=str(mnt),
        EFI_DIR=str(tmp_path / "none"),
        SKIP_INSTALL="0",
        SYSTEM=str(tmp_path),
    )
    assert r.returncode == 1 and "booted the stick in BIOS mode" in r.stdout
