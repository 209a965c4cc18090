"""A VM stack's settings, one spec per VM, and the names of everything the lab makes.

A lab's identity is its *owner*: ``<stack>@<lab id>``, the lab id a short random hex
string made once, when the stack's lab is first made, and kept in the stack's state (the
network step records it; ``components/vm.py``). Two labs on one machine whose stacks have
the same name (two cluster directories, two Pulumi projects or backends) thus have other
names for everything they share with the machine:

- bridge ``k3b-<stack, 6>-<4 hex>`` and tap ``k3t-<host, 6>-<4 hex>`` (at most 15 characters,
  the kernel's limit), the hex part a hash of the owner (and host);
- the ``ip link`` alias on each (``k3scluster:<owner>[:<host>]``): a lab adopts or deletes
  only links with its own alias, and refuses, naming the owner, another lab's;
- QEMU's ``-name`` of each VM and the NAT's nftables table.

A lab made before lab ids existed has none (its owner is the stack's name alone) and keeps
the names it has. Files live under ``<renderDir>-lab/<host>/`` (the render directory is
replaced whole on every render, so the lab lives beside it); a spec records that directory
relative to the project (``Settings.rec``), so the state does not depend on where the
checkout or the cluster directory lives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k3scluster.errors import K3sClusterError
from k3scluster.macs import vm_mac
from k3scluster.model import Cluster, Host
from k3scluster.render import VmRender
from k3scluster.stackpaths import resolve

ACCELS = ("kvm", "tcg", "auto")
# a K3s server wants 2 CPUs and 2 GiB at least; the VM also runs the host's NixOS and the
# agent's podman container
DEFAULT_MEMORY_MIB = 4096
DEFAULT_CPUS = 2
DEFAULT_DISK_GIB = 32
VIRTIO_SERIAL_MAX = 20  # bytes virtio-blk keeps of a disk serial
IFNAMSIZ = 15
# per-host columns of hosts.csv that override the stack settings (VM stacks only)
HOST_COLUMNS = ("vmMemory", "vmCpus", "vmDiskSize")
MARKER = "k3scluster-vm.json"  # the manifest a VM's directory is proven by
UNIX_PATH_MAX = 107


def _hex(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _slug(text: str, n: int) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())[:n] or "x"


LAB_ID_HEX = 8  # hex digits of a new lab id
LAB_ID_INPUT = "lab"  # the network step's recorded input that keeps the lab id in the state


def new_lab_id() -> str:
    """A lab id for a stack whose lab is made now (random: nothing of the stack's name or
    of a path can tell two labs apart)."""
    return secrets.token_hex(LAB_ID_HEX // 2)


def lab_owner(stack: str, lab_id: str = "") -> str:
    """``<stack>@<lab id>``; the stack's name alone for a lab made before lab ids (``''``)."""
    return f"{stack}@{lab_id}" if lab_id else stack


def bridge_name(stack: str, lab_id: str = "") -> str:
    """The lab's bridge: ``k3b-<stack, 6>-<4 hex of the owner>`` (<= 15 characters)."""
    return f"k3b-{_slug(stack, 6)}-{_hex('bridge', lab_owner(stack, lab_id))[:4]}"


def tap_name(stack: str, host: str, lab_id: str = "") -> str:
    """The host's tap: ``k3t-<host, 6>-<4 hex of owner and host>`` (<= 15 characters)."""
    return f"k3t-{_slug(host, 6)}-{_hex('tap', lab_owner(stack, lab_id), host)[:4]}"


def link_alias(stack: str, host: str | None = None, lab_id: str = "") -> str:
    """The ``ip link`` alias the lab puts on its bridge and taps: only links with it are
    ever adopted or deleted."""
    return f"k3scluster:{lab_owner(stack, lab_id)}" + (f":{host}" if host else "")


def guest_name(stack: str, host: str, lab_id: str = "") -> str:
    """QEMU's ``-name``: also how a process is proven to be this VM before it is stopped."""
    return (
        f"k3scluster-{_slug(stack, 40)}-{_hex('vm', lab_owner(stack, lab_id), host)[:8]}-{host}"
    )


def lab_dir(render_dir: Path) -> Path:
    """``<cluster>/.k3scluster/<stack>`` -> ``<cluster>/.k3scluster/<stack>-lab``."""
    render_dir = Path(render_dir)
    return render_dir.parent / f"{render_dir.name}-lab"


