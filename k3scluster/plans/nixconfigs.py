"""nixConfigs/: a host's or K3s server's own NixOS module, and what a BIOS host must set there."""

from __future__ import annotations

import re

from k3scluster.model import BootMode, Host
from k3scluster.plans.files import Files

_GRUB_DEVICE = re.compile(r"grub[\s\S]*?\b(devices?|mirroredBoots)\b")


class NixConfigsReader(Files):
    def read_nix_configs(self) -> tuple[str, ...]:
        hosts = self.host_rows
        names = hosts | self.k3s_rows
        complete = self.hosts_complete and self.k3s_complete
        found = []
        for path in self.list_dir("nixConfigs"):
            if not path.name.endswith(".nix") or path.is_dir():
                continue
            found.append(path.name)
            stem = path.name[: -len(".nix")]
            if stem.endswith(".hardware") and stem[: -len(".hardware")] in hosts:
                continue
            if stem in names or not complete:
                continue
            self.warn(
                "nixconfig-unknown",
                f"nixConfigs/{path.name}",
                0,
                "named after no host or K3s node: it is not used",
                "name it <host>.nix, <k3s-name>.nix or <host>.hardware.nix; keep shared "
                "modules in a subdirectory (nixConfigs/common/…) and import them",
            )
        return tuple(found)

    def check_bios_boot_disk(self, hosts: list[Host], nix_configs: tuple[str, ...]) -> None:
        """GRUB on BIOS needs the disk for its boot code (grub.nix asserts it).

        A disk serial in the plan names it (the udev rule of k3scluster.bootdisk, GRUB's
        default device); without one, the host's nixConfigs must set it.
        """
        for host in hosts:
            if host.boot is not BootMode.BIOS or host.disk:
                continue
            texts = []
            for fname in (f"{host.name}.nix", f"{host.name}.hardware.nix"):
                if fname in nix_configs:
                    try:
                        texts.append((self.root / "nixConfigs" / fname).read_text(errors="replace"))
                    except OSError:
                        pass  # reported by the render step if it matters
            if any(_GRUB_DEVICE.search(t) for t in texts):
                continue
            self.error(
                "bios-grub-device",
                host.location.file,
                host.location.line,
                f"host {host.name} boots by BIOS, but it has no disk serial and "
                f"nixConfigs/{host.name}.nix does not set boot.loader.grub.device: GRUB has "
                "no disk and NixOS will not build it",
                "put the disk's serial in the disk column (`lsblk -do NAME,SERIAL,MODEL` on "
                "the machine): GRUB then goes to that disk; or add boot.loader.grub.device = "
                f'"/dev/disk/by-id/…"; to nixConfigs/{host.name}.nix',
            )
