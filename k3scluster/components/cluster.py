"""``k3scluster:index:Cluster``: the whole cluster as one component.

Children, in the order they run during ``pulumi up``:

1. ``<name>-<host>-hardware`` for each host without ``nixConfigs/<host>.hardware.nix``: reads
   ``/etc/nixos/hardware-configuration.nix`` from the host over ssh into that file;
2. ``<name>-render``: writes the rendered tree (``k3scluster render``) — during ``up`` only,
   so a preview changes nothing on disk; it does not wait for the fetches (a failed fetch
   stops its own host only), each host's deploy does;
3. one ``Host`` per row of hosts.csv, each deploying with colmena in the rolling order of
   ``health.py``: the init-server's host, then each other server host alone, each after the
   one before has passed its health gate, then the rest in parallel;
   ``<name>-kubeconfig`` after the init-server's host (gates on);
4. one ``Secret`` per secret file (digest only) and, under each Host, its ``K3sServer`` /
   ``K3sAgent`` and ``InstallerIso``.

A VM stack (``Settings.vm``) also has a ``Lab`` (``k3scluster.components.vm``): the network
and one VM per host, installed from its ISO; a host's fetch and deploy wait for its VM.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import pulumi

from k3scluster import commands, diagram, installer, render
from k3scluster.components import health
from k3scluster.components.host import Host, HostArgs
from k3scluster.components.iso import InstallerIsoArgs
from k3scluster.components.secret import Secret, SecretArgs
from k3scluster.components.settings import Settings
from k3scluster.components.steps import step
from k3scluster.components.tasks import captured_sha256
from k3scluster.components.vm import make_lab
from k3scluster.lab.spec import planned_macs
from k3scluster.model import Cluster as ClusterModel


@dataclass(frozen=True)
class ClusterArgs:
    cluster: ClusterModel
    settings: Settings


def deploy_order(cluster: ClusterModel) -> list[list[str]]:
    """Host names in deploy groups: each server host alone (the init-server's first), then
    the rest together (``health.rolling_order``)."""
    chain, rest = health.rolling_order(cluster)
    return [*([h] for h in chain), *([rest] if rest else [])]


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
    if s.token is not None:
        with_k3s = tuple(h for h in hosts if cluster.k3s_on(h))
        found[s.token.relpath] = SecretArgs("k3s-token", s.token.relpath, s.token.sha256, with_k3s)
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
        c, s = args.cluster, args.settings
        # a VM stack (k3scluster:vms): its NICs named by their VM's MAC, and a lab (below)
        vm_macs = planned_macs(c, s.vm.stack) if s.vm else None
        files = render.render_files(c, s.render_dir, vm_macs)
        workdir = str(s.project_dir)

        self.secrets = {
            rel: Secret(
                f"{name}-{rel.replace('/', '-')}", sa, pulumi.ResourceOptions(parent=self)
            )
            for rel, sa in _secret_args(c).items()
        }

        # hosts that get a hardware fetch (1. below)
        fetch_hosts = [h.name for h in c.hosts if c.hardware_config(h.name) is None]

        # what hosts/<host>.nix of a host with a fetch step will be once its file exists: the
        # render writes that from then on (until then it imports the file if it exists)
        fetched_files = (
            render.render_files(
                dataclasses.replace(
                    c,
                    nix_configs=tuple(
                        sorted({*c.nix_configs, *(f"{h}.hardware.nix" for h in fetch_hosts)})
                    ),
                ),
                s.render_dir,
                vm_macs,
            )
            if fetch_hosts
            else files
        )

        # 2. the rendered tree, written during `up`
        file_sha = installer.file_digests(files)
        tree = dict(file_sha)
        tree.update({f"fetch:{h}": "nixConfigs/" + h + ".hardware.nix" for h in fetch_hosts})
        # the picture (cluster.svg/.md) re-renders when it changes; no host depends on it
        tree.update(
            {f"picture:{k}": v for k, v in installer.file_digests(diagram.sources(c)).items()}
        )
        render_argv = commands.render_tree(
            s.python, c.root, s.render_dir, s.vm.stack if s.vm else None
        )
        self.render = step(
            f"{name}-render",
            runner=s.runner,
            host="-",
            create=render_argv,
            update=render_argv,
            inputs_digest=tree,
            dir=workdir,
            # not after the fetch steps: a fetch that fails must stop its own host only (a
            # failed dependency fails the registration of everything that depends on it).
            # The rendered tree imports a hardware file that is not there yet once it exists
            # (builtins.pathExists), so the host's deploy, which does wait for its fetch,
            # builds the same system whichever ran first.
            opts=pulumi.ResourceOptions(parent=self),
        )

        # a VM stack's network and VMs, installed from their ISOs, before the normal path
        self.lab = make_lab(self, name, c, s, files, file_sha, self.render)

        # 1. hardware configurations the cluster directory does not have yet
        self.hardware: dict[str, pulumi.CustomResource] = {}
        for h in c.hosts:
            if c.hardware_config(h.name) is not None:
                continue
            out = c.root / "nixConfigs" / f"{h.name}.hardware.nix"
            self.hardware[h.name] = step(
                f"{name}-{h.name}-hardware",
                runner=s.runner,
                host=h.name,
                create=commands.fetch_hardware_config(
                    s.python,
                    s.deploy_user,
                    h.ip,
                    out,
                    identity=s.ssh_identity,
                    known_hosts=s.ssh_known_hosts,
                ),
                dir=workdir,
                triggers=[str(h.ip)],
                opts=pulumi.ResourceOptions(
                    parent=self, depends_on=self.lab.ready(h.name) if self.lab else None
                ),
            )

        # 3. hosts in the rolling order (health.py): each server host after the one before
        # it, the rest after the whole chain has finished (or failed, --continue-on-error)
        hive = s.render_dir / "hive.nix"
        server_url = c.api_endpoint
        self.host_components: dict[str, Host] = {}
        self.kubeconfig: pulumi.CustomResource | None = None
        chain, _rest = health.rolling_order(c)
        waits_for: list[pulumi.Input[pulumi.Resource]] = []
        pool = health.runner_pool(
            name, s.runner, health.runner_processes(s.runner_processes), self
        )
        for group in deploy_order(c):
            if group[0] not in chain:
                waits_for = health.settled([self.host_components[h].deploy for h in chain])
            for hname in group:
                h = c.host(hname)
                inputs: dict[str, pulumi.Input[str]] = dict(render.host_inputs(c, hname, files))
                hw = self.hardware.get(hname)
                if hw is not None:
                    # the file does not exist yet (render gave it the digest of "absent"):
                    # its digest is what the fetch step wrote, so that the next preview,
                    # reading the file, agrees and shows no second change of this host
                    key = f"nixConfig:nixConfigs/{hname}.hardware.nix"
                    absent = str(inputs[key])
                    inputs[key] = hw.stdout.apply(  # type: ignore[attr-defined]
                        lambda out, absent=absent: captured_sha256(out) or absent
                    )
                    # likewise its rendered hosts/<host>.nix: the text that imports the file
                    rel = f"file:hosts/{hname}.nix"
                    before, after = str(inputs[rel]), hashlib.sha256(
                        fetched_files[f"hosts/{hname}.nix"].encode()
                    ).hexdigest()
                    inputs[rel] = hw.stdout.apply(  # type: ignore[attr-defined]
                        lambda out, before=before, after=after: (
                            after if captured_sha256(out) else before
                        )
                    )
                # the installer's rendered files, named like host_inputs names its own
                iso_inputs = {
                    **inputs,
                    **{
                        f"file:{k}": v
                        for k, v in installer.installer_inputs(files, hname, file_sha).items()
                    },
                }
                iso = InstallerIsoArgs(
                    host=hname,
                    inputs=iso_inputs,
                    digest=_digest(iso_inputs),
                    build_argv=(
                        installer.iso_build_argv(s.nix, s.render_dir, hname)
                        if s.build_isos and s.vm is None  # a VM stack's Vm builds it
                        else None
                    ),
                    result_link=str(installer.iso_out_link(s.render_dir, hname)),
                    python=s.python,
                    runner=s.runner,
                    dir=workdir,
                    depends_on=(self.render,),
                )
                host = Host(
                    hname,
                    HostArgs(
                        host=h,
                        nodes=c.k3s_on(hname),
                        inputs=inputs,
                        digest=_digest(inputs),
                        deploy_argv=health.deploy_argv(
                            c,
                            hname,
                            commands.colmena_apply(s.colmena, hive, hname, parallel=s.parallel),
                            python=s.python,
                            ssh=s.ssh,
                            wait_ready=s.wait_ready,
                            timeout=s.ready_timeout,
                        ),
                        read_argv=health.read_argv(
                            c, hname, python=s.python, ssh=s.ssh, runner=s.runner
                        )
                        if s.wait_ready
                        else None,
                        runner=s.runner,
                        dir=workdir,
                        server_url=server_url,
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
                self.host_components[hname] = host
                if hname in chain:
                    waits_for = [host.deploy]
                if s.wait_ready and c.init_server is not None and hname == c.init_server.host:
                    self.kubeconfig = health.kubeconfig_step(
                        name,
                        c,
                        python=s.python,
                        ssh=s.ssh,
                        runner=s.runner,
                        stack=s.stack,
                        path=str(s.kubeconfig_file),
                        after=host.deploy,
                        after_digest=host.args_digest,
                        dir=workdir,
                        parent=self,
                    )

        # One Output over what is known only after up (digests, ISO results); the rest plain.
        pending = {
            f"{hname}/{key}": value
            for hname, host in self.host_components.items()
            for key, value in (
                ("digest", host.digest),
                ("record", host.record),
                ("image", host.installer.image),
                ("sha256", host.installer.sha256),
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
        # the kubeconfig: secret (its stdout is a secret output), None when gates are off
        self.kubeconfig_out: pulumi.Output[str] | None = (
            pulumi.Output.secret(self.kubeconfig.stdout)  # type: ignore[attr-defined]
            if self.kubeconfig is not None
            else None
        )
        self.api_endpoint = pulumi.Output.from_input(c.api_endpoint)
        self.render_dir = pulumi.Output.from_input(str(s.render_dir))
        self.register_outputs(
            {
                "hosts": self.hosts,
                "apiEndpoint": self.api_endpoint,
                "renderDir": self.render_dir,
                **({"kubeconfig": self.kubeconfig_out} if self.kubeconfig_out is not None else {}),
            }
        )

