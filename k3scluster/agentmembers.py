"""K3s agents that leave the cluster or come back reinstalled; hosts that leave the plans.

- **An agent leaves** (``agent_leaves``): cordon, drain (``kube.drain``: the Eviction API,
  PodDisruptionBudgets hold, DaemonSet pods stay, ``k3scluster:drainTimeout``), stop its
  container on its host, delete its Node, make sure its ``<node>.node-password.k3s`` secret
  is gone (the servers keep it; a node that registers again with another password is
  rejected while it exists).
- **An agent host was reinstalled** (``clean_reinstalled_agent``): its agent state holds no
  node password any more, so the agent the deploy starts has a new one: its old Node and
  node-password secret are deleted first. Only on proof: the host answered, and the
  password file is not there.
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
) -> list[str]:
    """Before the deploy starts ``node``'s agent: when its host has no node password (a
    reinstall, a new disk), the old Node and node-password secret are deleted, so that K3s
    accepts the new agent. Returns what was deleted (nothing when the state is there)."""
    if has_node_password(run, host_ip):
        return []
    done = []
    if kube.delete_node(creds, server, node):
        done.append("old Node deleted")
    if kube.delete_node_password_secret(creds, server, node):
        done.append("old node-password secret deleted")
    if done:
        progress(f"{node}: {host_ip} has no agent state (reinstalled): {', '.join(done)}")
    return done


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