@dataclass(frozen=True)
class VmSettings:
    """The stack's ``k3scluster:vm*`` settings (only built when ``k3scluster:vms`` is true)."""

    stack: str
    lab_dir: Path
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = DEFAULT_CPUS
    disk_gib: int = DEFAULT_DISK_GIB
    accel: str = "auto"
    nat: bool = False
    qemu: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"
    install_timeout: int = 3600  # seconds for an installer to finish and power off
    boot_timeout: int = 600  # seconds for an installed VM to answer at its IP
    lab_id: str = ""  # kept in the stack's state ('': a lab made before lab ids)
    # the state's machine steps: step name -> its recorded triggers (``machine_triggers``)
    recorded_triggers: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.accel not in ACCELS:
            raise K3sClusterError(
                f"k3scluster:vmAccel is {self.accel!r}; it must be one of {', '.join(ACCELS)}",
                hint="pulumi config set k3scluster:vmAccel auto",
            )
        for key, value, least in (
            ("vmMemory", self.memory_mib, 256),
            ("vmCpus", self.cpus, 1),
            ("vmDiskSize", self.disk_gib, 1),
        ):
            if value < least:
                raise K3sClusterError(
                    f"k3scluster:{key} is {value}; it must be at least {least}",
                    hint=f"pulumi config rm k3scluster:{key} (the default fits a K3s server)",
                )


@dataclass(frozen=True)
class NetSpec:
    """The lab network: one bridge carrying the plan's gateway."""

    stack: str
    bridge: str
    gateway: str  # "10.0.100.1/24"
    subnet: str  # "10.0.100.0/24"
    nat: bool
    location: str  # plans/network.yaml:N, for messages
    lab_dir: str = ""  # where net-up records what it found (network.json), as steps record it
    lab_id: str = ""  # '': a lab made before lab ids (its names from the stack alone)

    @property
    def lab_path(self) -> Path | None:
        """The lab directory on this machine (``lab_dir`` resolved; stackpaths.resolve)."""
        return resolve(self.lab_dir) if self.lab_dir else None

    @property
    def alias(self) -> str:
        return link_alias(self.stack, lab_id=self.lab_id)

    @property
    def owner(self) -> str:
        return lab_owner(self.stack, self.lab_id)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NetSpec:
        return cls(**json.loads(text))

    def replace_keys(self) -> list[str]:
        """What makes another network (the bridge is made again; net-up puts the taps back
        in): a NAT change only updates it."""
        return [self.bridge, self.gateway, self.subnet]


@dataclass(frozen=True)
class VmSpec:
    """Everything ``ctl vm-up`` needs to make and run one host's VM."""

    stack: str
    host: str
    name: str  # guest_name
    # the VM's own directory under the lab directory, as steps record it (``path``: here)
    dir: str
    mac: str
    tap: str
    bridge: str
    ip: str
    serial: str | None
    boot: str  # efi | bios
    memory_mib: int
    cpus: int
    disk_gib: int
    accel: str
    iso_result: str  # the ISO build's out-link (installer.iso_out_link), as recorded
    qemu: str
    qemu_img: str
    install_timeout: int
    boot_timeout: int
    location: str  # plans/hosts.csv:N
    # the stack's known_hosts file: a deleted or reinstalled VM's old host keys leave it
    known_hosts: str = ""
    # the argv that builds iso_result (installer.iso_build_argv): run by vm-up before an
    # install, and only then
    iso_build: list[str] = dataclasses.field(default_factory=list)
    lab_id: str = ""  # '': a lab made before lab ids (its names from the stack alone)

    @property
    def tap_alias(self) -> str:
        return link_alias(self.stack, self.host, self.lab_id)

    @property
    def owner(self) -> str:
        return lab_owner(self.stack, self.lab_id)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VmSpec:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)

    @property
    def path(self) -> Path:
        """The VM's directory on this machine (``dir`` resolved: stackpaths.resolve)."""
        return resolve(self.dir)

    @property
    def iso_path(self) -> Path:
        return resolve(self.iso_result)

    @property
    def known_hosts_path(self) -> Path | None:
        return resolve(self.known_hosts) if self.known_hosts else None

    def here(self, vm_dir: Path) -> VmSpec:
        """This spec with its directory as found on this machine (a manifest's spec, read
        where the manifest lies, by a command that may run anywhere: ``k3scluster vms``)."""
        return dataclasses.replace(self, dir=str(vm_dir))

    def replace_keys(self, dir_as: str | None = None) -> list[str]:
        """What makes another machine: a change of these reinstalls the VM (delete, create).
        The IP too: the installed system carries it, and the lab waits for the VM at it.
        The directory as recorded (``dir_as`` instead: ``machine_triggers``)."""
        return [self.mac, self.serial or "", self.boot, str(self.disk_gib), dir_as or self.dir,
                self.ip]


def machine_triggers(
    spec: VmSpec, recorded: Sequence[str] | None, vm_dir: Path
) -> list[str]:
    """The machine step's triggers: ``spec.replace_keys()``. A VM made before specs recorded
    the directory relative to the project has its absolute path in its recorded triggers;
    when that directory is this one (``vm_dir``, the VM's directory here) and nothing else
    differs, the recorded triggers are kept, so that the upgrade does not install the VM
    again. (Such a VM's triggers keep the path until it is replaced: when its lab moves, it
    is installed again once.)"""
    keys = spec.replace_keys()
    legacy = spec.replace_keys(dir_as=str(vm_dir))
    if recorded is not None and list(recorded) == legacy:
        return legacy
    return keys


