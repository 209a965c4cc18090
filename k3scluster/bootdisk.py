"""The udev rule that names a host's install disk ``/dev/k3scluster-bootdisk`` from its serial.

GRUB on a BIOS host needs the disk it writes its boot code to (``boot.loader.grub.device``;
nixpkgs' grub.nix asserts it is set). The plan names that disk only by its serial
(plans/hosts.csv ``disk``), so the installed system and the host's installer image both get
the same rule, and GRUB's device defaults to the link. nixpkgs' install-grub.pl resolves the
device with ``Cwd::abs_path`` before it runs grub-install, so a symlink is enough.

Which udev property holds the serial depends on the bus (systemd's 60-persistent-storage.rules):

- ATA (``ata_id``), SCSI (``scsi_id``), USB (``usb_id``) and NVMe (``ATTRS{serial}``) disks:
  ``ID_SERIAL_SHORT``; SCSI disks may also carry ``ID_SCSI_SERIAL``, and a disk in a USB
  enclosure the bridge's serial in ``ID_USB_SERIAL_SHORT``;
- virtio-blk (and MMC): only ``ID_SERIAL`` (``$attr{serial}``).

``lsblk -o SERIAL`` shows the first of ``ID_SCSI_SERIAL``, ``ID_SERIAL_SHORT``, ``ID_SERIAL``,
so any serial a user copies from lsblk or from a ``/dev/disk/by-id`` name is one of these.
Plan values are lowercased while real serials are mostly upper case, and udev compares with
case-sensitive globs: every letter becomes ``[xX]``. Partitions inherit their disk's ``ID_*``
properties (``IMPORT{parent}``), so the rule matches only ``DEVTYPE=="disk"``.

Nothing here imports pulumi.
"""

from __future__ import annotations

import re

from .model import BootMode, Host

#: the link the rule makes, and GRUB's default device on a BIOS host with a serial
BOOTDISK_LINK = "/dev/k3scluster-bootdisk"

#: udev properties that may hold a disk's serial (see the module docstring)
SERIAL_PROPERTIES = ("ID_SERIAL_SHORT", "ID_SCSI_SERIAL", "ID_USB_SERIAL_SHORT", "ID_SERIAL")

# what plans.py lets through as a serial; none of it is special in a udev glob or value
_SAFE = re.compile(r"^[a-z0-9#+\-.:=@_]+$")


def nocase_glob(serial: str) -> str:
    """A udev glob that matches ``serial`` whatever the case of its letters."""
    if not _SAFE.match(serial.lower()):
        raise ValueError(f"not a serial a udev rule can match: {serial!r}")
    return "".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in serial.lower())


def udev_rules(serial: str) -> str:
    """The rules file text (udev syntax) that links the whole disk with ``serial``."""
    glob = nocase_glob(serial)
    link = BOOTDISK_LINK.removeprefix("/dev/")
    lines = [
        f"# k3scluster: {BOOTDISK_LINK} is the disk with serial {serial.lower()}",
        "# (plans/hosts.csv disk), compared case-insensitively; whole disks only.",
        'ACTION=="remove", GOTO="k3scluster_bootdisk_end"',
        'SUBSYSTEM!="block", GOTO="k3scluster_bootdisk_end"',
        'ENV{DEVTYPE}!="disk", GOTO="k3scluster_bootdisk_end"',
        *(f'ENV{{{p}}}=="{glob}", SYMLINK+="{link}"' for p in SERIAL_PROPERTIES),
        'LABEL="k3scluster_bootdisk_end"',
    ]
    return "\n".join(lines) + "\n"


def boot_disk_rules(host: Host) -> list[str]:
    """The rule's lines for ``host``: a BIOS host with a disk serial; none for the others.

    EFI hosts need no GRUB device; a host without a serial gets its GRUB device from its
    nixConfigs (``check`` insists on it).
    """
    if host.boot is not BootMode.BIOS or not host.disk:
        return []
    return udev_rules(host.disk).splitlines()
