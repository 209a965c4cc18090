"""Every NixOS option path the rendered files set, and where it was checked, per release.

tests/test_nixos_options.py walks the rendered hosts/*.nix (with the modules they import,
the K3s server container's configuration included) and installers/*/iso.nix, and fails on
any option path that is not in OPTIONS: before a template sets a new option, read its
declaration in every pinned release (k3scluster.pins.NIXPKGS_PINS) and add it here.

Pattern segments: `<name>` stands for any one attribute name (an attrsOf option's key),
a final `*` for anything below (freeform settings, sysctl keys, unit sections).

Sources read (NixOS/nixpkgs; this machine holds no nixpkgs, so the files were read through
the code index, at the commits named here, which are not the pinned commits themselves):
  K3S_OLD      nixos/modules/services/cluster/k3s/default.nix (24.11, 25.05)
  K3S_RANCHER  nixos/modules/services/cluster/rancher/default.nix (011c1bdb, the options
               every rancher module shares: enable, package, role, serverAddr, token,
               tokenFile, extraFlags, manifests.<n>.{enable,target,content,source}, …) and
               nixos/modules/services/cluster/rancher/k3s.nix (01bb496c: clusterInit,
               disableAgent, on top of the shared ones) for 25.11 and 26.05. The 25.11
               release notes (nixos/doc/manual/release-notes/rl-2511.section.md at
               19089905) say: "services.k3s now shares most of its code with
               services.rke2 … Existing configurations for either module should not be
               affected."
  OCI          nixos/modules/virtualisation/oci-containers.nix at 035a24e7 (a version from
               25.11 or later: it reads users.users.<n>.linger): image, cmd, environment,
               volumes, extraOptions and backend are declared there as before.
  GC           nixos/modules/services/misc/nix-gc.nix (043248ac: automatic, dates, options)
               and nix-optimise.nix (index ids 492126411 and 62235908350, an older and a
               newer version: automatic in both; dates became `either str (listOf str)`,
               k3scluster sets only automatic there).
  NETWORKD     nixos/modules/system/boot/networkd.nix: a .network's linkConfig is checked
               by sectionLink, whose fields include MACAddress in every version read.
  Every other option is declared by the same file in all four releases; the backward
  incompatibilities of rl-2511.section.md (19089905) and rl-2605.section.md (af44875a)
  rename or remove none of them (they touch boot.readOnlyNixStore, systemd.extraConfig,
  services.logind.extraConfig, networking.wireless.userControlled.*, services.resolved's
  extra options — `services.resolved.enable` stays — and boot.enableContainers, which
  now turns on only when `containers` is set, as it is here). The 24.11/25.05 reading is
  the one recorded in /work/shared/NIXOS-FACTS.md ("checked against 25.05").
"""

from __future__ import annotations

RELEASES = ("24.11", "25.05", "25.11", "26.05")

K3S_OLD = "nixos/modules/services/cluster/k3s/default.nix"
K3S_RANCHER = "nixos/modules/services/cluster/rancher/{default,k3s}.nix"


def _same(path: str) -> dict[str, str]:
    return {r: path for r in RELEASES}


def _k3s() -> dict[str, str]:
    return {"24.11": K3S_OLD, "25.05": K3S_OLD, "25.11": K3S_RANCHER, "26.05": K3S_RANCHER}


NETWORK = "nixos/modules/tasks/network-interfaces.nix"
CONTAINERS = "nixos/modules/virtualisation/nixos-containers.nix"
OCI = "nixos/modules/virtualisation/oci-containers.nix"
USERS = "nixos/modules/config/users-groups.nix"
SSHD = "nixos/modules/services/networking/ssh/sshd.nix"
SYSTEMD = "nixos/lib/systemd-unit-options.nix"
FIREWALL = "nixos/modules/services/networking/firewall.nix"
VM_LINKS = "nixos/modules/system/boot/networkd.nix"

