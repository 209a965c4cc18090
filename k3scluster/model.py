"""The cluster as frozen, typed values.

Plans are parsed once (``k3scluster.plans``) into these classes; everything
downstream (validation, rendering, commands, Pulumi components) works on them
and never on raw CSV strings. Nothing here imports pulumi.

Secrets are represented by *where they are* (``SecretFile``: path and a digest),
never by their content: the content is read only where it must be (the ssh
public keys, which are not secret, are the one exception and are kept as text).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from k3scluster.pins import default_k3s_minor


class K3sType(enum.Enum):
    INIT_SERVER = "init-server"
    SERVER = "server"
    AGENT = "agent"

    @property
    def is_server(self) -> bool:
        return self is not K3sType.AGENT


class BootMode(enum.Enum):
    EFI = "efi"
    BIOS = "bios"


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file relative to the cluster dir and a 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Host:
    """A row of plans/hosts.csv."""

    name: str
    interface: str
    ip: ipaddress.IPv4Address
    admin: str
    disk: str | None = None  # serial of the install disk, lowercased
    boot: BootMode = BootMode.EFI
    platform: str = "x86_64-linux"  # nixpkgs.hostPlatform (hosts.csv platform)
    state_version: str | None = None  # hosts.csv stateVersion: overrides network.yaml's
    # every column of the row (required and extra), header -> value, as read
    columns: tuple[tuple[str, str], ...] = ()
    location: Location = Location("plans/hosts.csv", 0)

    @property
    def column_map(self) -> dict[str, str]:
        return dict(self.columns)


@dataclass(frozen=True)
class K3sNode:
    """A row of plans/k3s.csv: one K3s container on a host."""

    host: str
    name: str
    type: K3sType
    ip: ipaddress.IPv4Address
    columns: tuple[tuple[str, str], ...] = ()
    location: Location = Location("plans/k3s.csv", 0)

    @property
    def column_map(self) -> dict[str, str]:
        return dict(self.columns)

    @property
    def role(self) -> str:
        """``server`` or ``agent``: the slot this row takes on its host."""
        return "server" if self.type.is_server else "agent"


# The release of a plan without `nixos:` (plans made before `init` wrote one);
# `k3scluster init` writes the newest pinned release (k3scluster.pins) instead.
DEFAULT_NIXOS_RELEASE = "25.05"
DEFAULT_NAMESERVERS = (ipaddress.IPv4Address("8.8.8.8"),)
# system.stateVersion of a plan that records none: the release every such plan rendered
# before stateVersion was recorded (the default nixos then). Never change it: hosts
# installed from those plans keep it.
DEFAULT_STATE_VERSION = "25.05"
DEFAULT_PLATFORM = "x86_64-linux"
# nixpkgs.hostPlatform values a host may name (NixOS's Linux platforms with a binary cache)
PLATFORMS = ("x86_64-linux", "aarch64-linux")


@dataclass(frozen=True)
class Network:
    """plans/network.yaml."""

    gateway: ipaddress.IPv4Address
    network: ipaddress.IPv4Network  # the subnet all plan addresses live in
    nameservers: tuple[ipaddress.IPv4Address, ...] = DEFAULT_NAMESERVERS
    nixos_release: str = DEFAULT_NIXOS_RELEASE
    # network.yaml `k3s:` as the K3s minor release ("1.35"); None: the release's default
    k3s_minor: str | None = None
    location: Location = Location("plans/network.yaml", 0)
    # network.yaml `nixpkgs: {rev, sha256}`: pins nixpkgs to another commit than the
    # one k3scluster.render knows for nixos_release (both set, or neither)
    nixpkgs_rev: str | None = None
    nixpkgs_sha256: str | None = None
    # network.yaml stateVersion: the release the hosts were first installed with
    state_version: str | None = None

    @property
    def prefix_length(self) -> int:
        return self.network.prefixlen

    def state_version_of(self, host: Host) -> str:
        """system.stateVersion of ``host``: its own column, network.yaml's, or the default."""
        return host.state_version or self.state_version or DEFAULT_STATE_VERSION

    @property
    def k3s(self) -> str:
        """The K3s minor release every server and agent runs, e.g. ``1.35``."""
        return self.k3s_minor or default_k3s_minor(self.nixos_release)


