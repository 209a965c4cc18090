"""Look at a running cluster without changing it: what each host runs, what the K3s API says.

Used by ``k3scluster status``. Over ssh it runs only ``readlink /run/current-system`` and
``systemctl is-active`` (the same read ``pulumi refresh`` does, ``tasks.observe``); against
the API only GETs (``/readyz``, ``/version``, one Node each) with the kubeconfig file that
``pulumi up`` wrote. Hosts and nodes are asked in parallel, each with a short timeout (an
ssh session as a whole: ``tasks.SSH_SESSION_FACTOR`` times it); one that does not answer is
reported, never waited for. ssh accepts only host keys known already and writes no known_hosts
file (``SshSettings.remember_host_keys`` False, set by ``stackinfo``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from k3scluster import commands, kube
from k3scluster.components.tasks import AGENT_UNIT, SERVER_UNIT, first_answering, observe
from k3scluster.errors import K3sClusterError
from k3scluster.k3s_start import server_order  # the order status asks the servers in
from k3scluster.model import Cluster, K3sType
from k3scluster.status import NodeState, Observed

SSH_TIMEOUT = 10  # seconds for ssh to connect
API_TIMEOUT = 10.0  # seconds per API request

T = TypeVar("T")


def _parallel(names: Sequence[str], one: Callable[[str], T]) -> dict[str, T]:
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def units_of(cluster: Cluster, host: str) -> list[str]:
    nodes = cluster.k3s_on(host)
    return [
        *([SERVER_UNIT] if any(n.type.is_server for n in nodes) else []),
        *([AGENT_UNIT] if any(n.type is K3sType.AGENT for n in nodes) else []),
    ]


def observe_hosts(
    cluster: Cluster, ssh: commands.SshSettings, timeout: int = SSH_TIMEOUT
) -> dict[str, Observed]:
    """host -> what it runs now (or why it could not be read)."""

    def one(name: str) -> Observed:
        try:
            seen = observe(
                ssh, str(cluster.host(name).ip), units_of(cluster, name), timeout, boot=True
            )
        except K3sClusterError as err:
            return Observed(False, error=str(err).split(": ", 1)[-1].split("\n")[0])
        system = seen.get("system")
        units = seen.get("units")
        reboot = seen.get("reboot")
        return Observed(
            True,
            system=system if isinstance(system, str) else None,
            units=dict(units) if isinstance(units, dict) else {},
            reboot=tuple(str(r) for r in reboot) if isinstance(reboot, list) else None,
        )

    return _parallel([h.name for h in cluster.hosts], one)


def _unknown(cluster: Cluster, seen: str) -> dict[str, NodeState]:
    return {n.name: NodeState(n.name, n.type.value, None, seen) for n in cluster.k3s}


def k3s_nodes(
    cluster: Cluster, kubeconfig: Path | None, timeout: float = API_TIMEOUT
) -> tuple[dict[str, NodeState], list[str]]:
    """node name -> its state in the API, and notes (why nothing could be asked)."""
    if not cluster.k3s:
        return {}, []
    if kubeconfig is None or not kubeconfig.is_file():
        note = (
            f"no kubeconfig at {kubeconfig}: K3s nodes not checked (it is written by "
            "`pulumi up` with k3scluster:waitReady true)"
        )
        return _unknown(cluster, "not checked (no kubeconfig)"), [note]
    try:
        creds = kube.parse_kubeconfig(kubeconfig.read_text(), str(kubeconfig))
    except OSError as err:
        return _unknown(cluster, "not checked"), [f"cannot read {kubeconfig}: {err.strerror}"]
    # an agent's node is asked of the kubeconfig's server, then of every server in turn: one
    # that is down (the init-server's host, say) says nothing about the agent
    configured = str(creds["clusters"][0]["cluster"].get("server") or "")
    apis = list(dict.fromkeys(
        [*([configured] if configured else []),
         *(kube.server_url(str(n.ip)) for n in server_order(cluster))]
    ))

    def one(name: str) -> NodeState:
        node = next(n for n in cluster.k3s if n.name == name)
        if node.type.is_server:
            url = kube.server_url(str(node.ip))
            check = kube.check_readyz(creds, url, timeout)
            version = kube.server_version(creds, url, timeout) if check.ready else None
            return NodeState(name, node.type.value, check.ready, f"{name}: {check.seen}", version)
        got, said = first_answering(
            apis, lambda url: kube.read_node(creds, url, name, timeout)
        )
        if got is None:
            return NodeState(name, node.type.value, None,
                             "not known: no K3s API answered (" + "; ".join(said) + ")")
        return NodeState(name, node.type.value, got.check.ready, got.check.seen, got.version)

    with kube.private_tempdir():
        return _parallel([n.name for n in cluster.k3s], one), []

