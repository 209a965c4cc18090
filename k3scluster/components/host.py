"""``k3scluster:index:Host`` and its K3s containers (``K3sServer``, ``K3sAgent``).

A Host owns the step that deploys it (``colmena apply switch --on <host>``). That step's
inputs are the host's input digests (``render.host_inputs``): when one changes, ``pulumi
preview --diff`` shows an update of this host's deploy naming the input, and ``pulumi up``
runs colmena for this host only. Removing the host from the plans deletes the step, which
only prints that the machine was left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi

from k3scluster import commands, render
from k3scluster.components.iso import InstallerIso, InstallerIsoArgs
from k3scluster.components.steps import step
from k3scluster.model import Host as HostModel
from k3scluster.model import K3sNode, K3sType
from k3scluster.records import DEPLOYED_PREFIX, last_json


@dataclass(frozen=True)
class K3sNodeArgs:
    node: K3sNode
    server_url: str | None  # https://<init-server ip>:6443; None for the init-server itself


class _K3sNode(pulumi.ComponentResource):
    """A K3s container of a host: what it is (name, ip, type), deployed with its host."""

    name: pulumi.Output[str]
    ip: pulumi.Output[str]
    type: pulumi.Output[str]
    host: pulumi.Output[str]

    def __init__(
        self, token: str, name: str, args: K3sNodeArgs, opts: pulumi.ResourceOptions | None
    ) -> None:
        super().__init__(token, name, None, opts)
        node = args.node
        self.name = pulumi.Output.from_input(node.name)
        self.ip = pulumi.Output.from_input(str(node.ip))
        self.type = pulumi.Output.from_input(node.type.value)
        self.host = pulumi.Output.from_input(node.host)
        # plain values: known now, and cheaper for the engine than Outputs (bench/run.py)
        outputs = {"name": node.name, "ip": str(node.ip), "type": node.type.value, "host": node.host}
        if args.server_url:
            outputs["serverUrl"] = args.server_url
        self.register_outputs(outputs)


class K3sServer(_K3sNode):
    """``k3scluster:index:K3sServer``: the NixOS container ``k3s-server`` of a host."""

    def __init__(
        self, name: str, args: K3sNodeArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        if not args.node.type.is_server:
            raise ValueError(f"{args.node.name} is not a server")
        super().__init__("k3scluster:index:K3sServer", name, args, opts)


class K3sAgent(_K3sNode):
    """``k3scluster:index:K3sAgent``: the podman container ``k3s-agent`` of a host."""

    def __init__(
        self, name: str, args: K3sNodeArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        if args.node.type is not K3sType.AGENT:
            raise ValueError(f"{args.node.name} is not an agent")
        super().__init__("k3scluster:index:K3sAgent", name, args, opts)


@dataclass(frozen=True)
class HostArgs:
    host: HostModel
    nodes: Sequence[K3sNode]  # the host's rows of k3s.csv
    # render.host_inputs: name -> sha256 (an Output where a step of this run makes the file)
    inputs: Mapping[str, pulumi.Input[str]]
    plan: Mapping[str, str]  # render.host_plan: in clear in the deploy step (never a secret)
    digest: pulumi.Input[str]  # render.host_digest(inputs)
    deploy_argv: Sequence[str]  # health.deploy_argv(...): colmena, and the gates
    read_argv: Sequence[str] | None
    runner: str
    server_url: str | None
    iso: InstallerIsoArgs
    # what the deploy waits for: the render step, the hardware fetch, earlier hosts
    depends_on: Sequence[pulumi.Input[pulumi.Resource]] = field(default=())
    # the python runner's provider process for the deploy (health.runner_pool); None: default
    provider: pulumi.ProviderResource | None = None


class Host(pulumi.ComponentResource):
    name: pulumi.Output[str]
    ip: pulumi.Output[str]
    roles: pulumi.Output[list[str]]
    digest: pulumi.Output[str]

    def __init__(
        self, name: str, args: HostArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("k3scluster:index:Host", name, None, opts)
        h = args.host
        argv = list(args.deploy_argv)
        self.deploy = step(
            f"{name}-deploy",
            runner=args.runner,
            host=h.name,
            create=argv,
            update=argv,
            delete=commands.notice(
                f"k3scluster: {h.name} ({h.ip}) left the plans; the machine was NOT wiped "
                "and keeps running its last configuration"
            ),
            # what the plan shows in clear is recorded in clear, the rest (files, nixConfigs,
            # manifests, secrets) as short digests
            inputs_digest=render.grouped_inputs(
                {k: v for k, v in args.inputs.items() if k not in render.PLAN_INPUTS}
            ),
            plan=args.plan,
            read=args.read_argv,
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=list(args.depends_on), provider=args.provider
            ),
        )
        self.nodes: list[_K3sNode] = []
        for node in args.nodes:
            cls = K3sServer if node.type.is_server else K3sAgent
            url = None if node.type is K3sType.INIT_SERVER else args.server_url
            self.nodes.append(
                cls(node.name, K3sNodeArgs(node, url), pulumi.ResourceOptions(parent=self))
            )
        # only when an image is built (buildIsos on, not a VM stack): a component that builds
        # nothing would be two lines of every preview and nothing else
        self.installer = (
            InstallerIso(f"{name}-installer", args.iso, pulumi.ResourceOptions(parent=self))
            if args.iso.build_argv is not None
            else None
        )
        digest = args.digest
        self.args_digest = digest
        # what the deploy read back from the host (system, units, health, deployedAt)
        self.record = self.deploy.stdout.apply(  # type: ignore[attr-defined]
            lambda out: last_json(out, DEPLOYED_PREFIX) or {}
        )
        self.name = pulumi.Output.from_input(h.name)
        self.ip = pulumi.Output.from_input(str(h.ip))
        self.roles = pulumi.Output.from_input([n.type.value for n in args.nodes])
        # known once the deploy step has run: the digest of what is on the machine
        self.digest = self.deploy.stdout.apply(lambda _: digest)  # type: ignore[attr-defined]
        self.register_outputs(
            {
                "name": h.name,
                "ip": str(h.ip),
                "roles": [n.type.value for n in args.nodes],
                "digest": self.digest,
            }
        )