# option path pattern -> release -> the nixpkgs file that declares it
OPTIONS: dict[str, dict[str, str]] = {
    # k3scluster's own options (templates/module-*.nix.j2 declare them)
    "k3scluster.*": _same("templates/module-*.nix.j2"),
    # boot
    "boot.kernel.sysctl.*": _same("nixos/modules/config/sysctl.nix"),
    "boot.kernelModules": _same("nixos/modules/system/boot/kernel.nix"),
    # VM stacks only (templates/host.nix.j2 with vm): kernel.nix declares kernelParams;
    # networkd.nix declares systemd.network.links (matchConfig/linkConfig: attrsOf unitOption)
    # and, outside its `mkIf config.systemd.network.enable`, turns them into
    # /etc/systemd/network/<name>.link for udev ("… honored by udev, no matter if
    # systemd-networkd is enabled or not"), read in the code index in a version with
    # commonConfig/mkUnit and systemd-networkd-persistent-storage (24.11 or later)
    "boot.kernelParams": _same("nixos/modules/system/boot/kernel.nix"),
    "systemd.network.links.<name>.matchConfig.*": _same(VM_LINKS),
    "systemd.network.links.<name>.linkConfig.*": _same(VM_LINKS),
    "boot.loader.efi.canTouchEfiVariables": _same("nixos/modules/system/boot/loader/efi.nix"),
    "boot.loader.grub.enable": _same("nixos/modules/system/boot/loader/grub/grub.nix"),
    "boot.loader.grub.device": _same("nixos/modules/system/boot/loader/grub/grub.nix"),
    "boot.loader.systemd-boot.enable": _same(
        "nixos/modules/system/boot/loader/systemd-boot/systemd-boot.nix"
    ),
    "boot.loader.systemd-boot.configurationLimit": _same(
        "nixos/modules/system/boot/loader/systemd-boot/systemd-boot.nix"
    ),
    "fileSystems.<name>.device": _same("nixos/modules/tasks/filesystems.nix"),
    "fileSystems.<name>.fsType": _same("nixos/modules/tasks/filesystems.nix"),
    "fileSystems.<name>.options": _same("nixos/modules/tasks/filesystems.nix"),
    "system.stateVersion": _same("nixos/modules/misc/version.nix"),
    "nix.gc.automatic": _same("nixos/modules/services/misc/nix-gc.nix"),
    "nix.gc.dates": _same("nixos/modules/services/misc/nix-gc.nix"),
    "nix.gc.options": _same("nixos/modules/services/misc/nix-gc.nix"),
    "nix.optimise.automatic": _same("nixos/modules/services/misc/nix-optimise.nix"),
    "nixpkgs.hostPlatform": _same("nixos/modules/misc/nixpkgs.nix"),
    # network
    "networking.hostName": _same(NETWORK),
    "networking.useDHCP": _same(NETWORK),
    "networking.nameservers": _same(NETWORK),
    "networking.defaultGateway.address": _same(NETWORK),
    "networking.defaultGateway.interface": _same(NETWORK),
    "networking.interfaces.<name>.ipv4.addresses": _same(NETWORK),
    "networking.interfaces.<name>.useDHCP": _same(NETWORK),
    "networking.interfaces.<name>.macAddress": _same(NETWORK),
    "networking.usePredictableInterfaceNames": _same(NETWORK),
    "networking.macvlans.<name>.interface": _same(NETWORK),
    "networking.macvlans.<name>.mode": _same(NETWORK),
    "networking.useNetworkd": _same(NETWORK),
    "networking.useHostResolvConf": _same(NETWORK),
    "networking.firewall.enable": _same(FIREWALL),
    "networking.firewall.allowedTCPPorts": _same(FIREWALL),
    "networking.firewall.allowedUDPPorts": _same(FIREWALL),
    "networking.wireless.enable": _same("nixos/modules/services/networking/wpa_supplicant.nix"),
    "networking.networkmanager.enable": _same(
        "nixos/modules/services/networking/networkmanager.nix"
    ),
    "services.udev.extraRules": _same("nixos/modules/services/hardware/udev.nix"),
    "services.resolved.enable": _same("nixos/modules/system/boot/resolved.nix"),
    "systemd.network.networks.<name>.address": _same("nixos/modules/system/boot/networkd.nix"),
    "systemd.network.networks.<name>.gateway": _same("nixos/modules/system/boot/networkd.nix"),
    "systemd.network.networks.<name>.dns": _same("nixos/modules/system/boot/networkd.nix"),
    "systemd.network.networks.<name>.matchConfig.*": _same(
        "nixos/modules/system/boot/networkd.nix"
    ),
    "systemd.network.networks.<name>.networkConfig.*": _same(
        "nixos/modules/system/boot/networkd.nix"
    ),
    "systemd.network.networks.<name>.linkConfig.*": _same(
        "nixos/modules/system/boot/networkd.nix"
    ),
    # users and ssh
    "users.mutableUsers": _same(USERS),
    # the K3s server container's etcdctl (pkgs.etcd: in every pinned release a symlinkJoin of
    # etcdserver, etcdutl and etcdctl, pkgs/servers/etcd/3_5 and 3_6 read at 095f8532 and
    # 3012daa4; `etcd = etcd_3_5` in all-packages.nix up to 2025-08, NixOS/nixpkgs#430436;
    # 25.11 builds it, #503305)
    "environment.systemPackages": _same("nixos/modules/config/system-path.nix"),
    # a file of /etc (the agent's server list; declared there in every release)
    "environment.etc.<name>.text": _same("nixos/modules/system/etc/etc.nix"),
    "users.users.<name>.isNormalUser": _same(USERS),
    "users.users.<name>.extraGroups": _same(USERS),
    "users.users.<name>.hashedPasswordFile": _same(USERS),
    "users.users.<name>.initialHashedPassword": _same(USERS),
    "users.users.<name>.openssh.authorizedKeys.keys": _same(SSHD),
    "services.openssh.enable": _same(SSHD),
    "services.openssh.settings.*": _same(SSHD),
    "security.sudo.wheelNeedsPassword": _same("nixos/modules/security/sudo.nix"),
    "services.getty.autologinUser": _same("nixos/modules/services/ttys/getty.nix"),
    "services.getty.helpLine": _same("nixos/modules/services/ttys/getty.nix"),
    # systemd units
    "systemd.tmpfiles.rules": _same("nixos/modules/system/boot/systemd/tmpfiles.nix"),
    "systemd.services.<name>.description": _same(SYSTEMD),
    "systemd.services.<name>.wantedBy": _same(SYSTEMD),
    "systemd.services.<name>.wants": _same(SYSTEMD),
    "systemd.services.<name>.after": _same(SYSTEMD),
    "systemd.services.<name>.before": _same(SYSTEMD),
    "systemd.services.<name>.requires": _same(SYSTEMD),
    "systemd.services.<name>.requiredBy": _same(SYSTEMD),
    "systemd.services.<name>.path": _same(SYSTEMD),
    "systemd.services.<name>.environment.*": _same(SYSTEMD),
    "systemd.services.<name>.script": _same(SYSTEMD),
    "systemd.services.<name>.preStart": _same(SYSTEMD),
    "systemd.services.<name>.serviceConfig.*": _same(SYSTEMD),
    "systemd.services.<name>.unitConfig.*": _same(SYSTEMD),
    # the K3s server container
    "containers.<name>.autoStart": _same(CONTAINERS),
    "containers.<name>.privateNetwork": _same(CONTAINERS),
    "containers.<name>.macvlans": _same(CONTAINERS),
    "containers.<name>.bindMounts.<name>.hostPath": _same(CONTAINERS),
    "containers.<name>.bindMounts.<name>.isReadOnly": _same(CONTAINERS),
    "containers.<name>.timeoutStartSec": _same(CONTAINERS),
    "containers.<name>.config": _same(CONTAINERS),
    "services.k3s.enable": _k3s(),
    "services.k3s.role": _k3s(),
    "services.k3s.package": _k3s(),
    "services.k3s.tokenFile": _k3s(),
    "services.k3s.serverAddr": _k3s(),
    "services.k3s.clusterInit": _k3s(),
    "services.k3s.disableAgent": _k3s(),
    "services.k3s.environmentFile": _k3s(),
    # `either str (listOf str)`, flattened into ExecStart, in all four: k3s/default.nix read
    # at index ids 321306170 (24.11: ExecStartPre activateK3sContent) and 149520763 (25.05:
    # autoDeployCharts), rancher/default.nix at 011c1bdb (25.11, 26.05)
    "services.k3s.extraFlags": _k3s(),
    "services.k3s.manifests.<name>.source": _k3s(),
    "services.k3s.manifests.<name>.target": _k3s(),
    # the K3s agent
    "virtualisation.oci-containers.backend": _same(OCI),
    "virtualisation.oci-containers.containers.<name>.image": _same(OCI),
    "virtualisation.oci-containers.containers.<name>.cmd": _same(OCI),
    "virtualisation.oci-containers.containers.<name>.environment.*": _same(OCI),
    "virtualisation.oci-containers.containers.<name>.volumes": _same(OCI),
    "virtualisation.oci-containers.containers.<name>.extraOptions": _same(OCI),
    # the installer image
    "isoImage.storeContents": _same("nixos/modules/installer/cd-dvd/iso-image.nix"),
}