def _column(host: Host, name: str) -> str:
    """The host's column named ``name`` (any case) or ''."""
    for key, value in host.columns:
        if key.lower() == name:
            return value
    return ""


def host_override(host: Host, column: str, default: int, least: int) -> int:
    """A per-host column (vmMemory, vmCpus, vmDiskSize; any case) or the stack's value."""
    raw = _column(host, column.lower()).strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < least:
        raise K3sClusterError(
            f"{host.location}: host {host.name}: {column} is {raw!r}; "
            f"it must be a whole number of at least {least}",
            hint=f"leave {column} empty for the stack's setting",
        )
    return int(raw)


def net_spec(cluster: Cluster, vs: VmSettings, recorded_lab: Path | None = None) -> NetSpec:
    """The lab network's spec; ``recorded_lab`` is the lab directory as steps record it
    (default ``vs.lab_dir``)."""
    net = cluster.network
    return NetSpec(
        stack=vs.stack,
        bridge=bridge_name(vs.stack, vs.lab_id),
        gateway=f"{net.gateway}/{net.prefix_length}",
        subnet=str(net.network),
        nat=vs.nat,
        location=str(net.location),
        lab_dir=str(recorded_lab or vs.lab_dir),
        lab_id=vs.lab_id,
    )


def vm_specs(
    cluster: Cluster,
    vs: VmSettings,
    iso_results: dict[str, str],
    known_hosts: Path | None = None,
    iso_builds: dict[str, list[str]] | None = None,
    recorded_lab: Path | None = None,
) -> list[VmSpec]:
    """One spec per host; raises (file:line) what no VM can do, e.g. a serial over 20 bytes.
    ``iso_results``, ``known_hosts``, ``iso_builds`` and ``recorded_lab`` (the lab directory;
    default ``vs.lab_dir``) are as steps record them; ``vs.lab_dir`` is the lab here."""
    specs = []
    problems = []
    for h in cluster.hosts:
        if h.disk is not None and len(h.disk.encode()) > VIRTIO_SERIAL_MAX:
            problems.append(
                f"{h.location}: host {h.name}: disk serial {h.disk!r} has "
                f"{len(h.disk.encode())} bytes; virtio-blk keeps at most {VIRTIO_SERIAL_MAX}, "
                "so the VM's installer would not find its disk"
            )
            continue
        vm_dir = vs.lab_dir / h.name
        if len(str(vm_dir / "qmp.sock")) > UNIX_PATH_MAX:
            problems.append(
                f"{vm_dir}/qmp.sock is longer than {UNIX_PATH_MAX} characters "
                "(the limit of a unix socket path)"
            )
            continue
        specs.append(
            VmSpec(
                stack=vs.stack,
                host=h.name,
                name=guest_name(vs.stack, h.name, vs.lab_id),
                dir=str((recorded_lab or vs.lab_dir) / h.name),
                mac=vm_mac(vs.stack, h.name),
                tap=tap_name(vs.stack, h.name, vs.lab_id),
                bridge=bridge_name(vs.stack, vs.lab_id),
                ip=str(h.ip),
                serial=h.disk,
                boot=h.boot.value,
                memory_mib=host_override(h, "vmMemory", vs.memory_mib, 256),
                cpus=host_override(h, "vmCpus", vs.cpus, 1),
                disk_gib=host_override(h, "vmDiskSize", vs.disk_gib, 1),
                accel=vs.accel,
                iso_result=iso_results[h.name],
                qemu=vs.qemu,
                qemu_img=vs.qemu_img,
                install_timeout=vs.install_timeout,
                boot_timeout=vs.boot_timeout,
                location=str(h.location),
                known_hosts=str(known_hosts or ""),
                iso_build=list((iso_builds or {}).get(h.name, [])),
                lab_id=vs.lab_id,
            )
        )
    if problems:
        raise K3sClusterError(
            "this VM stack cannot make these VMs:\n  " + "\n  ".join(problems),
            hint="shorten the serial in plans/hosts.csv (a VM stack only: real disks keep "
            "longer ones), or set k3scluster:renderDir to a shorter path",
        )
    return specs


def planned_macs(cluster: Cluster, stack: str) -> dict[str, str]:
    """host -> MAC of its VM NIC (what the rendered .link files match)."""
    return {h.name: vm_mac(stack, h.name) for h in cluster.hosts}


def vm_render(cluster: Cluster, stack: str, render_dir: Path) -> VmRender:
    """How the VM stack ``stack`` renders into ``render_dir``: its VMs' MACs, and each
    VM's hardware configuration in the VM's own directory of the lab (``lab_dir``), where
    the hardware fetch writes it and ``vm-delete`` removes it with the VM."""
    return VmRender(planned_macs(cluster, stack), lab_dir(render_dir))


def subnet_of(cluster: Cluster) -> ipaddress.IPv4Network:
    return cluster.network.network

