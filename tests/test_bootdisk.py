"""GRUB's disk by its serial: the udev rule, where it is rendered, and real udev matching it.

The matching tests run systemd's own rule engine (``udevadm test``, Debian's udev) on a real
loop device in a private mount namespace: the rules directories, /run and /dev are private
tmpfs there, so nothing reaches the machine's udev state or /dev. No udevd is running here
and loop devices have no serial: a first rules file gives the disk the property that
systemd's 60-persistent-storage.rules sets for each bus (ata_id, scsi_id, usb_id, nvme and
virtio ``$attr{serial}``) and copies it to the partitions as that file does
(``IMPORT{parent}``). That stand-in is the only part that is not real; the rule under test
is the text NixOS gets, taken from the rendered files with nix-instantiate.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import loopdevices
import pytest

from k3scluster import plans
from k3scluster.bootdisk import BOOTDISK_LINK, nocase_glob, udev_rules
from k3scluster.installer import render_installer
from k3scluster.render import render_to_dir

loop_factory = loopdevices.loop_factory  # the fixture


def test_glob_matches_either_case_of_each_letter():
    assert nocase_glob("wd-wcc4n1234567") == "[wW][dD]-[wW][cC][cC]4[nN]1234567"
    assert nocase_glob("S4EVNX0R") == "[sS]4[eE][vV][nN][xX]0[rR]"
    assert nocase_glob("0123_:.#+=@-") == "0123_:.#+=@-"
    for bad in ("a*b", "a b", 'a"b', "a|b", "a[b]", ""):
        with pytest.raises(ValueError):
            nocase_glob(bad)


def test_rule_text():
    text = udev_rules("wd-wcc4n1234567")
    lines = [x for x in text.splitlines() if not x.startswith("#")]
    assert lines[:3] == [
        'ACTION=="remove", GOTO="k3scluster_bootdisk_end"',
        'SUBSYSTEM!="block", GOTO="k3scluster_bootdisk_end"',
        'ENV{DEVTYPE}!="disk", GOTO="k3scluster_bootdisk_end"',
    ]
    glob = "[wW][dD]-[wW][cC][cC]4[nN]1234567"
    for prop in ("ID_SERIAL_SHORT", "ID_SCSI_SERIAL", "ID_USB_SERIAL_SHORT", "ID_SERIAL"):
        assert f'ENV{{{prop}}}=="{glob}", SYMLINK+="k3scluster-bootdisk"' in lines
    assert lines[-1] == 'LABEL="k3scluster_bootdisk_end"'
    assert text.endswith("\n")


# -- what the renderer writes ------------------------------------------------------------

# The smallest lib the base module's options and the lines under test need: each merge
# function leaves a mark, so the test sees mkIf/mkDefault exactly where the module put them.
STUB_LIB = """
  lib = {
    mkOption = o: o;
    types = { str = "str"; listOf = t: t; nullOr = t: t; enum = e: e;
              ints.between = a: b: "int"; attrsOf = t: t; };
    mkIf = cond: value: { _if = cond; inherit value; };
    mkDefault = value: { _default = value; };
    mkForce = value: { _force = value; };
    optionalAttrs = cond: a: if cond then a else { };
    concatStringsSep = builtins.concatStringsSep;
  };
