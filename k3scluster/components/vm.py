"""``k3scluster:index:Lab`` and ``k3scluster:index:Vm``: a VM stack's network and machines.

Only a stack with ``k3scluster:vms true`` has them. Children, in the order ``pulumi up``
runs them:

1. ``<name>-network``: the stack's bridge carrying the plan's gateway (``ctl net-up``;
   ``net-down`` on delete). It refuses a subnet this machine already uses before it creates
   anything. A changed subnet or NAT setting replaces it;
2. per host ``<host>-vm`` (a ``Vm``) with ``<host>-vm-iso``, the host's installer ISO
   (after the render), and ``<host>-vm-machine`` (``ctl vm-up``): disk, tap, the install
   from the ISO, the boot from disk, until the VM answers at its planned IP. Its delete
   stops the VM and deletes its disk and files. A changed MAC, serial, boot mode or disk
   size replaces it (a new install); memory and CPUs update it (a restart).

The hardware fetch and the deploy of a host wait for its ``machine`` step
(``Lab.ready(host)``), so the normal path runs against the installed VM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pulumi

from k3scluster import commands, installer, render
from k3scluster.components.settings import Settings
from k3scluster.components.steps import step
from k3scluster.lab.spec import NetSpec, VmSpec, net_spec, vm_specs
from k3scluster.model import Cluster as ClusterModel


@dataclass(frozen=True)
class VmArgs:
    spec: VmSpec
    # name -> sha256 of what the ISO is built from (installer.installer_inputs and the host's)
    iso_inputs: Mapping[str, pulumi.Input[str]]
    iso_build_argv: Sequence[str]
    python: str
    runner: str
    dir: str
    network: pulumi.Resource
    depends_on: Sequence[pulumi.Resource] = field(default=())  # the render step


class Vm(pulumi.ComponentResource):
    mac: pulumi.Output[str]
    console: pulumi.Output[str]

    def __init__(self, name: str, args: VmArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("k3scluster:index:Vm", name, None, opts)
        spec = args.spec
        self.iso = step(
            f"{name}-iso",
            runner=args.runner,
            host=spec.host,
            create=commands.build_iso(
                args.python, Path(spec.iso_result), list(args.iso_build_argv)
            ),
            inputs_digest=args.iso_inputs,
            dir=args.dir,
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on)),
        )
        up = commands.lab_ctl(args.python, "vm-up", spec.to_json())
        self.machine = step(
            f"{name}-machine",
            runner=args.runner,
            host=spec.host,
            create=up,
            update=up,
            delete=commands.lab_ctl(args.python, "vm-delete", spec.to_json()),
            triggers=spec.replace_keys(),
            dir=args.dir,
            # the new VM takes the old one's directory, tap and MAC: the old one goes first
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[args.network, self.iso], delete_before_replace=True
            ),
        )
        console = str(Path(spec.dir) / "console.log")
        self.mac = pulumi.Output.from_input(spec.mac)
        self.console = pulumi.Output.from_input(console)
        self.register_outputs(
            {"mac": spec.mac, "ip": spec.ip, "tap": spec.tap, "console": console}
        )


@dataclass(frozen=True)
class LabArgs:
    net: NetSpec
    vms: Sequence[VmSpec]
    iso_inputs: Mapping[str, Mapping[str, pulumi.Input[str]]]  # host -> ISO inputs
    nix: str
    render_dir: Path
    python: str
    runner: str
    dir: str
    depends_on: Sequence[pulumi.Resource] = field(default=())  # the render step


class Lab(pulumi.ComponentResource):
    bridge: pulumi.Output[str]

    def __init__(self, name: str, args: LabArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("k3scluster:index:Lab", name, None, opts)
        net = args.net
        self.network = step(
            f"{name}-network",
            runner=args.runner,
            host="-",
            create=commands.lab_ctl(args.python, "net-up", net.to_json()),
            delete=commands.lab_ctl(args.python, "net-down", net.to_json()),
            triggers=[net.to_json()],
            dir=args.dir,
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),  # one bridge
        )
        self.vms: dict[str, Vm] = {}
        for spec in args.vms:
            self.vms[spec.host] = Vm(
                f"{spec.host}-vm",
                VmArgs(
                    spec=spec,
                    iso_inputs=args.iso_inputs[spec.host],
                    iso_build_argv=installer.iso_build_argv(
                        args.nix, args.render_dir, spec.host
                    ),
                    python=args.python,
                    runner=args.runner,
                    dir=args.dir,
                    network=self.network,
                    depends_on=args.depends_on,
                ),
                pulumi.ResourceOptions(parent=self),
            )
        self.bridge = pulumi.Output.from_input(net.bridge)
        self.register_outputs(
            {"bridge": net.bridge, "gateway": net.gateway, "vms": sorted(self.vms)}
        )

    def ready(self, host: str) -> list[pulumi.Resource]:
        """What a host's hardware fetch and deploy wait for: its VM, installed and up."""
        vm = self.vms.get(host)
        return [vm.machine] if vm is not None else []


def make_lab(
    parent: pulumi.Resource,
    name: str,
    cluster: ClusterModel,
    settings: Settings,
    files: Mapping[str, str],
    file_sha: Mapping[str, str],
    render_step: pulumi.Resource,
) -> Lab | None:
    """The cluster's ``Lab`` when its stack is a VM stack, else None (nothing VM-specific)."""
    vs = settings.vm
    if vs is None:
        return None
    iso_links = {
        h.name: str(installer.iso_out_link(settings.render_dir, h.name)) for h in cluster.hosts
    }
    iso_inputs: dict[str, Mapping[str, pulumi.Input[str]]] = {}
    for h in cluster.hosts:
        # the image as rendered before the install: the hardware file a fetch adds later
        # rebuilds the ISO, but never reinstalls the VM (its machine step does not take it)
        iso_inputs[h.name] = {
            **render.host_inputs(cluster, h.name, files),
            **{
                f"file:{k}": v
                for k, v in installer.installer_inputs(files, h.name, file_sha).items()
            },
        }
    return Lab(
        f"{name}-lab",
        LabArgs(
            net=net_spec(cluster, vs),
            vms=vm_specs(cluster, vs, iso_links),
            iso_inputs=iso_inputs,
            nix=settings.nix,
            render_dir=settings.render_dir,
            python=settings.python,
            runner=settings.runner,
            dir=str(settings.project_dir),
            depends_on=(render_step,),
        ),
        pulumi.ResourceOptions(parent=parent),
    )
