"""K3s agents that leave the cluster or come back reinstalled; hosts that leave the plans.

- **An agent leaves** (``agent_leaves``): cordon, drain (``kube.drain``: the Eviction API,
  PodDisruptionBudgets hold, DaemonSet pods stay, ``k3scluster:drainTimeout``), stop its
  container on its host, delete its Node, make sure its ``<node>.node-password.k3s`` secret
  is gone (the servers keep it; a node that registers again with another password is
  rejected while it exists).
- **An agent host was reinstalled** (``clean_reinstalled_agent``): its agent state holds no
  node password any more, so the agent the deploy starts has a new one: its old Node and
  node-password secret are deleted first. Only on proof: the host answered, the password
  file is not there, and the Node is not Ready (``False`` or ``Unknown``: a reinstalled host
  was down, so its kubelet stopped reporting). A Ready Node is waited for (at most
  ``NODE_DOWN_WAIT``), then refused (``AgentStillReady``): another machine may run an agent
  of that name, or the file went missing on a running host.
- **A host leaves the plans** (``set_token_aside``): after its nodes left, its K3s token is
  moved aside on the host (renamed, not deleted), so its K3s containers, whose units need
  the token (``ConditionPathExists``), stay stopped after a reboot instead of joining again.

The host's side runs through an ``etcdmembers.Runner`` (ssh in ``pulumi up``); the API's
through ``k3scluster.kube`` with the admin credentials. Plain library code: no pulumi.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from k3scluster import kube
from k3scluster.errors import K3sClusterError
from k3scluster.etcdmembers import Runner

AGENT_UNIT = "podman-k3s-agent.service"
# the agent's state on its host (modules/k3s-agent.nix: /etc/rancher/node in the container)
AGENT_STATE = "/var/lib/k3scluster/agent"
NODE_PASSWORD_FILE = f"{AGENT_STATE}/rancher-node/password"
SECRETS_DIR = "/var/lib/k3scluster/secrets"
TOKEN_FILE = f"{SECRETS_DIR}/k3s-token"
# how long a Node still Ready is given to go NotReady before its clean-up is refused: the
# node lifecycle controller marks a Node Unknown once its kubelet has not reported for
# --node-monitor-grace-period (50 s by default since Kubernetes 1.32, nodelifecycle's
# defaults.go), checked every --node-monitor-period (5 s); a little more for the poll
NODE_DOWN_WAIT = 60.0
# the Ready statuses that show the Node's kubelet is not running as a healthy agent
NOT_READY = ("False", "Unknown")
# how often the Node is read and judged again when it changed between the read and the
# deletion (the deletion is conditioned on the resourceVersion read)
DELETE_ATTEMPTS = 3


class AgentStillReady(K3sClusterError):
    """The clean-up of a reinstalled agent refused to delete a Node that stays Ready."""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def stop_agent(run: Runner, host_ip: str, node: str, progress: Callable[[str], None]) -> bool:
    """Stops the host's agent container; False (with a progress line) when the host does
    not answer: a host that is down runs no agent either."""
    proc = run(host_ip, ["systemctl", "stop", AGENT_UNIT])
    if proc.returncode == 0:
        progress(f"{node}: {AGENT_UNIT} stopped on {host_ip}")
        return True
    if proc.returncode == 255:  # ssh itself failed
        progress(f"{node}: {host_ip} does not answer ({_last_line(proc.stderr)}); "
                 "its agent is not running")
        return False
    raise K3sClusterError(
        f"{host_ip}: systemctl stop {AGENT_UNIT} failed: {_last_line(proc.stderr)}",
        hint=f"look at: ssh root@{host_ip} systemctl status {AGENT_UNIT}",
    )


def agent_leaves(
    creds: dict[str, Any],
    server: str,
    node: str,
    host_ip: str,
    run: Runner,
    drain_timeout: float,
    progress: Callable[[str], None],
) -> list[str]:
    """Cordon, drain, stop, delete the Node and its node-password secret (in that order).
    Returns what was done. A Node that is gone already (an earlier run) skips cordon and
    drain; the rest runs again (each part is idempotent)."""
    done: list[str] = []
    # the Node this run cordons and drains, and only that one, is deleted (its uid): one
    # registered since under the same name (the agent came back) is refused, and stays
    uid = kube.node_uid(creds, server, node)
    if uid is None:
        progress(f"{node}: no Node any more; nothing to drain")
    else:
        try:
            kube.cordon(creds, server, node)
            done.append("cordoned")
        except K3sClusterError as err:
            if "not in the cluster" not in err.message:
                raise
            uid = None
            progress(f"{node}: no Node any more; nothing to drain")
        else:
            result = kube.drain(creds, server, node, drain_timeout, progress)
            done.append(f"drained ({len(result.evicted)} pod(s) evicted)")
    if stop_agent(run, host_ip, node, progress):
        done.append("stopped")
    if uid is not None and kube.delete_node(creds, server, node, uid=uid):
        done.append("Node deleted")
    if kube.delete_node_password_secret(creds, server, node):
        done.append("node-password secret deleted")
    progress(f"{node}: left the cluster ({', '.join(done) or 'nothing was left of it'})")
    return done


def has_node_password(run: Runner, host_ip: str) -> bool:
    """Whether the host keeps its agent's node password (proof either way, or an error)."""
    proc = run(
        host_ip,
        ["sh", "-c", f"if [ -s {NODE_PASSWORD_FILE} ]; then echo yes; else echo no; fi"],
    )
    answer = proc.stdout.strip()
    if proc.returncode != 0 or answer not in ("yes", "no"):
        raise K3sClusterError(
            f"cannot read the K3s agent's state on {host_ip}: "
            f"{_last_line(proc.stderr) or f'exit {proc.returncode}'}",
            hint="check that the host is up and accepts your ssh key for root",
        )
    return answer == "yes"


