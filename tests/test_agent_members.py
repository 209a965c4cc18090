"""Agents leaving and reinstalled agents (k3scluster/agentmembers.py) against a REAL API server.

The API is the real kube-apiserver with etcd and kube-controller-manager of tests/kubeapi.py
(the ``kube`` fixture: the test's thread inside its network namespace); the test makes the
Nodes, pods (bound with ``spec.nodeName``), a DaemonSet, a PodDisruptionBudget and K3s's
node-password secrets. There is no kubelet: tests/kubeapi.py's stand-in thread makes bound
pods Running and finalizes terminating ones. The agent's host is a ``HostStandIn`` (what
``pulumi up`` runs on it over ssh: ``systemctl stop podman-k3s-agent.service`` and the
node-password check), which records each call together with what the API showed at that
moment, so the order of the steps is checked where it matters.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from kubeobjects import namespace as _namespace
from kubeobjects import owner as _owner
from kubeobjects import pod as _pod
from kubeobjects import pod_exists as _exists
from kubeobjects import unique_name as _name
from kubeobjects import until as _until
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from k3scluster import agentmembers
from k3scluster import kube as kubelib
from k3scluster.errors import K3sClusterError

pytestmark = pytest.mark.root
HOST = "10.0.100.50"  # the agent's host: never contacted, HostStandIn answers for it


def _node_there(core: Any, node: str) -> Any:
    try:
        return core.read_node(node)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def _secret_there(core: Any, node: str) -> bool:
    try:
        core.read_namespaced_secret(kubelib.node_password_secret(node), "kube-system")
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


class HostStandIn:
    """The agent's host as ``pulumi up`` reaches it over ssh (an ``etcdmembers.Runner``):
    answers the node-password check with ``password``, ``systemctl stop`` with success (or
    ssh's exit 255 when ``down``); each call is recorded with ``observe()`` at that moment."""

    def __init__(self, observe: Any, password: bool = True, down: bool = False) -> None:
        self.observe, self.password, self.down = observe, password, down
        self.calls: list[tuple[list[str], Any]] = []

    def __call__(self, ip: str, words: Sequence[str]) -> subprocess.CompletedProcess[str]:
        assert ip == HOST
        words = list(words)
        self.calls.append((words, self.observe()))
        if self.down:
            return subprocess.CompletedProcess(words, 255, "", "ssh: connect to host: timed out")
        if words == ["systemctl", "stop", agentmembers.AGENT_UNIT]:
            return subprocess.CompletedProcess(words, 0, "", "")
        if words[:2] == ["sh", "-c"] and agentmembers.NODE_PASSWORD_FILE in words[2]:
            return subprocess.CompletedProcess(words, 0, "yes\n" if self.password else "no\n", "")
        return subprocess.CompletedProcess(words, 3, "", f"unexpected: {words}")


def _setup(kube: Any) -> tuple[Any, str, str]:
    core = kube.core()
    node = _name("agent")
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))
    core.create_namespaced_secret("kube-system", client.V1Secret(
        metadata=client.V1ObjectMeta(name=kubelib.node_password_secret(node)),
        string_data={"hash": "stand-in"}, type="k3s.cattle.io/node-password"))
    return core, node, _namespace(core)


def test_an_agent_leaves_cordoned_drained_stopped_then_deleted(kube: Any) -> None:
    core, node, ns = _setup(kube)
    apps = client.AppsV1Api(kube.api_client())
    sel = {"app": "logs"}
    ds = apps.create_namespaced_daemon_set(ns, client.V1DaemonSet(
        metadata=client.V1ObjectMeta(name="logs"),
        spec=client.V1DaemonSetSpec(
            selector=client.V1LabelSelector(match_labels=sel),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=sel),
                spec=client.V1PodSpec(containers=[client.V1Container(name="c",
                                                                     image="busybox")])))))
    web = _pod(core, ns, node, _owner("ReplicaSet", "web"))
    logs = _pod(core, ns, node, _owner("DaemonSet", "logs", ds.metadata.uid), labels=sel)

    def observe() -> dict[str, Any]:
        n = _node_there(core, node)
        return {"node": n is not None, "cordoned": bool(n and n.spec.unschedulable),
                "web": _exists(core, ns, web)}

    host = HostStandIn(observe)
    lines: list[str] = []
    with kube.kubelet():
        _until("pods running", lambda: all(
            (core.read_namespaced_pod(p, ns).status.phase == "Running") for p in (web, logs)))
        done = agentmembers.agent_leaves(kube.kubeconfig, kube.server, node, HOST, host,
                                         60, lines.append)
    assert done == ["cordoned", "drained (1 pod(s) evicted)", "stopped", "Node deleted",
                    "node-password secret deleted"]
    # the agent was stopped after the drain (cordoned, its pod gone) and before the Node went
    (stop,) = [obs for w, obs in host.calls if w[:2] == ["systemctl", "stop"]]
    assert stop == {"node": True, "cordoned": True, "web": False}
    assert _node_there(core, node) is None
    assert not _secret_there(core, node)
    # run again (an up that failed after this step): nothing left, nothing fails
    again = agentmembers.agent_leaves(kube.kubeconfig, kube.server, node, HOST, host, 60,
                                      lines.append)
    assert again == ["stopped"]
    assert any(f"{node}: no Node any more" in ln for ln in lines)


