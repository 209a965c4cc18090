"""The Pulumi program: stack config -> the cluster's plans -> one ``Cluster`` component.

Configuration (namespace ``k3scluster``; see the README, "Operating the cluster"):
``clusterDir`` (required; relative paths are relative to this project), ``colmena``, ``nix``, ``buildIsos``, ``runner``, ``parallel``,
``deployUser``, ``sshIdentity``, ``sshKnownHosts``, ``sshWait``, ``renderDir``, ``waitReady``, ``readyTimeout``,
``kubeconfigPath``, ``runnerProcesses``, ``maxUnavailable``, ``drainTimeout``, ``snapshotBeforeServers``, ``rollback``, ``confirmTimeout``,
``reboot``, ``rebootTimeout``; a VM stack: ``vms`` and ``vmMemory``, ``vmCpus``, ``vmDiskSize``, ``vmAccel``,
``vmNat``, ``vmInstallTimeout``, ``vmBootTimeout``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pulumi

from k3scluster import deployedservers, kube, plans, records, stackpaths
from k3scluster.components import deployed
from k3scluster.components.cluster import Cluster, ClusterArgs
from k3scluster.components.settings import Settings
from k3scluster.components.vm import lab_id_of
from k3scluster.errors import K3sClusterError
from k3scluster.lab import spec as lab
from k3scluster.membership import refuse_unrecorded_changes
from k3scluster.rollback import confirm_timeout_setting
from k3scluster.stackconfig import project_path, stack_layout

PROJECT_DIR = Path(__file__).resolve().parent


def _project_path(raw: str | None) -> Path | None:
    """A file named in the stack config: ``~`` expanded, relative to this project."""
    return project_path(PROJECT_DIR, raw)


def settings_from_config(config: pulumi.Config, stack: str) -> tuple[Path, Settings]:
    # clusterDir, renderDir, colmena, nix, vms: read as `k3scluster build` reads them
    layout = stack_layout(config, stack, PROJECT_DIR)
    cluster_dir, render_dir = layout.cluster_dir, layout.render_dir
    parallel = config.get_int("parallel")
    vm = None
    if layout.vms:

        def number(key: str, default: int) -> int:
            value = config.get_int(key)
            return default if value is None else value

        vm = lab.VmSettings(
            stack=stack,
            lab_dir=lab.lab_dir(render_dir),
            memory_mib=number("vmMemory", lab.DEFAULT_MEMORY_MIB),
            cpus=number("vmCpus", lab.DEFAULT_CPUS),
            disk_gib=number("vmDiskSize", lab.DEFAULT_DISK_GIB),
            accel=config.get("vmAccel") or "auto",
            nat=bool(config.get_bool("vmNat")),
            install_timeout=number("vmInstallTimeout", 3600),
            boot_timeout=number("vmBootTimeout", 600),
        )
    # each path as the stack file writes it: what steps record (stackpaths.py)
    recorded_as = list(layout.recorded_as)
    for key in ("sshIdentity", "sshKnownHosts", "kubeconfigPath"):
        raw = config.get(key)
        local = _project_path(raw)
        if raw and local is not None:
            recorded_as.append((local, raw.strip()))
    wait_ready = config.get_bool("waitReady")
    timeout = config.get("readyTimeout")
    max_unavailable = config.get_int("maxUnavailable")
    drain = config.get("drainTimeout")
    reboot_timeout = config.get("rebootTimeout")
    ssh_wait = config.get("sshWait")
    settings = Settings(
        rollback=config.get_bool("rollback") is not False,
        confirm_timeout=confirm_timeout_setting(config.get("confirmTimeout")),
        render_dir=render_dir,
        project_dir=PROJECT_DIR,
        colmena=layout.colmena,
        nix=layout.nix,
        build_isos=bool(config.get_bool("buildIsos") or False),
        runner=config.get("runner") or "command",
        parallel=4 if parallel is None else parallel,
        deploy_user=config.get("deployUser") or "root",
        ssh_identity=_project_path(config.get("sshIdentity")),
        ssh_known_hosts=_project_path(config.get("sshKnownHosts")),
        ssh_wait=kube.parse_duration(ssh_wait, "k3scluster:sshWait") if ssh_wait else 300.0,
        vm=vm,
        wait_ready=True if wait_ready is None else wait_ready,
        ready_timeout=kube.parse_duration(timeout, "k3scluster:readyTimeout") if timeout else 600.0,
        kubeconfig_path=_project_path(config.get("kubeconfigPath")),
        runner_processes=config.get_int("runnerProcesses"),
        max_unavailable=1 if max_unavailable is None else max_unavailable,
        snapshot_before_servers=config.get_bool("snapshotBeforeServers") is not False,
        drain_timeout=kube.parse_duration(drain, "k3scluster:drainTimeout") if drain else 600.0,
        reboot=(config.get("reboot") or "never").strip(),
        reboot_timeout=(kube.parse_duration(reboot_timeout, "k3scluster:rebootTimeout")
                        if reboot_timeout else 900.0),
        stack=stack,
        recorded_as=tuple(recorded_as),
    )
    return cluster_dir, settings


def main() -> None:
    try:
        cluster_dir, settings = settings_from_config(
            pulumi.Config("k3scluster"), pulumi.get_stack()
        )
        if not cluster_dir.is_dir():
            raise K3sClusterError(
                f"k3scluster:clusterDir {cluster_dir} is not a directory",
                hint="`k3scluster init DIR` creates one; paths are relative to the project",
            )
        cluster, warnings = plans.load_or_raise(cluster_dir)
        for w in warnings:
            pulumi.log.warn(str(w))
        # what this stack's last runs deployed: the order of the update depends on it
        resources = deployed.read_stack_resources(
            deployed.stack_name(pulumi.get_organization(), pulumi.get_project(), pulumi.get_stack())
        )
        steps = records.step_inputs(resources)
        if settings.vm is not None:
            # the lab's identity, kept in the stack's state (a new lab: a new random id)
            vm = dataclasses.replace(
                settings.vm,
                lab_id=lab_id_of(steps),
                recorded_triggers=records.step_triggers(resources),
            )
            settings = dataclasses.replace(settings, vm=vm)
            # refused in preview already, before anything is created (net-up checks again)
            from k3scluster.lab.netcheck import check_machine
            from k3scluster.lab.qemu import require_tools

            check_machine(
                cluster.network.network,
                lab.bridge_name(vm.stack, vm.lab_id),
                lab.link_alias(vm.stack, lab_id=vm.lab_id),
                str(cluster.network.location),
            )
            require_tools(vm.qemu, vm.qemu_img)
            # vmAccel auto is resolved when a VM starts (`ctl vm-up` runs the KVM probe), not
            # here: a preview starts no QEMU, and the probe's answer is not part of the spec
        deployed_hosts = records.deployed_hosts_of(resources)
        # hosts deployed before their deploys recorded them (waitReady false): what the last
        # outputs tell of them, so that a change of who is in the cluster is not left unseen
        refuse_unrecorded_changes(
            cluster, records.unrecorded_hosts(resources, deployed_hosts), deployed_hosts)
        if not pulumi.runtime.is_dry_run():
            # the servers it deployed, for a reinstalled server's deploy to ask (never an
            # input of a step: k3scluster/deployedservers.py)
            deployedservers.write(
                deployedservers.file_for(stackpaths.resolve(settings.render_dir)),
                deployed_hosts)
        versions = records.host_versions(steps, [h.name for h in cluster.hosts], deployed_hosts)
        component = Cluster(
            "cluster",
            ClusterArgs(
                cluster, settings, deployed_hosts, versions=versions,
                digests=records.host_digests(resources),
                last_snapshot=records.last_snapshot(resources, "cluster-etcd-snapshot"),
            ),
        )
    except K3sClusterError as err:
        raise pulumi.RunError(str(err)) from None
    # as the stack file writes it: every operator's preview agrees (README, "Several operators")
    pulumi.export("clusterDir", pulumi.Config("k3scluster").require("clusterDir"))
    pulumi.export("renderDir", component.render_dir)
    pulumi.export("apiEndpoint", component.api_endpoint)
    pulumi.export("hosts", component.hosts)
    pulumi.export("needsReboot", component.needs_reboot)
    if component.etcd_snapshot is not None:
        pulumi.export("etcdSnapshot", component.etcd_snapshot)
    if component.kubeconfig_out is not None:
        pulumi.export("kubeconfig", component.kubeconfig_out)


main()