def clean_reinstalled_agent(
    creds: dict[str, Any],
    server: str,
    node: str,
    host_ip: str,
    run: Runner,
    progress: Callable[[str], None],
    wait: float = NODE_DOWN_WAIT,
) -> list[str]:
    """Before the deploy starts ``node``'s agent: when its host has no node password (a
    reinstall, a new disk), the old Node and node-password secret are deleted, so that K3s
    accepts the new agent. Returns what was deleted (nothing when the state is there).

    Proof of target: only a Node that is NotReady or Unknown is deleted, and only as read
    (its uid and resourceVersion preconditions of the deletion: a Node whose kubelet
    reported Ready between the read and the deletion is refused by the API, read again and
    judged again). A Ready one is given ``wait`` seconds to go NotReady (a host reinstalled
    quickly: the controller has not noticed yet), with progress lines; then
    ``AgentStillReady``, naming the node, the host's address and why, and nothing is
    deleted. Raises ``K3sClusterError`` when the API at ``server`` does not answer."""
    if has_node_password(run, host_ip):
        return []
    done = []
    seen = _node_seen(creds, server, node)
    for attempt in range(DELETE_ATTEMPTS):
        if seen.registered and seen.ready_status not in NOT_READY:
            seen = _wait_not_ready(creds, server, node, host_ip, wait, progress)
        if not seen.registered:
            break
        try:  # the Node as judged: one that changed since (Ready again) is judged again
            if kube.delete_node(creds, server, node, uid=seen.uid,
                                resource_version=seen.resource_version):
                done.append(f"old Node deleted (Ready={seen.ready_status})")
            break
        except kube.ChangedSinceRead:
            if attempt == DELETE_ATTEMPTS - 1:
                raise
            progress(f"{node}: its Node changed since it was read (Ready={seen.ready_status}):"
                     " reading it again before anything is deleted")
            was, seen = seen, _node_seen(creds, server, node)
            if seen.registered and seen.uid != was.uid:
                raise K3sClusterError(
                    f"cannot delete node {node}: it is not the one this run read (uid "
                    f"{was.uid}); one of the same name was registered since, and it stays",
                    hint="look at it (kubectl get -o yaml) and run again")
    if kube.delete_node_password_secret(creds, server, node):
        done.append("old node-password secret deleted")
    if done:
        progress(f"{node}: {host_ip} has no agent state (reinstalled): {', '.join(done)}")
    return done


def _node_seen(creds: dict[str, Any], server: str, node: str) -> kube.NodeSeen:
    seen = kube.read_node(creds, server, node)
    if not seen.answered:
        raise K3sClusterError(f"cannot read node {node} at {server}: {seen.check.seen}")
    return seen


def _wait_not_ready(
    creds: dict[str, Any], server: str, node: str, host_ip: str, wait: float,
    progress: Callable[[str], None],
) -> kube.NodeSeen:
    """Node ``node`` once it is NotReady, Unknown or gone; ``AgentStillReady`` when it is
    still Ready (or has no Ready condition) after ``wait`` seconds."""
    last = [_node_seen(creds, server, node)]

    def poll() -> kube.Check:
        last[0] = seen = _node_seen(creds, server, node)
        down = not seen.registered or seen.ready_status in NOT_READY
        return kube.Check(down, seen.check.seen)

    progress(f"{node}: {host_ip} has no agent state, but its Node is not NotReady yet: "
             f"waiting up to {kube.duration(wait)} for it to go NotReady (a reinstalled "
             "host was down)")
    check = kube.wait_until(f"{node}: until NotReady", poll, wait, progress, interval=2.0)
    if not check.ready:
        raise AgentStillReady(
            f"{node}: its Node did not go NotReady ({check.seen}) in {kube.duration(wait)}, "
            f"though {host_ip} has no node password ({NODE_PASSWORD_FILE}): another machine "
            f"may be running an agent named {node}, or the file went missing on a running "
            "host; the Node and its node-password secret are NOT deleted",
            hint=f"if {host_ip} was reinstalled, run `pulumi up` again once `kubectl get node "
            f"{node}` shows NotReady; if another machine runs {node}, stop its agent first; if "
            f"{host_ip} lost the file while running, `kubectl delete node {node}` and `kubectl "
            f"-n kube-system delete secret {kube.node_password_secret(node)}` yourself, then "
            "restart its agent (systemctl restart podman-k3s-agent)",
        )
    return last[0]


def set_token_aside(
    run: Runner, host_ip: str, host: str, stamp: str, progress: Callable[[str], None]
) -> bool:
    """Moves the K3s token aside on a host that left the plans (``k3s-token.left-<stamp>``);
    False when it had none or does not answer."""
    aside = f"{TOKEN_FILE}.left-{stamp}"
    proc = run(
        host_ip,
        ["sh", "-c", (f"if [ -e {TOKEN_FILE} ]; then mv -T -- {TOKEN_FILE} {aside} && "
                      "echo moved; else echo none; fi")],
    )
    if proc.returncode == 255:
        progress(f"{host}: {host_ip} does not answer; its K3s token stays where it is")
        return False
    if proc.returncode != 0:
        raise K3sClusterError(f"{host_ip}: cannot move {TOKEN_FILE} aside: "
                              f"{_last_line(proc.stderr)}")
    moved = proc.stdout.strip() == "moved"
    if moved:
        progress(f"{host}: K3s token moved aside to {aside}: its K3s containers stay stopped")
    return moved