# NixOS module files the rendered hosts import by ``modulesPath + "/<file>"`` -> release -> the
# nixpkgs file (nixos/modules/<file>). qemu-guest.nix, read in the code index at 07320dad,
# sets only boot.initrd.availableKernelModules (virtio_net, virtio_pci, virtio_mmio,
# virtio_blk, virtio_scsi, 9p, 9pnet_virtio) and boot.initrd.kernelModules (virtio_balloon,
# virtio_console, virtio_rng, virtio_gpu): a VM stack's initrd finds its virtio disk whatever
# the VM's hardware file says. all-hardware.nix and not-detected.nix: a host without its
# hardware file yet. All three have been at these paths since long before 24.11.
MODULE_FILES: dict[str, dict[str, str]] = {
    f: _same(f"nixos/modules/{f}")
    for f in (
        "profiles/qemu-guest.nix",
        "profiles/all-hardware.nix",
        "installer/scan/not-detected.nix",
    )
}


def matches(pattern: str, path: tuple[str, ...]) -> bool:
    """Does the option path (attribute names) fall under the pattern?"""
    want = pattern.split(".")
    if want[-1] == "*":
        head = want[:-1]
        return len(path) > len(head) and all(
            w in ("<name>", p) for w, p in zip(head, path, strict=False)
        )
    return len(want) == len(path) and all(
        w in ("<name>", p) for w, p in zip(want, path, strict=True)
    )


def known(path: tuple[str, ...]) -> str | None:
    """The pattern of OPTIONS that covers ``path``, or None."""
    return next((p for p in OPTIONS if matches(p, path)), None)
