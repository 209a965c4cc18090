"""After a host's deploy: the rolling order, the health gates, the kubeconfig, the drift record.

- **Order**: ``k3scluster.update_plan`` (the init-server's host, then every other server host
  alone, each after the one before it has deployed and passed its gate; then the other hosts).
- **Gates** (``k3scluster:waitReady``, ``k3scluster:readyTimeout``): the deploy step runs
  ``tasks deploy``: colmena, then it waits for the host's K3s server to answer ``/readyz`` on
  its own IP and for the host's agent node to be ``Ready``, with the admin credentials read
  over ssh from the init-server's host; then it reads back ``/run/current-system`` and the K3s
  container units (the drift record; ``pulumi refresh`` reads them again with the ``python``
  runner).
- **kubeconfig**: one step after the init-server's host, secret stdout, a 0600 file.

With ``--continue-on-error`` a failed server host stops the server hosts after it; the other
hosts still wait for the chain to finish (``settled``), then go on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pulumi

from k3scluster import commands, kube
from k3scluster.components.steps import step
from k3scluster.k3s_start import server_order
from k3scluster.membership import Deployed, host_record
from k3scluster.model import Cluster as ClusterModel
from k3scluster.model import K3sType
from k3scluster.probe import units_of


def settled(resources: Sequence[pulumi.Resource]) -> list[pulumi.Input[pulumi.Resource]]:
    """``depends_on`` entries that wait for every resource to finish and keep those that
    succeeded: a failed one (``--continue-on-error``) is left out instead of failing the
    resources that wait (the SDK skips ``None`` entries)."""

    def one(res: pulumi.Resource) -> pulumi.Output[Any]:
        async def ok() -> pulumi.Resource | None:
            try:
                await res.urn.future()
            except Exception:  # noqa: BLE001 - its own failure is reported by the engine
                return None
            return res

        known: asyncio.Future[bool] = asyncio.get_event_loop().create_future()
        known.set_result(True)
        return pulumi.Output(set(), asyncio.ensure_future(ok()), known)

    return [one(r) for r in resources]


def or_none(out: pulumi.Output[Any]) -> pulumi.Output[Any]:
    """``out``, or None when the resource behind it failed (``--continue-on-error``).

    The program must not fail before every resource is registered: the SDK ends it at the
    first failed RPC it awaits, and the component's outputs (awaited last-in, first) hold
    every host's deploy; a failed host would end the program before hosts that wait for it
    with ``settled`` were registered at all. The failure itself is reported by the engine."""

    async def value() -> Any:
        try:
            return await out.future()
        except Exception:  # noqa: BLE001
            return None

    async def known() -> bool:
        try:
            return bool(await out.is_known())
        except Exception:  # noqa: BLE001
            return True

    async def secret() -> bool:
        try:
            return bool(await out.is_secret())
        except Exception:  # noqa: BLE001
            return False

    return pulumi.Output(
        set(),
        asyncio.ensure_future(value()),
        asyncio.ensure_future(known()),
        asyncio.ensure_future(secret()),
    )


# The SDK's dynamic-provider process serves 4 requests at a time (a gRPC server with 4 worker
# threads, pulumi/dynamic/__main__.py), so with one process at most 4 hosts deploy at once.
# The engine starts one process per provider *resource*: explicit `pulumi-python` providers,
# the deploy steps spread over them, lift that to 4 per process (still bounded by
# `pulumi up --parallel`). A resource that moves to another of them shows no change.
WORKERS_PER_PROCESS = 4


def runner_processes(setting: int | None) -> int:
    """How many provider processes the deploy steps use (``k3scluster:runnerProcesses``).

    One unless the stack asks for more: the engine starts every extra process on each preview
    too (a 50-host preview took 5 s with one process and 10 s with 8 on 2 cores), and that broke
    the preview target, while what the extra processes speed up is large parallel deploys."""
    return 1 if setting is None else setting


def runner_pool(
    name: str, runner: str, processes: int, parent: pulumi.Resource
) -> list[pulumi.ProviderResource]:
    """``<name>-runner-<i>``: explicit providers of the python runner ([] for one process, or
    the command runner, whose plugin has no such limit)."""
    if runner != "python" or processes <= 1:
        return []
    return [
        pulumi.ProviderResource(
            "pulumi-python", f"{name}-runner-{i}", {}, pulumi.ResourceOptions(parent=parent)
        )
        for i in range(processes)
    ]


def deploy_argv(
    cluster: ClusterModel,
    host: str,
    colmena_argv: Sequence[str],
    *,
    python: str,
    ssh: commands.SshSettings,
    wait_ready: bool,
    timeout: float,
    render: commands.RenderArgs | None = None,
    deployed: Deployed | None = None,
    drain: str | None = None,
    drain_timeout: float = 600.0,
    stack: str | None = None,
    rollback: bool = True,
    confirm_timeout: float | None = None,
    reboot_timeout: float | None = None,
) -> list[str]:
    """What the host's deploy step runs: ``tasks deploy`` (the render checked, colmena, and
    with ``wait_ready`` the gates; with ``drain`` that agent node drained first when the
    switch would restart it; with ``reboot_timeout`` the host rebooted after its gates when
    its boot entries changed, ``k3scluster.reboot``).

    ``deployed`` (what the stack deployed before): a re-addressed host is deployed through
    its old address. Before colmena the host's K3s nodes are checked for a reinstall
    (``commands.deploy_and_check``: nothing to do on a new cluster or an intact host)."""
    deployed = deployed or Deployed()
    was = deployed.host(host)
    planned = cluster.host(host)
    # the other server hosts, to ask for a stale member (from the plans alone: the argv must
    # not change when the stack's record does, or every host would deploy again)
    others = [h.ip for h in cluster.hosts if h.name != host and cluster.server_on(h.name)]
    h = cluster.host(host)
    nodes = cluster.k3s_on(host)
    servers = server_order(cluster)
    return commands.deploy_and_check(
        python,
        host,
        h.ip,
        colmena_argv,
        ssh,
        timeout=timeout,
        servers=[(n.name, n.ip) for n in nodes if n.type.is_server],
        agents=[n.name for n in nodes if n.type is K3sType.AGENT],
        # every server, the init-server first: the gates ask the next when one is down
        api=[kube.server_url(str(n.ip)) for n in servers],
        credentials_from=list(dict.fromkeys(cluster.host(n.host).ip for n in servers)),
        render=render,
        gates=wait_ready,
        # what the stack knows the host as (k3scluster/membership.py), gates or not: with
        # waitReady false a membership change is refused at preview, never left unseen
        record=json.dumps(host_record(cluster, host), sort_keys=True),
        via=was.ip if was is not None and was.ip != planned.ip else None,
        join_via=others if wait_ready and any(n.type.is_server for n in nodes) else [],
        check_agent_state=wait_ready and any(n.type is K3sType.AGENT for n in nodes),
        drain=drain,
        drain_timeout=drain_timeout,
        stack=stack,
        rollback=rollback,
        confirm_timeout=confirm_timeout,
        reboot_timeout=reboot_timeout,
    )


def read_argv(
    cluster: ClusterModel, host: str, *, python: str, ssh: commands.SshSettings, runner: str
) -> list[str] | None:
    """What ``pulumi refresh`` runs for the host's deploy step (``python`` runner only)."""
    if runner != "python":
        return None
    return commands.observe_host(python, host, cluster.host(host).ip, ssh, units_of(cluster, host))