@dataclass(frozen=True)
class SecretFile:
    """A secret on the deploying machine: its path and the sha256 of its content.

    The digest lets Pulumi see that a secret changed without ever holding it.
    """

    path: Path  # absolute
    relpath: str  # relative to the cluster directory, for messages
    sha256: str

    @classmethod
    def from_path(cls, root: Path, path: Path) -> SecretFile:
        data = path.read_bytes()
        return cls(
            path=path.resolve(),
            relpath=path.relative_to(root).as_posix(),
            sha256=hashlib.sha256(data).hexdigest(),
        )


@dataclass(frozen=True)
class SshKey:
    """An ssh public key file; ``host`` is None when it applies to every host."""

    relpath: str
    text: str  # the public key line(s), stripped
    host: str | None = None


@dataclass(frozen=True)
class Secrets:
    token: SecretFile | None
    passwd: SecretFile | None  # secrets/passwd: for every host
    host_passwd: tuple[tuple[str, SecretFile], ...] = ()  # secrets/<host>passwd
    ssh_keys: tuple[SshKey, ...] = ()
    # secrets/agent-token: what the agents join with (the servers get it too, as
    # --agent-token-file); agents never see secrets/token. None (a cluster made before
    # agent tokens): the agents join with secrets/token, as they did then
    agent_token: SecretFile | None = None

    def passwd_for(self, host: str) -> SecretFile | None:
        return dict(self.host_passwd).get(host, self.passwd)

    def keys_for(self, host: str) -> tuple[SshKey, ...]:
        return tuple(k for k in self.ssh_keys if k.host in (None, host))


@dataclass(frozen=True)
class Cluster:
    """A whole cluster directory, parsed and checked."""

    root: Path  # absolute path of the cluster directory
    hosts: tuple[Host, ...]
    k3s: tuple[K3sNode, ...]
    network: Network
    secrets: Secrets
    nix_configs: tuple[str, ...] = ()  # file names present in nixConfigs/
    manifests: tuple[str, ...] = ()  # file names present in manifests/, sorted
    host_columns: tuple[str, ...] = field(default=())  # header of hosts.csv, in order
    k3s_columns: tuple[str, ...] = field(default=())  # header of k3s.csv, in order

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def k3s_on(self, host: str) -> tuple[K3sNode, ...]:
        return self._k3s_by_host.get(host, ())

    @functools.cached_property
    def _k3s_by_host(self) -> dict[str, tuple[K3sNode, ...]]:
        """host -> its K3s nodes in plan order (computed once: asked for every host, often
        from loops over every host)."""
        by_host: dict[str, list[K3sNode]] = {}
        for n in self.k3s:
            by_host.setdefault(n.host, []).append(n)
        return {h: tuple(nodes) for h, nodes in by_host.items()}

    @functools.cached_property
    def servers(self) -> tuple[K3sNode, ...]:
        """The K3s servers, in plan order (computed once: asked once per host)."""
        return tuple(n for n in self.k3s if n.type.is_server)

    def server_on(self, host: str) -> K3sNode | None:
        return next((n for n in self.k3s_on(host) if n.type.is_server), None)

    def agent_on(self, host: str) -> K3sNode | None:
        return next((n for n in self.k3s_on(host) if n.type is K3sType.AGENT), None)

    @property
    def init_server(self) -> K3sNode | None:
        return next((n for n in self.k3s if n.type is K3sType.INIT_SERVER), None)

    @property
    def api_endpoint(self) -> str | None:
        init = self.init_server
        return f"https://{init.ip}:6443" if init else None

    def nix_config(self, name: str) -> str | None:
        """``nixConfigs/<name>.nix`` relative to the cluster dir, when present."""
        fname = f"{name}.nix"
        return f"nixConfigs/{fname}" if fname in self.nix_configs else None

    def hardware_config(self, host: str) -> str | None:
        fname = f"{host}.hardware.nix"
        return f"nixConfigs/{fname}" if fname in self.nix_configs else None
