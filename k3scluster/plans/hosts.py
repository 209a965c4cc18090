"""hosts.csv: one row per machine (name, interface, ip, admin, and optional disk and boot)."""

from __future__ import annotations

import re

from k3scluster.model import DEFAULT_PLATFORM, PLATFORMS, BootMode, Host, Location
from k3scluster.plans.files import HOSTS_CSV
from k3scluster.plans.names import Names
from k3scluster.plans.nixos import STATE_VERSION, check_state_version
from k3scluster.plans.table import Tables

HOST_REQUIRED = ("name", "interface", "ip", "admin")
# headers are lowercased: the stateVersion column is read as stateversion
HOST_OPTIONAL = ("disk", "boot", "platform", "stateversion")
# hosts.csv columns that cannot be used: the NixOS config gets them from elsewhere
HOST_RESERVED = {"k3s": "config.cluster.<host>.k3s holds the host's K3s rows"}

_IFACE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SERIAL = re.compile(r"^[a-z0-9#+\-.:=@_]+$")
# the only platform with BIOS boot: GRUB's i386-pc target (boot.loader.grub.device)
BIOS_PLATFORM = "x86_64-linux"
_RESERVED_USERS = frozenset({"root", "nobody", "daemon", "sshd", "nixbld"})


class HostsReader(Tables, Names):
    def read_hosts(self) -> tuple[list[Host], tuple[str, ...]]:
        rel = HOSTS_CSV
        text = self.read_text(rel, required=True)
        if text is None:
            return [], ()
        table = self.read_table(rel, text, HOST_REQUIRED, HOST_RESERVED)
        if table is None:
            return [], ()
        self.hosts_complete = True
        self.host_rows.update(table.names)
        if not table.header_line:
            self.error(
                "no-hosts",
                rel,
                1,
                "no header and no hosts",
                f"write the header {','.join(HOST_REQUIRED)} and one row per host",
            )
            return [], ()
        if not table.rows:
            self.error(
                "no-hosts",
                rel,
                table.header_line,
                "no hosts",
                "add one row per machine: name,interface,ip,admin",
            )
        hosts = []
        for line, v, columns in table.rows:
            host = self._host_row(rel, line, v, columns)
            if host is not None:
                hosts.append(host)
        return hosts, table.header

    def _host_row(
        self, rel: str, line: int, v: dict[str, str], columns: tuple[tuple[str, str], ...]
    ) -> Host | None:
        """The host of one row; None when any of its checks fails (reported)."""
        ok = self.check_name("host-name", rel, line, "host", v["name"])
        iface = v["interface"]
        if len(iface) > 15 or not _IFACE.match(iface):
            ok = False
            why = "is longer than 15 characters" if len(iface) > 15 else "has invalid characters"
            self.error(
                "interface-name",
                rel,
                line,
                f"interface {iface!r} {why}",
                "use the name `ip link` shows on the host (at most 15 characters, "
                "letters, digits, '-', '_', '.')",
            )
        ip = self.check_ip(rel, line, f"host {v['name']}", v["ip"])
        admin = v["admin"]
        if not _USER.match(admin) or admin in _RESERVED_USERS:
            ok = False
            self.error(
                "admin-name",
                rel,
                line,
                f"admin {admin!r} is not usable as the admin user name",
                "use a Linux user name (a-z, 0-9, '_', '-', starting with a letter, at "
                "most 32) other than root or a system user",
            )
        disk = v.get("disk") or None
        if disk is not None and not _SERIAL.match(disk):
            ok = False
            self.error(
                "disk-serial",
                rel,
                line,
                f"disk serial {disk!r} has characters a /dev/disk/by-id name cannot hold",
                "copy the serial from `lsblk -dno NAME,SERIAL` on the machine "
                "(letters, digits and - _ . : # + = @), or leave disk empty",
            )
        boot = v.get("boot") or "efi"
        if boot not in {b.value for b in BootMode}:
            ok = False
            self.error(
                "boot-mode",
                rel,
                line,
                f"unknown boot mode {boot!r}",
                "write efi or bios (empty means efi)",
            )
        if re.fullmatch(r"eth[0-9]+", iface):
            self.warn(
                "interface-eth",
                rel,
                line,
                f"interface {iface!r} is a kernel name: NixOS renames NICs (enp1s0, eno1, …) "
                "unless predictable names are off, which k3scluster then turns off for this host",
                "write the name `ip link` shows on the installed host; keep eth<N> only if you "
                "want kernel names (with several NICs their numbers follow the probe order)",
            )
        platform = v.get("platform") or DEFAULT_PLATFORM
        if platform not in PLATFORMS:
            ok = False
            self.error(
                "platform",
                rel,
                line,
                f"unknown platform {platform!r}",
                f"write one of {', '.join(PLATFORMS)} (empty means {DEFAULT_PLATFORM})",
            )
        if boot == BootMode.BIOS.value and platform in PLATFORMS and platform != BIOS_PLATFORM:
            ok = False
            self.error(
                "boot-platform",
                rel,
                line,
                f"boot=bios on platform {platform!r}: BIOS boot (GRUB i386-pc) exists only "
                f"on {BIOS_PLATFORM}",
                f"write boot efi (or leave it empty) for a {platform} host, or correct the "
                "platform",
            )
        state_version = v.get(STATE_VERSION) or None
        if state_version is not None and not check_state_version(
            self, rel, line, state_version, "the stateVersion column"
        ):
            ok = False
        if not ok or ip is None:
            return None
        # an empty boot or platform means its default: the columns (cluster.json's
        # config.cluster.<host>.<column>, cluster.md) say what the host gets, not ""
        effective = {"boot": boot, "platform": platform}
        columns = tuple((k, effective.get(k) or val) for k, val in columns)
        return Host(
            name=v["name"],
            interface=iface,
            ip=ip,
            admin=admin,
            disk=disk,
            boot=BootMode(boot),
            platform=platform,
            state_version=state_version,
            columns=columns,
            location=Location(rel, line),
        )