def kubeconfig_step(
    name: str,
    cluster: ClusterModel,
    *,
    python: str,
    ssh: commands.SshSettings,
    runner: str,
    stack: str,
    path: str,
    after: pulumi.Resource,
    after_digest: pulumi.Input[str],
    parent: pulumi.Resource,
) -> pulumi.CustomResource | None:
    """``<name>-kubeconfig``: reads the admin kubeconfig after the init-server's host is ready."""
    init = cluster.init_server
    if init is None or cluster.api_endpoint is None:
        return None
    from pathlib import Path

    init_ip = cluster.host(init.host).ip
    argv = commands.fetch_kubeconfig(
        python,
        init_ip,
        ssh,
        server=cluster.api_endpoint,
        name=stack,
        out=Path(path),
        # read from another server host when the init-server's cannot be read
        also=[
            ip
            for ip in dict.fromkeys(cluster.host(n.host).ip for n in server_order(cluster))
            if ip != init_ip
        ],
        # a context of its own for each other server (kubectl while the init-server is down)
        other_servers=[(n.name, n.ip) for n in server_order(cluster) if n.name != init.name],
    )
    return step(
        f"{name}-kubeconfig",
        runner=runner,
        host=init.host,
        create=argv,
        update=argv,
        # read again whenever the init-server's host was deployed again
        inputs_digest={"deploy:" + init.host: after_digest, "path": path},
        output_may_hold_secrets=True,
        opts=pulumi.ResourceOptions(parent=parent, depends_on=[after]),
    )