def test_a_drain_that_a_pod_disruption_budget_blocks_fails_naming_the_pod(kube: Any) -> None:
    core, node, ns = _setup(kube)
    labels = {"app": "db"}
    db = _pod(core, ns, node, _owner("ReplicaSet", "db"), labels=labels)
    client.PolicyV1Api(kube.api_client()).create_namespaced_pod_disruption_budget(
        ns, client.V1PodDisruptionBudget(
            metadata=client.V1ObjectMeta(name="db"),
            spec=client.V1PodDisruptionBudgetSpec(
                min_available=1, selector=client.V1LabelSelector(match_labels=labels))))
    host = HostStandIn(lambda: None)
    with kube.kubelet():
        _until("db running", lambda: core.read_namespaced_pod(db, ns).status.phase == "Running")
        # the disruption controller has counted the pod: no disruption allowed
        _until("pdb computed", lambda: client.PolicyV1Api(kube.api_client())
               .read_namespaced_pod_disruption_budget("db", ns).status.current_healthy == 1)
        with pytest.raises(K3sClusterError) as err:
            agentmembers.agent_leaves(kube.kubeconfig, kube.server, node, HOST, host, 3,
                                      lambda _: None)
    assert f"{ns}/{db}" in err.value.message and "timed out" in err.value.message
    assert host.calls == []  # never stopped
    assert _node_there(core, node) is not None and _secret_there(core, node)
    assert _exists(core, ns, db)


def _secret(core: Any, node: str) -> None:
    core.create_namespaced_secret("kube-system", client.V1Secret(
        metadata=client.V1ObjectMeta(name=kubelib.node_password_secret(node)),
        string_data={"hash": "stand-in"}, type="k3s.cattle.io/node-password"))


