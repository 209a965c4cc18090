"""``k3scluster:index:Lab`` and ``k3scluster:index:Vm``: a VM stack's network and machines.

Only a stack with ``k3scluster:vms true`` has them. Children, in the order ``pulumi up``
runs them:

1. ``<name>-network``: the stack's bridge carrying the plan's gateway (``ctl net-up``;
   ``net-down`` on delete). It refuses a subnet this machine already uses before it creates
   anything. A changed gateway or subnet replaces it, a NAT setting updates it; a missing
   bridge (this machine restarted) updates it too;
2. per host ``<host>-vm`` (a ``Vm``) with ``<host>-vm-machine`` (``ctl vm-up``, after the
   render): disk, tap, the host's installer ISO built and installed from (only when the VM
   is not installed), the boot from disk, until the VM answers at its planned IP. Its
   delete stops the VM and deletes its disk and files. A changed MAC, serial, boot mode,
   disk size or IP replaces it (a new install); memory and CPUs update it (a restart), and
   so does a VM that is not running (this machine restarted: ``lab.status``).

The lab's id (``lab.spec``: what its bridge, taps, VMs and NAT are named by) is made once,
when the stack's lab is first made, and the network step and each machine step record it
as their input ``lab``: every later run reads it back from the stack's state
(``lab_id_of``). A lab made before lab ids has steps without it and keeps its names (``''``).

The hardware fetch and the deploy of a host wait for its ``machine`` step
(``Lab.ready(host)``), so the normal path runs against the installed VM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pulumi

from k3scluster import commands, installer
from k3scluster.components.settings import Settings
from k3scluster.components.steps import step
from k3scluster.lab.spec import (
    LAB_ID_INPUT,
    NetSpec,
    VmSpec,
    lab_dir,
    machine_triggers,
    net_spec,
    new_lab_id,
    vm_specs,
)
from k3scluster.lab.status import network_state, vm_state
from k3scluster.model import Cluster as ClusterModel
from k3scluster.render import VmRender

NETWORK_STEP_SUFFIX = "-lab-network"  # the Lab's network step (``make_lab``: <name>-lab)
MACHINE_STEP_SUFFIX = "-vm-machine"  # a Vm's machine step (<host>-vm-machine)


def lab_id_of(steps: Mapping[str, Mapping[str, str]]) -> str:
    """The stack's lab id from its recorded steps (``records.step_inputs``): the one its
    network step records, or its machine steps (they record it too: a network replace
    whose new net-up failed leaves the VMs without a network step); ``''`` when the lab's
    steps record none (a lab made before lab ids, which keeps its names); a new random one
    when the state has no lab (it is made now)."""
    lab_steps = sorted(
        (not name.endswith(NETWORK_STEP_SUFFIX), name)
        for name in steps if name.endswith((NETWORK_STEP_SUFFIX, MACHINE_STEP_SUFFIX))
    )
    for _, name in lab_steps:
        if steps[name].get(LAB_ID_INPUT):
            return steps[name][LAB_ID_INPUT]
    return "" if lab_steps else new_lab_id()


@dataclass(frozen=True)
class VmArgs:
    spec: VmSpec
    python: str
    runner: str
    network: pulumi.Resource
    local_dir: Path  # the VM's directory on this machine (the spec records it relative)
    depends_on: Sequence[pulumi.Resource] = field(default=())  # the render step
    # the triggers the state records for this VM's machine step (``machine_triggers``)
    recorded_triggers: Sequence[str] | None = None


class Vm(pulumi.ComponentResource):
    mac: pulumi.Output[str]
    console: pulumi.Output[str]

    def __init__(self, name: str, args: VmArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("k3scluster:index:Vm", name, None, opts)
        spec = self.spec = args.spec
        self.triggers = machine_triggers(spec, args.recorded_triggers, args.local_dir)
        up = commands.lab_ctl(args.python, "vm-up", spec.to_json())
        self.machine = step(
            f"{name}-machine",
            runner=args.runner,
            host=spec.host,
            create=up,
            update=up,
            delete=commands.lab_ctl(args.python, "vm-delete", spec.to_json()),
            triggers=self.triggers,
            # an installed VM that is not running (this machine restarted): vm-up starts it
            # and the lab's id, which the next run reads back should the network step be
            # gone (lab_id_of)
            inputs_digest={
                "state": vm_state(spec.here(args.local_dir)),
                **({LAB_ID_INPUT: spec.lab_id} if spec.lab_id else {}),
            },
            # (no dir: steps run in the project directory, which the spec's paths are
            # relative to, wherever the checkout lives)
            # the new VM takes the old one's directory, tap and MAC: the old one goes first.
            # vm-up builds the host's ISO from the render when it installs, and only then:
            # an installed VM never boots its ISO again, so a changed configuration (which
            # colmena deploys) rebuilds nothing here
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[args.network, *args.depends_on],
                delete_before_replace=True,
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
    python: str
    runner: str
    local_lab: Path  # the lab directory on this machine (the specs record it relative)
    depends_on: Sequence[pulumi.Resource] = field(default=())  # the render step
    # step name -> the triggers the state records for it (VmSettings.recorded_triggers)
    recorded_triggers: Mapping[str, Sequence[str]] = field(default_factory=dict)


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
            # vmNat: net-up turns NAT on or off; another bridge, gateway or subnet is another
            # network (net-up puts the VMs' taps into the new bridge)
            update=commands.lab_ctl(args.python, "net-up", net.to_json()),
            delete=commands.lab_ctl(args.python, "net-down", net.to_json()),
            triggers=net.replace_keys(),
            # the bridge gone (this machine restarted): net-up makes it again
            # and the lab's id, read back by the next run (lab_id_of)
            inputs_digest={
                "state": network_state(replace(net, lab_dir=str(args.local_lab))),
                **({LAB_ID_INPUT: net.lab_id} if net.lab_id else {}),
            },
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),  # one bridge
        )
        self.vms: dict[str, Vm] = {}
        for spec in args.vms:
            self.vms[spec.host] = Vm(
                f"{spec.host}-vm",
                VmArgs(
                    spec=spec,
                    python=args.python,
                    runner=args.runner,
                    network=self.network,
                    local_dir=args.local_lab / spec.host,
                    depends_on=args.depends_on,
                    recorded_triggers=args.recorded_triggers.get(f"{spec.host}-vm-machine"),
                ),
                pulumi.ResourceOptions(parent=self),
            )
        self.bridge = pulumi.Output.from_input(net.bridge)
        self.register_outputs(
            {"bridge": net.bridge, "gateway": net.gateway, "vms": sorted(self.vms)}
        )

    def machine_keys(self, host: str) -> list[str]:
        """What makes the host's VM another machine (``VmSpec.replace_keys``): what the
        VM's hardware fetch must be read again after."""
        vm = self.vms.get(host)
        return vm.triggers if vm is not None else []

    def ready(self, host: str) -> list[pulumi.Resource]:
        """What a host's hardware fetch and deploy wait for: its VM, installed and up."""
        vm = self.vms.get(host)
        return [vm.machine] if vm is not None else []


