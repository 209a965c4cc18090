"""``k3scluster:index:Cluster``: the whole cluster as one component.

Children, in the order they run during ``pulumi up``:

1. ``<name>-<host>-hardware`` for each host without ``nixConfigs/<host>.hardware.nix`` (in a
   VM stack: every host, into ``<renderDir>-lab/<host>/hardware.nix``): reads
   ``/etc/nixos/hardware-configuration.nix`` from the host over ssh into that file;
2. ``<name>-render``: writes the rendered tree (``k3scluster render``) — during ``up`` only,
   so a preview changes nothing on disk; it does not wait for the fetches (a failed fetch
   stops its own host only), each host's deploy does;
3. the phases of ``k3scluster.update_plan`` in their order, each phase's steps waiting for
   the phases before it: a ``Host`` per row of hosts.csv deploying with colmena (each server
   host alone, the init-server's first, each after the one before passed its health gate;
   then the rest in parallel); ``<name>-kubeconfig`` after the init-server's host (gates on);
4. one ``Secret`` per secret file (digest only) and, under each Host, its ``K3sServer`` /
   ``K3sAgent`` and, when its installer image is built (``buildIsos``), ``InstallerIso``.

A VM stack (``Settings.vm``) also has a ``Lab`` (``k3scluster.components.vm``): the network
and one VM per host, installed from its ISO; a host's fetch and deploy wait for its VM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi

from k3scluster import commands, diagram, installer, render, snapshot
from k3scluster.bootentries import hosts_needing_reboot, reboot_warning
from k3scluster.components import health
from k3scluster.components.host import Host, HostArgs
from k3scluster.components.iso import InstallerIsoArgs
from k3scluster.components.secret import Secret, SecretArgs
from k3scluster.components.settings import Settings
from k3scluster.components.steps import step
from k3scluster.components.tasks import captured_sha256
from k3scluster.components.vm import make_lab
from k3scluster.lab.spec import vm_render
from k3scluster.membership import Deployed, refuse_without_gates
from k3scluster.model import Cluster as ClusterModel
from k3scluster.records import (
    K3S_AGENT_INPUT,
    K3S_SERVER_INPUT,
    SNAPSHOT_PREFIX,
    last_json,
    short_digest,
)
from k3scluster.update_plan import (
    Action,
    HostVersions,
    Phase,
    UpdateSettings,
    Wait,
    drain_node,
    no_snapshot_warning,
    plan_update,
    unrecorded_warning,
    what_may_happen,
)

# step names of the membership changes: what `pulumi preview --diff` lists, per node
STEP_NAMES = {
    Action.AGENT_LEAVES: "{node}-leaves-cluster",
    Action.SERVER_LEAVES: "{node}-leaves-etcd",
    Action.HOST_LEAVES: "{host}-leaves-plans",
    Action.SERVER_JOINS: "{node}-joins-etcd",
}


@dataclass(frozen=True)
class ClusterArgs:
    cluster: ClusterModel
    settings: Settings
    # what the stack deployed before this run (``k3scluster.membership.Deployed``)
    deployed: Deployed = field(default_factory=Deployed)
    # host -> the K3s releases its last deploys ran (components/deployed.py)
    versions: Mapping[str, HostVersions] = field(default_factory=dict)
    # host -> the digest of the system its last deploy installed (records.host_digests)
    digests: Mapping[str, str] = field(default_factory=dict)
    # the snapshot step's recorded inputs and last takenAt (records.last_snapshot)
    last_snapshot: tuple[Mapping[str, str], str | None] = ({}, None)


def _digest(inputs: Mapping[str, pulumi.Input[str]]) -> pulumi.Output[str]:
    """``render.host_digest`` over inputs of which some are known only after a step ran."""
    if all(isinstance(v, str) for v in inputs.values()):
        # the common case, computed here: Output.all over every input of every host was a
        # fifth of the preview's time at 200 hosts
        return pulumi.Output.from_input(render.host_digest(inputs))  # type: ignore[arg-type]
    return pulumi.Output.all(**inputs).apply(lambda known: render.host_digest(known))


def _rec(known: Mapping[str, object], host: str) -> dict[str, object]:
    value = known.get(f"{host}/record")
    return value if isinstance(value, dict) else {}


def _secret_args(cluster: ClusterModel) -> dict[str, SecretArgs]:
    s = cluster.secrets
    hosts = [h.name for h in cluster.hosts]
    found: dict[str, SecretArgs] = {}
    if s.token is not None:  # the servers; the agents too in a cluster without an agent token
        servers_only = s.agent_token is not None
        holders = tuple(
            h for h in hosts
            if any(n.type.is_server or not servers_only for n in cluster.k3s_on(h))
        )
        found[s.token.relpath] = SecretArgs("k3s-token", s.token.relpath, s.token.sha256, holders)
    if s.agent_token is not None:  # servers and agents
        with_k3s = tuple(h for h in hosts if cluster.k3s_on(h))
        at = s.agent_token
        found[at.relpath] = SecretArgs("k3s-agent-token", at.relpath, at.sha256, with_k3s)
    own = dict(s.host_passwd)
    if s.passwd is not None:
        shared = tuple(h for h in hosts if h not in own)
        found[s.passwd.relpath] = SecretArgs(
            "password-hash", s.passwd.relpath, s.passwd.sha256, shared
        )
    for host, sf in s.host_passwd:
        found[sf.relpath] = SecretArgs("password-hash", sf.relpath, sf.sha256, (host,))
    for key in s.ssh_keys:
        digest = hashlib.sha256(key.text.encode()).hexdigest()
        targets = tuple(hosts) if key.host is None else (key.host,)
        found[key.relpath] = SecretArgs("ssh-public-key", key.relpath, digest, targets)
    return found


class Cluster(pulumi.ComponentResource):
    hosts: pulumi.Output[dict[str, dict[str, object]]]
    api_endpoint: pulumi.Output[str | None]
    render_dir: pulumi.Output[str]

    def __init__(
        self, name: str, args: ClusterArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("k3scluster:index:Cluster", name, None, opts)
        self._name, self._c, self._s = name, args.cluster, args.settings
        self._deployed = args.deployed
        self._args = args
        c, s = self._c, self._s
        # a VM stack (k3scluster:vms): its NICs named by their VM's MAC, and a lab (below)
        self._vm = vm_render(c, s.vm.stack, s.render_dir) if s.vm else None
        # the order of the update (k3scluster.update_plan): what the render writes depends
        # on it (the servers-first hives of a K3s minor upgrade)
        self.plan = plan_update(
            c,
            args.deployed,
            UpdateSettings(
                max_unavailable=s.max_unavailable,
                # over ssh into the server containers, as the gates go: with them only
                snapshot=s.snapshot_before_servers and s.wait_ready,
                reboot_auto=s.reboot == "auto",
            ),
            args.versions,
        )
        if not s.wait_ready:  # the membership steps need what the gates need
            refuse_without_gates(self.plan.membership)
        unchecked = unrecorded_warning(c, args.versions)
        if unchecked:
            pulumi.log.warn(unchecked, self)
        self._held = self.plan.held_agents()
        self._files = render.render_files(c, s.render_dir, self._vm, self._held)
        # a manifest that left the plans since the last render: its objects stay in the
        # cluster (preview and up say so until the render that drops it)
        for gone in render.removed_manifests(c, s.render_dir):
            pulumi.log.warn(render.removed_manifest_warning(gone))
        self._file_sha = installer.file_digests(self._files)

        self.secrets = {
            rel: Secret(
                f"{name}-{rel.replace('/', '-')}", sa, pulumi.ResourceOptions(parent=self)
            )
            for rel, sa in _secret_args(c).items()
        }
        # hosts that get a hardware fetch (1. in the module docstring): in a VM stack every
        # host, into the lab (never nixConfigs/, which is the real machine's)
        self._fetch_hosts = [
            h.name for h in c.hosts if render.hardware_config(c, h.name, self._vm) is None
        ]
        self.render = self._render_step()
        # a VM stack's network and VMs, installed from their ISOs, before the normal path
        self.lab = make_lab(self, name, c, s, self._vm, self.render)
        self.hardware = self._hardware_steps()

        # 3. the phases of the update, in order
        self.host_components: dict[str, Host] = {}
        self.kubeconfig: pulumi.CustomResource | None = None
        self.snapshot: pulumi.CustomResource | None = None
        self._pool = health.runner_pool(
            name, s.runner, health.runner_processes(s.runner_processes), self
        )
        builders = {
            Action.DEPLOY: self._deploy_phase,
            Action.DEPLOY_SERVER_FIRST: self._server_first_phase,
            Action.AGENT_LEAVES: self._membership_phase,
            Action.SERVER_LEAVES: self._membership_phase,
            Action.HOST_LEAVES: self._membership_phase,
            Action.SERVER_JOINS: self._membership_phase,
            Action.SNAPSHOT: self._snapshot_phase,
        }
        # who joins and who leaves, in words (the preview shows them among the diagnostics),
        # then what else the deploys that run may do (one agent host at a time with reboot auto, a drain, the snapshot)
        for line in [*self.plan.membership.describe(), *self.plan.notes,
                     *self._what_may_happen(args.digests)]:
            pulumi.log.info(f"k3scluster: {line}", self)
        made: list[list[pulumi.Resource]] = []  # each phase's steps, in order
        for i, phase in enumerate(self.plan.phases):
            after = [r for k in phase.waits_for(i) for r in made[k]]
            waits_for: list[pulumi.Input[pulumi.Resource]] = (
                list(after) if phase.wait is Wait.OK else health.settled(after)
            )
            made.append(builders[phase.action](phase, waits_for))

        self._register()

    def _what_may_happen(self, last: Mapping[str, str]) -> list[str]:
        """``update_plan.what_may_happen`` for the hosts whose system digest differs from what
        their last deploy installed (``last``; one whose hardware file a fetch of this run
        writes counts as changing)."""
        changing = []
        for h in self._c.hosts:
            inputs = self._rendered_inputs(h.name)
            if h.name in self._fetch_hosts or last.get(h.name) != render.host_digest(inputs):
                changing.append(h.name)
        if self._s.snapshot_before_servers and not self._s.wait_ready:
            skipped = no_snapshot_warning(self._c, changing, list(last))
            if skipped:
                pulumi.log.warn(f"k3scluster: {skipped}", self)
        return what_may_happen(self._c, self.plan, changing, list(last), self._s.wait_ready,
                               reboot_auto=self._s.reboot == "auto")

    # -- 2. the rendered tree -----------------------------------------------------------

    def _render_args(self, servers_first: bool = False) -> commands.RenderArgs:
        """The render a deploy checks before colmena: the render step's (same VM stack; for a
        servers-first step the same held agents, so a render again writes its hive too).
        Other deploys carry no held agents: they plan no servers-first hive, a render again
        keeps the ones there, and their argv (an input of the step) stays the same when a
        K3s minor upgrade starts, so a host without K3s is not deployed by it."""
        s = self._s
        return commands.RenderArgs(
            s.rec(self._c.root),
            s.rec(s.render_dir),
            s.vm.stack if s.vm else None,
            tuple(sorted(self._held.items())) if servers_first else (),
        )

    def _render_step(self) -> pulumi.CustomResource:
        """``<name>-render``: writes the rendered tree, during ``up`` only."""
        c, s = self._c, self._s
        # one digest over the rendered files (each host's deploy names its own files), the
        # hardware files a fetch of this run writes, and the picture (cluster.svg, .md: it
        # re-renders when it changes; no host depends on it): a short preview
        tree = {
            "files": render.host_digest(self._file_sha),
            "picture": render.host_digest(installer.file_digests(diagram.sources(c))),
        }
        if self._fetch_hosts:
            tree["fetch"] = " ".join(self._fetch_target(h)[0] for h in sorted(self._fetch_hosts))
        render_argv = commands.render_tree(
            s.python,
            s.rec(c.root),
            s.rec(s.render_dir),
            s.vm.stack if s.vm else None,
            self._held,
        )
        return step(
            f"{self._name}-render",
            runner=s.runner,
            host="-",
            create=render_argv,
            update=render_argv,
            inputs_digest=tree,
            # not after the fetch steps: a fetch that fails must stop its own host only (a
            # failed dependency fails the registration of everything that depends on it).
            # The rendered tree imports a hardware file that is not there yet once it exists
            # (builtins.pathExists), so the host's deploy, which does wait for its fetch,
            # builds the same system whichever ran first.
            opts=pulumi.ResourceOptions(parent=self),
        )

    # -- 1. hardware configurations the cluster directory does not have yet --------------

    def _fetch_target(self, host: str) -> tuple[str, Path]:
        """Where a host's hardware fetch writes (its name in the render's digest, and the
        file): the user's ``nixConfigs/<host>.hardware.nix`` in a hardware stack, the VM's
        own file in the stack's lab in a VM stack (never the user's)."""
        if self._vm is not None:
            return f"lab:{host}/hardware.nix", self._vm.hardware_file(host)
        rel = f"nixConfigs/{host}.hardware.nix"
        return rel, self._c.root / rel

    def _hardware_steps(self) -> dict[str, pulumi.CustomResource]:
        c, s = self._c, self._s
        found: dict[str, pulumi.CustomResource] = {}
        for hname in self._fetch_hosts:
            h = c.host(hname)
            out = self._fetch_target(hname)[1]
            found[hname] = step(
                f"{self._name}-{hname}-hardware",
                runner=s.runner,
                host=hname,
                create=commands.fetch_hardware_config(
                    s.python, h.ip, s.ssh, s.rec(out), wait=s.ssh_wait
                ),
                # a new VM (another disk) is another machine: read its file again
                triggers=[str(h.ip), *(self.lab.machine_keys(hname) if self.lab else [])],
                opts=pulumi.ResourceOptions(
                    parent=self, depends_on=self.lab.ready(hname) if self.lab else None
                ),
            )
        return found

    # -- 3. the phases --------------------------------------------------------------------

    def _deploy_phase(
        self, phase: Phase, waits_for: list[pulumi.Input[pulumi.Resource]]
    ) -> list[pulumi.Resource]:
        """``Action.DEPLOY``: a ``Host`` per host of the phase, all at once."""
        made: list[pulumi.Resource] = []
        for hname in phase.hosts:
            host = self._host(hname, waits_for)
            self.host_components[hname] = host
            made.append(host.deploy)
            init = self._c.init_server
            if self._s.wait_ready and init is not None and hname == init.host:
                self.kubeconfig = self._kubeconfig_step(host)
        return made

    def _server_first_phase(
        self, phase: Phase, waits_for: list[pulumi.Input[pulumi.Resource]]
    ) -> list[pulumi.Resource]:
        """``Action.DEPLOY_SERVER_FIRST``: ``<host>-servers-first``, the host deployed from
        ``servers-first/<host>.nix``: its K3s server moves to the cluster's release, its
        agent keeps the one it runs (``agent-k3s``); its gates as for any deploy."""
        s = self._s
        (hname,) = phase.hosts
        rel = render.servers_first_path(hname)
        inputs = {
            **self._host_inputs(hname),
            f"file:{rel}": self._file_sha[rel],
            **self._versions_inputs(hname, agent=dict(phase.detail)["agent-k3s"]),
        }
        argv = self._deploy_argv(hname, s.rec(s.render_dir / rel), servers_first=True)
        hw = self.hardware.get(hname)
        made = step(
            f"{hname}-servers-first",
            runner=s.runner,
            host=hname,
            create=argv,
            update=argv,
            inputs_digest=inputs,
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[
                    self.render,
                    *([hw] if hw else []),
                    *(self.lab.ready(hname) if self.lab else []),
                    *waits_for,
                ],
            ),
        )
        return [made]

    def _snapshot_phase(
        self, phase: Phase, waits_for: list[pulumi.Input[pulumi.Resource]]
    ) -> list[pulumi.Resource]:
        """``Action.SNAPSHOT``: ``<name>-etcd-snapshot``, on the first deployed server that
        takes it (``detail["servers"]``; the task checks each one's host name first). Its
        inputs are the server hosts' (and their releases): it runs exactly when one of their
        deploys will, before it."""
        s = self._s
        inputs: dict[str, pulumi.Input[str]] = {}
        known: dict[str, str] | None = {}  # the same, as the state records them (None: not
        pending = False  # known before the run) and: will a server host's deploy run?
        for hname in phase.hosts:
            inputs[f"deploy:{hname}"] = _digest(self._host_inputs(hname))
            versions = {f"{k}:{hname}": v for k, v in self._versions_inputs(hname).items()}
            inputs.update(versions)
            system = render.host_digest(self._rendered_inputs(hname))
            pending = pending or self._args.digests.get(hname) != system
            if known is not None and hname not in self.hardware:
                known.update({f"deploy:{hname}": short_digest(system), **versions})
            else:
                known = None
        recorded, taken_at = self._args.last_snapshot
        retake = snapshot.again(known, recorded, taken_at, pending)
        if retake is not None:
            inputs[snapshot.AGAIN_INPUT] = retake
        # where: the servers the stack deployed, at their deployed addresses (update_plan)
        servers = [
            (h, ipaddress.IPv4Address(ip))
            for h, _, ip in (x.partition("=") for x in dict(phase.detail)["servers"].split(",") if x)
        ]
        argv = commands.etcd_snapshot(s.python, s.stack, servers, s.ssh)
        self.snapshot = step(
            f"{self._name}-etcd-snapshot",
            runner=s.runner,
            host="-",
            create=argv,
            update=argv,
            inputs_digest=inputs,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.render, *waits_for]),
        )
        return [self.snapshot]

    def _deploy_argv(self, hname: str, hive: Path, servers_first: bool = False) -> list[str]:
        """colmena for ``hname`` from ``hive``, wrapped in its gates and, for a host with an
        agent, the drain that runs when the switch would restart it (gates on only);
        ``servers_first``: the render check holds back the agents (``_render_args``)."""
        c, s = self._c, self._s
        return health.deploy_argv(
            c,
            hname,
            commands.colmena_apply(s.colmena, hive, hname, parallel=s.parallel),
            python=s.python,
            ssh=s.ssh,
            wait_ready=s.wait_ready,
            timeout=s.ready_timeout,
            render=self._render_args(servers_first),
            deployed=self._deployed,
            drain=drain_node(c, hname),
            drain_timeout=s.drain_timeout,
            stack=s.stack,
            rollback=s.rollback,
            confirm_timeout=s.confirm_timeout,
            reboot_timeout=s.reboot_timeout if s.reboot == "auto" else None,
        )

    def _versions_inputs(self, hname: str, agent: str | None = None) -> dict[str, str]:
        """``k3s:server``/``k3s:agent``: the K3s minor release the host's deploy carries
        (plain: ``preview --diff`` shows them, and the next run reads them back)."""
        c = self._c
        found: dict[str, str] = {}
        if c.server_on(hname) is not None:
            found[K3S_SERVER_INPUT] = c.network.k3s
        if c.agent_on(hname) is not None:
            found[K3S_AGENT_INPUT] = agent or c.network.k3s
        return found

    def _membership_phase(
        self, phase: Phase, waits_for: list[pulumi.Input[pulumi.Resource]]
    ) -> list[pulumi.Resource]:
        """A node (or host) that joins or leaves: one named step (``STEP_NAMES``) running
        ``tasks membership <action>`` (k3scluster/etcdmembers.py, agentmembers.py)."""
        s = self._s
        detail = dict(phase.detail)
        detail.setdefault("host", phase.hosts[0])
        name = STEP_NAMES[phase.action].format(node=detail.get("node", ""), host=detail["host"])
        argv = commands.membership_step(
            s.python, phase.action.value, sorted(detail.items()), s.ssh,
            drain_timeout=s.drain_timeout,
        )
        made = step(
            name,
            runner=s.runner,
            host=detail["host"],
            create=argv,
            opts=pulumi.ResourceOptions(parent=self, depends_on=waits_for),
        )
        return [made]

    def _rendered_inputs(self, hname: str) -> Mapping[str, str]:
        """``render.host_inputs`` of the host, computed once per program run (each phase that
        concerns the host asks; it hashes the host's files: a third of a second at 200 hosts)."""
        cache: dict[str, Mapping[str, str]] = self.__dict__.setdefault("_inputs_cache", {})
        if hname not in cache:
            cache[hname] = render.host_inputs(self._c, hname, self._files, self._vm)
        return cache[hname]

    def _host_inputs(self, hname: str) -> dict[str, pulumi.Input[str]]:
        """``render.host_inputs``, with what a hardware fetch of this run will write."""
        inputs: dict[str, pulumi.Input[str]] = dict(self._rendered_inputs(hname))
        hw = self.hardware.get(hname)
        if hw is None:
            return inputs
        # the file does not exist yet (render gave it the digest of "absent"): its digest
        # is what the fetch step wrote, so that the next preview, reading the file, agrees
        # and shows no second change of this host
        key = render.hardware_input_key(hname, self._vm)
        absent = str(inputs[key])
        inputs[key] = hw.stdout.apply(  # type: ignore[attr-defined]
            lambda out, absent=absent: captured_sha256(out) or absent
        )
        # likewise its rendered hosts/<host>.nix: the text that imports the file
        rel = f"file:hosts/{hname}.nix"
        before = str(inputs[rel])
        # (a VM stack's text is the same before and after: it imports the lab's file if it
        # exists)
        after = hashlib.sha256(self._fetched_files()[f"hosts/{hname}.nix"].encode()).hexdigest()
        inputs[rel] = hw.stdout.apply(  # type: ignore[attr-defined]
            lambda out, before=before, after=after: after if captured_sha256(out) else before
        )
        return inputs

    def _fetched_files(self) -> Mapping[str, str]:
        """The rendered files once every fetch of this run has written its hardware file
        (hosts/<host>.nix of a fetched host imports it from then on)."""
        if self._vm is not None:
            return self._files
        cached = getattr(self, "_fetched_cache", None)
        if cached is None:
            c = self._c
            names = {*c.nix_configs, *(f"{h}.hardware.nix" for h in self._fetch_hosts)}
            cached = render.render_files(
                dataclasses.replace(c, nix_configs=tuple(sorted(names))),
                self._s.render_dir,
            )
            self._fetched_cache = cached
        return cached

    def _host(self, hname: str, waits_for: list[pulumi.Input[pulumi.Resource]]) -> Host:
        c, s = self._c, self._s
        h = c.host(hname)
        inputs = self._host_inputs(hname)
        # the installer's rendered files, named like host_inputs names its own
        iso_inputs = {
            **inputs,
            **{
                f"file:{k}": v
                for k, v in installer.installer_inputs(self._files, hname, self._file_sha).items()
            },
        }
        iso = InstallerIsoArgs(
            host=hname,
            inputs=iso_inputs,
            digest=_digest(iso_inputs),
            build_argv=(
                installer.iso_build_argv(s.nix, s.rec(s.render_dir), hname)
                if s.build_isos and s.vm is None  # a VM stack's Vm builds it
                else None
            ),
            result_link=str(installer.iso_out_link(s.rec(s.render_dir), hname)),
            python=s.python,
            runner=s.runner,
            depends_on=(self.render,),
        )
        hive = s.rec(s.render_dir / "hive.nix")
        hw = self.hardware.get(hname)
        pool = self._pool
        return Host(
            hname,
            HostArgs(
                host=h,
                nodes=c.k3s_on(hname),
                # the deploy also carries the K3s releases (not in the digest of the system)
                inputs={**inputs, **self._versions_inputs(hname)},
                plan=render.host_plan(c, hname),
                digest=_digest(inputs),
                deploy_argv=self._deploy_argv(hname, hive),
                read_argv=health.read_argv(c, hname, python=s.python, ssh=s.ssh, runner=s.runner)
                if s.wait_ready
                else None,
                runner=s.runner,
                server_url=c.api_endpoint,
                iso=iso,
                depends_on=(
                    self.render,
                    *([hw] if hw else []),
                    *(self.lab.ready(hname) if self.lab else []),
                    *waits_for,
                ),
                provider=pool[len(self.host_components) % len(pool)] if pool else None,
            ),
            pulumi.ResourceOptions(parent=self),
        )

    def _kubeconfig_step(self, init_host: Host) -> pulumi.CustomResource | None:
        s = self._s
        return health.kubeconfig_step(
            self._name,
            self._c,
            python=s.python,
            ssh=s.ssh,
            runner=s.runner,
            stack=s.stack,
            path=str(s.rec(s.kubeconfig_file)),
            after=init_host.deploy,
            after_digest=init_host.args_digest,
            parent=self,
        )

    # -- 4. the outputs ---------------------------------------------------------------------

    def _register(self) -> None:
        c, s = self._c, self._s
        # One Output over what is known only after up (digests, ISO results); the rest plain.
        # a failed host's values are None (health.or_none): the program goes on registering
        # a host has an InstallerIso only when its image is built: no image, no sha256
        none: pulumi.Output[Any] = pulumi.Output.from_input(None)
        pending = {
            f"{hname}/{key}": health.or_none(value)
            for hname, host in self.host_components.items()
            for key, value in (
                ("digest", host.digest),
                ("record", host.record),
                ("image", host.installer.image if host.installer else none),
                ("sha256", host.installer.sha256 if host.installer else none),
            )
        }

        def hosts_output(known: dict[str, object]) -> dict[str, dict[str, object]]:
            return {
                hname: {
                    "ip": str(c.host(hname).ip),
                    "roles": [n.type.value for n in c.k3s_on(hname)],
                    "digest": known[f"{hname}/digest"],
                    # read back from the host after its deploy (None with waitReady false)
                    "system": _rec(known, hname).get("system"),
                    "units": _rec(known, hname).get("units"),
                    "deployedAt": _rec(known, hname).get("deployedAt"),
                    "health": _rec(known, hname).get("health")
                    or ("not checked (waitReady false)" if not s.wait_ready else None),
                    "installer": {
                        "image": known[f"{hname}/image"],
                        "sha256": known[f"{hname}/sha256"],
                    },
                }
                for hname in self.host_components
            }

        self.hosts = pulumi.Output.all(**pending).apply(hosts_output)
        ips = {hname: str(c.host(hname).ip) for hname in self.host_components}

        def needs_reboot(known: dict[str, object]) -> list[str]:
            hosts = hosts_needing_reboot({h: _rec(known, h) for h in self.host_components})
            warning = reboot_warning(hosts, ips)
            if warning:
                pulumi.log.warn(warning, self)
            return hosts

        # the hosts whose last deploy left them running a system they did not boot
        self.needs_reboot = pulumi.Output.all(**pending).apply(needs_reboot)
        # the kubeconfig: secret (its stdout is a secret output), None when gates are off
        self.kubeconfig_out: pulumi.Output[str] | None = (
            pulumi.Output.secret(self.kubeconfig.stdout)  # type: ignore[attr-defined]
            if self.kubeconfig is not None
            else None
        )
        # the last snapshot taken before the servers changed (None: none taken by this stack)
        self.etcd_snapshot: pulumi.Output[Any] | None = (
            self.snapshot.stdout.apply(  # type: ignore[attr-defined]
                lambda out: last_json(out, SNAPSHOT_PREFIX)
            )
            if self.snapshot is not None
            else None
        )
        self.api_endpoint = pulumi.Output.from_input(c.api_endpoint)
        self.render_dir = pulumi.Output.from_input(str(s.rec(s.render_dir)))
        self.register_outputs(
            {
                "hosts": self.hosts,
                "apiEndpoint": self.api_endpoint,
                "renderDir": self.render_dir,
                "needsReboot": self.needs_reboot,
                **({"kubeconfig": self.kubeconfig_out} if self.kubeconfig_out is not None else {}),
                **({"etcdSnapshot": self.etcd_snapshot} if self.etcd_snapshot is not None else {}),
            }
        )