def _set_ready(core: Any, node: str, status: str) -> None:
    """Node ``node``'s Ready condition, as its kubelet (True, False) or the node lifecycle
    controller (Unknown: the kubelet stopped reporting) sets it."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    core.patch_node_status(node, {"status": {"conditions": [{
        "type": "Ready", "status": status, "reason": "test",
        "lastHeartbeatTime": now, "lastTransitionTime": now}]}})


def test_a_reinstalled_agent_host_loses_its_old_node_and_password_secret(kube: Any) -> None:
    core = kube.core()
    node = _name("agent")
    kube.add_node(node, ready=False)  # the reinstalled host was down: its kubelet NotReady
    _secret(core, node)
    lines: list[str] = []
    # its state is there: nothing is deleted
    kept = HostStandIn(lambda: None, password=True)
    assert agentmembers.clean_reinstalled_agent(kube.kubeconfig, kube.server, node, HOST, kept,
                                                lines.append) == []
    assert _node_there(core, node) is not None and _secret_there(core, node)
    # a host that does not answer proves nothing: an error, nothing deleted
    down = HostStandIn(lambda: None, down=True)
    with pytest.raises(K3sClusterError, match="cannot read the K3s agent's state"):
        agentmembers.clean_reinstalled_agent(kube.kubeconfig, kube.server, node, HOST, down,
                                             lines.append)
    assert _node_there(core, node) is not None and _secret_there(core, node)
    # reinstalled: no node password on the host, its old Node NotReady
    empty = HostStandIn(lambda: None, password=False)
    done = agentmembers.clean_reinstalled_agent(kube.kubeconfig, kube.server, node, HOST,
                                                empty, lines.append)
    assert done == ["old Node deleted (Ready=False)", "old node-password secret deleted"]
    assert _node_there(core, node) is None and not _secret_there(core, node)
    assert any("has no agent state (reinstalled)" in ln for ln in lines)
    # a first deploy (no Node yet, no state): nothing to do
    assert agentmembers.clean_reinstalled_agent(kube.kubeconfig, kube.server, node, HOST,
                                                empty, lines.append) == []


def test_a_ready_node_is_never_deleted_as_a_reinstalled_agents(kube: Any) -> None:
    # no node password at the host's address, but the Node is Ready: another machine runs an
    # agent of that name, or the file went missing on a running host. Waited for, refused.
    core = kube.core()
    node = _name("agent")
    kube.add_node(node, ready=True)
    _secret(core, node)
    uid = core.read_node(node).metadata.uid
    lines: list[str] = []
    empty = HostStandIn(lambda: None, password=False)
    with pytest.raises(agentmembers.AgentStillReady) as err:
        agentmembers.clean_reinstalled_agent(kube.kubeconfig, kube.server, node, HOST, empty,
                                             lines.append, wait=3)
    msg = err.value.message
    assert node in msg and HOST in msg and "did not go NotReady" in msg
    assert "another machine may be running an agent named" in msg
    assert "NOT deleted" in msg and f"kubectl get node {node}" in err.value.hint
    assert core.read_node(node).metadata.uid == uid and _secret_there(core, node)
    assert any("waiting up to 3s for it to go NotReady" in ln for ln in lines)
    # a Node with no Ready condition (registered, never reported) is no proof either
    other = _name("agent")
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=other)))
    with pytest.raises(agentmembers.AgentStillReady, match="no Ready condition"):
        agentmembers.clean_reinstalled_agent(kube.kubeconfig, kube.server, other, HOST, empty,
                                             lines.append, wait=1)
    assert _node_there(core, other) is not None


def test_a_ready_node_that_goes_unknown_while_waited_for_is_deleted(kube: Any) -> None:
    # the host was reinstalled quickly: the Node is still Ready when the deploy starts, and
    # goes Unknown (the node lifecycle controller: no heartbeat) during the wait
    core = kube.core()
    node = _name("agent")
    kube.add_node(node, ready=True)
    _secret(core, node)
    lines: list[str] = []

    def goes_unknown() -> None:
        with kube.ns.entered():  # a thread of its own: into the API's namespace too
            _set_ready(kube.core(), node, "Unknown")

    timer = threading.Timer(2.0, goes_unknown)
    timer.start()
    try:
        done = agentmembers.clean_reinstalled_agent(
            kube.kubeconfig, kube.server, node, HOST, HostStandIn(lambda: None, password=False),
            lines.append, wait=30)
    finally:
        timer.cancel()
    assert done == ["old Node deleted (Ready=Unknown)", "old node-password secret deleted"]
    assert _node_there(core, node) is None and not _secret_there(core, node)
    assert any("until NotReady: node" in ln and "Ready=Unknown" in ln for ln in lines)


def test_a_node_ready_again_between_the_read_and_the_delete_is_kept(
    kube: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the race the uid alone does not close: the clean-up reads the Node NotReady, then its
    # kubelet reports Ready (another machine running an agent of that name came back) before
    # the deletion. The deletion is conditioned on the resourceVersion read: the API refuses
    # it, the Node is read again, found Ready, waited for and refused; nothing is deleted.
    core = kube.core()
    node = _name("agent")
    kube.add_node(node, ready=False)
    _secret(core, node)
    uid = core.read_node(node).metadata.uid
    real_read = kubelib.read_node
    reads: list[str | None] = []

    def read_then_ready(*args: Any, **kwargs: Any) -> kubelib.NodeSeen:
        seen = real_read(*args, **kwargs)
        reads.append(seen.ready_status)
        if len(reads) == 1:  # the kubelet reports Ready right after the first read
            _set_ready(core, node, "True")
        return seen

    monkeypatch.setattr(kubelib, "read_node", read_then_ready)
    lines: list[str] = []
    with pytest.raises(agentmembers.AgentStillReady, match="did not go NotReady"):
        agentmembers.clean_reinstalled_agent(
            kube.kubeconfig, kube.server, node, HOST, HostStandIn(lambda: None, password=False),
            lines.append, wait=2)
    assert reads[0] == "False" and "True" in reads[1:]
    kept = _node_there(core, node)
    assert kept is not None and kept.metadata.uid == uid and _secret_there(core, node)
    assert any("changed since it was read" in ln for ln in lines)


def test_an_agent_whose_host_is_down_still_leaves_the_api(kube: Any) -> None:
    core, node, _ns = _setup(kube)
    down = HostStandIn(lambda: None, down=True)
    lines: list[str] = []
    done = agentmembers.agent_leaves(kube.kubeconfig, kube.server, node, HOST, down, 10,
                                     lines.append)
    assert done == ["cordoned", "drained (0 pod(s) evicted)", "Node deleted",
                    "node-password secret deleted"]
    assert any("does not answer" in ln for ln in lines)
    assert _node_there(core, node) is None and not _secret_there(core, node)


def test_a_node_registered_again_meanwhile_is_not_the_one_deleted(kube: Any) -> None:
    # between the drain and the deletion the agent registers again under the same name (it
    # came back before it was stopped): a new Node, which this run never cordoned or drained
    core, node, _ns = _setup(kube)

    def register_again() -> None:
        core.delete_node(node)
        _until("old Node gone", lambda: _node_there(core, node) is None)
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))

    host = HostStandIn(lambda: register_again() if not host.calls else None)
    old = core.read_node(node).metadata.uid
    with pytest.raises(K3sClusterError, match="not the one this run read"):
        agentmembers.agent_leaves(kube.kubeconfig, kube.server, node, HOST, host, 10,
                                  lambda _ln: None)
    new = _node_there(core, node)
    assert new is not None and new.metadata.uid != old