"""


def _eval(expr: str, cwd: Path) -> object:
    proc = subprocess.run(
        ["nix-instantiate", "--readonly-mode", "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _base_for(out: Path, host: str) -> dict:
    """modules/base.nix evaluated with the values hosts/<host>.nix gives it."""
    expr = f"""
      let
        {STUB_LIB}
        hostFile = import ./hosts/{host}.nix {{ modulesPath = "/stub/nixos/modules"; }};
        base = import ./modules/base.nix {{ inherit lib; config.k3scluster.host =
          {{ bootDiskRules = [ ]; }} // hostFile.k3scluster.host; }};
      in {{
        udev = base.config.services.udev.extraRules;
        grub = base.config.boot.loader.grub.device;
        grubEnable = base.config.boot.loader.grub.enable;
      }}
    """
    result = _eval(expr, out)
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, object]:
    root = Path(__file__).resolve().parent.parent / "examples" / "cluster"
    cluster = plans.load(root).cluster
    assert cluster is not None
    out = tmp_path_factory.mktemp("render")
    render_to_dir(cluster, out)
    return out, cluster


def test_bios_host_with_serial_gets_the_rule_and_grub_device(rendered):
    out, _ = rendered
    v = _base_for(out, "rolf")
    assert v["udev"] == {"_if": True, "value": udev_rules("wd-wcc4n1234567")}
    # a default: boot.loader.grub.device in nixConfigs/<host>.nix wins
    assert v["grub"] == {"_if": True, "value": {"_default": BOOTDISK_LINK}}
    assert v["grubEnable"] == {"_default": True}


@pytest.mark.parametrize("host", ["olaf", "ulf"])
def test_efi_hosts_get_neither(rendered, host):
    out, _ = rendered
    v = _base_for(out, host)
    assert v["udev"]["_if"] is False and v["grub"]["_if"] is False


def test_iso_gets_the_same_rule_and_checks_grub(rendered, tmp_path):
    out, cluster = rendered
    files = render_installer(cluster, "rolf", out)
    base = tmp_path / "installers" / "rolf"
    base.mkdir(parents=True)
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    expr = """
      let
        names = [ "bash" "coreutils" "util-linux" "parted" "dosfstools" "e2fsprogs" "gnugrep"
                  "gnused" "gawk" "findutils" ];
        pkgs = builtins.listToAttrs (map (n: { name = n; value = "/nix/store/p-${n}"; }) names);
        lib = { mkForce = v: v; mkIf = c: v: if c then v else null;
                concatStringsSep = builtins.concatStringsSep; };
        m = import ./iso.nix {
          inherit pkgs lib;
          config = { systemd.package = "/nix/store/p-systemd"; nix.package = "/nix/store/p-nix";
                     system.build.nixos-install = "/nix/store/p-nixos-install"; };
          k3sclusterTarget = "/nix/store/abc-nixos-system-rolf";
          k3sclusterGrubDevices = [ "/dev/k3scluster-bootdisk" ];
        };
      in { udev = m.services.udev.extraRules;
           env = m.systemd.services.system_setup.environment; }
    """
    v = _eval(expr, base)
    assert isinstance(v, dict)
    assert v["udev"] == udev_rules("wd-wcc4n1234567")
    assert v["env"]["GRUB_DEVICES"] == BOOTDISK_LINK
    # and the installed system has exactly this rule
    assert _base_for(out, "rolf")["udev"]["value"] == v["udev"]


# -- real udev ---------------------------------------------------------------------------

# Properties 60-persistent-storage.rules (systemd) gives a whole disk, per bus.
BUSES = {
    "ata": {
        "ID_BUS": "ata",
        "ID_SERIAL": "WDC_WD10EZEX-08WN4A0_WD-WCC4N1234567",
        "ID_SERIAL_SHORT": "WD-WCC4N1234567",
    },
    "scsi": {
        "ID_BUS": "scsi",
        "ID_SERIAL": "35000c500a1b2c3d4",
        "ID_SCSI_SERIAL": "WD-WCC4N1234567",
        "ID_SERIAL_SHORT": "5000c500a1b2c3d4",
    },
    "usb": {
        "ID_BUS": "usb",
        "ID_SERIAL": "JMicron_Generic_0123456789ABCDEF-0:0",
        "ID_SERIAL_SHORT": "0123456789ABCDEF",
        "ID_USB_SERIAL_SHORT": "WD-WCC4N1234567",
    },
    "nvme": {
        "ID_MODEL": "WDC WDS100T2B0C",
        "ID_SERIAL_SHORT": "WD-WCC4N1234567",
        "ID_SERIAL": "WDC WDS100T2B0C_WD-WCC4N1234567",
    },
    "virtio": {"ID_SERIAL": "WD-WCC4N1234567"},
}


def _need_udevadm() -> None:
    loopdevices.need_root()
    for tool in ("udevadm", "unshare", "mknod"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (Debian: udev, util-linux, coreutils)")


def _udev_links(dev: str, fake: str, rules: str, tmp: Path) -> str:
    """DEVLINKS udev computes for ``dev`` with the two rules files and nothing else."""
    name = os.path.basename(dev)
    major_minor = Path(f"/sys/class/block/{name}/dev").read_text().strip()
    major, minor = major_minor.split(":")
    (tmp / "10-fake-bus.rules").write_text(fake)
    (tmp / "99-local.rules").write_text(rules)  # the file NixOS writes extraRules to
    q = shlex.quote
    script = " && ".join(
        [
            "mount -t tmpfs none /usr/lib/udev/rules.d",
            "mount -t tmpfs none /etc/udev/rules.d",
            "mount -t tmpfs none /run",
            "mount -t tmpfs none /dev",
            f"mknod /dev/{name} b {major} {minor}",
            f"cp {q(str(tmp / '10-fake-bus.rules'))} {q(str(tmp / '99-local.rules'))} /usr/lib/udev/rules.d/",
            f"udevadm test --action=add /sys/class/block/{name}",
        ]
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the rules were read, or the test proves nothing
    assert "99-local.rules" in proc.stdout + proc.stderr
    m = re.search(r"^DEVLINKS=(.*)$", proc.stdout, re.MULTILINE)
    return m.group(1) if m else ""


def _fake(name: str, props: dict[str, str], devtype_disk: bool = True) -> str:
    sets = ", ".join(f'ENV{{{k}}}="{v}"' for k, v in props.items())
    return f'SUBSYSTEM=="block", KERNEL=="{name}", {sets}\n' + (
        'ENV{DEVTYPE}=="partition", IMPORT{parent}="ID_*"\n'
    )


@pytest.mark.root
@pytest.mark.parametrize("bus", sorted(BUSES))
def test_udev_links_the_disk_of_each_bus(loop_factory, tmp_path, bus):
    _need_udevadm()
    dev = loop_factory(16)
    name = os.path.basename(dev)
    rules = udev_rules("wd-wcc4n1234567")  # lowercased, as the plan has it
    links = _udev_links(dev, _fake(name, BUSES[bus]), rules, tmp_path)
    assert BOOTDISK_LINK in links.split()


@pytest.mark.root
def test_udev_ignores_partitions_and_other_serials(loop_factory, tmp_path):
    _need_udevadm()
    dev = loop_factory(32)
    subprocess.run(
        ["parted", "-s", dev, "--", "mklabel", "msdos", "mkpart", "primary", "1MiB", "100%"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["partprobe", dev], check=False, capture_output=True)
    name = os.path.basename(dev)
    rules = udev_rules("wd-wcc4n1234567")
    # the partition carries its disk's serial (IMPORT{parent}) but is not the disk
    part = dev + "p1"
    assert Path(part).exists() or Path(f"/sys/class/block/{name}p1").exists()
    fake = _fake(name, BUSES["ata"]) + (
        f'SUBSYSTEM=="block", KERNEL=="{name}p1", ENV{{ID_SERIAL_SHORT}}="WD-WCC4N1234567"\n'
    )
    assert BOOTDISK_LINK not in _udev_links(part, fake, rules, tmp_path).split()
    assert BOOTDISK_LINK in _udev_links(dev, fake, rules, tmp_path).split()  # the disk is
    # a serial that only contains the planned one, or differs in one character
    for other in ("XWD-WCC4N1234567", "WD-WCC4N12345678", "WD-WCC4N1234568"):
        fake = _fake(name, {"ID_SERIAL_SHORT": other, "ID_SERIAL": other})
        assert BOOTDISK_LINK not in _udev_links(dev, fake, rules, tmp_path).split(), other