def make_lab(
    parent: pulumi.Resource,
    name: str,
    cluster: ClusterModel,
    settings: Settings,
    vm: VmRender | None,
    render_step: pulumi.Resource,
) -> Lab | None:
    """The cluster's ``Lab`` when its stack is a VM stack, else None (nothing VM-specific)."""
    vs = settings.vm
    if vs is None or vm is None:
        return None
    hosts = [h.name for h in cluster.hosts]
    # every path as steps record it (stackpaths): relative to the project, as the stack file
    # names it, so the state does not depend on where the checkout or the cluster lives
    render_dir = settings.rec(settings.render_dir)
    iso_links = {h: str(installer.iso_out_link(render_dir, h)) for h in hosts}
    iso_builds = {h: installer.iso_build_argv(settings.nix, render_dir, h) for h in hosts}
    known_hosts = settings.rec(settings.known_hosts_file)
    lab = lab_dir(render_dir)
    return Lab(
        f"{name}-lab",
        LabArgs(
            net=net_spec(cluster, vs, lab),
            vms=vm_specs(cluster, vs, iso_links, known_hosts, iso_builds, lab),
            python=settings.python,
            runner=settings.runner,
            local_lab=vs.lab_dir,
            depends_on=(render_step,),
            recorded_triggers=vs.recorded_triggers,
        ),
        pulumi.ResourceOptions(parent=parent),
    )
