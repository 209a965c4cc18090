"""Agents leaving and reinstalled through the real engine, against a REAL Kubernetes API.

The hosts are test_health's lab (the example cluster's five hosts, each a real ``sshd`` at its
plan address in the engine's loopback-only namespace) with test_membership_engine's stand-ins
on their PATH (``systemctl``, which logs each call, and each host's own host name). The K3s
API is the real kube-apiserver of tests/kubeapi.py (with etcd and the disruption controller),
started in a namespace of its own at the three server addresses; tests/nsforward.py carries
the engine namespace's connections to those addresses into it unchanged (TLS end to end).
The server hosts hold that API's admin kubeconfig where K3s writes it. The test registers
the agents' Nodes (there is no kubelet: ``KubeAPI.add_node`` stands in for the
registration, ``KubeAPI.kubelet`` for the pods' kubelets) and their node-password secrets.

Each test: a first ``up`` (the deploys record what they deployed), a change, ``pulumi
preview``, ``pulumi up``, and the order of what happened from the stand-ins' logs and what a
hook saw in the API at the moment of the agent's stop or of colmena's switch.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from test_health import ROOT, SERVERS, Lab, Project, _text, system_path
from test_membership_engine import _drop_rows, _first_up, _preview_text, host_standins

from k3scluster import agentmembers, kube

pytestmark = [pytest.mark.integration, pytest.mark.root]

AGENT_NODES = ("olaf-k3s-agent", "ulf-k3s-agent", "karl-k3s-agent")
SERVER_IPS = tuple(ip for _name, ip in SERVERS.values())
# what a hook sees in the API: the agent's Node (and whether cordoned), its pods and secret
SEEN = """
import json, sys, time
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
kubeconfig, node, out = sys.argv[1:4]
config.load_kube_config_from_dict(json.load(open(kubeconfig)))
core = client.CoreV1Api()
def read(f):
    try:
        return f()
    except ApiException as err:
        if err.status == 404:
            return None
        raise
n = read(lambda: core.read_node(node))
pods = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=" + node).items
seen = {"t": time.time(), "node": n is not None, "uid": n.metadata.uid if n else None,
        "cordoned": bool(n and n.spec.unschedulable),
        "pods": sorted(p.metadata.name for p in pods if not p.metadata.deletion_timestamp),
        "secret": read(lambda: core.read_namespaced_secret(node + ".node-password.k3s",
                                                           "kube-system")) is not None}
with open(out, "a") as f:
    f.write(json.dumps(seen) + "\\n")
"""
# colmena's switch of the reinstalled host: what the API holds then; then the new agent
# registers (it stands in for that agent's kubelet, so the deploy's gate sees it Ready, and
# for the server that keeps its new node password)
REGISTER = """
import json, os, subprocess, sys, time
from kubernetes import client, config
kubeconfig, node, out, host = sys.argv[1:5]
if os.environ.get("COLMENA_HOST") != host:
    sys.exit(0)
subprocess.run([sys.executable, sys.argv[5], kubeconfig, node, out], check=True)
config.load_kube_config_from_dict(json.load(open(kubeconfig)))
core = client.CoreV1Api()
core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))
now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
core.patch_node_status(node, {"status": {"conditions": [{"type": "Ready", "status": "True",
    "reason": "KubeletReady", "lastHeartbeatTime": now, "lastTransitionTime": now}]}})
core.create_namespaced_secret("kube-system", client.V1Secret(
    metadata=client.V1ObjectMeta(name=node + ".node-password.k3s"),
    string_data={"hash": "the new agent's"}, type="k3s.cattle.io/node-password"))
"""


class ApiLab(Lab):
    """test_health's lab with the real API (``api``) at the server addresses."""

    def __init__(self, base: Path, api: Any) -> None:
        super().__init__(base)
        self.api = api
        for host in SERVERS:
            kc = self.hosts[host] / "var-lib" / kube.KUBECONFIG_ON_HOST.removeprefix("/var/lib/")
            kc.write_text(api.k3s_yaml)
        self.kubeconfig = self.dir / "admin.json"
        self.kubeconfig.write_text(json.dumps(api.kubeconfig))
        self.kubeconfig.chmod(0o600)
        self.seen_file = self.dir / "seen.jsonl"
        self.seen_script = self.dir / "seen.py"
        self.seen_script.write_text(SEEN)

    def api_start(self, ready: Path) -> str:
        q = shlex.quote
        return (f"{q(sys.executable)} {q(str(ROOT / 'tests' / 'nsforward.py'))} "
                f"--into {q(str(self.api.ns.path))} --port 6443 "
                + " ".join(f"--listen {ip}" for ip in SERVER_IPS)
                + f" --ready-file {q(str(ready))} &")

    def seen(self) -> list[dict[str, Any]]:
        f = self.seen_file
        return [json.loads(ln) for ln in f.read_text().splitlines()] if f.exists() else []

    def hook_argv(self, node: str) -> list[str]:
        return [sys.executable, str(self.seen_script), str(self.kubeconfig), node,
                str(self.seen_file)]

    def calls(self) -> list[tuple[float, str, str]]:
        log = self.dir / "container.log"
        out = []
        for line in log.read_text().splitlines() if log.exists() else []:
            t, host, rest = line.split(" ", 2)
            out.append((float(t), host, rest))
        return out


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import kubeapi
    from engine import netns_available, require_engine

    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a loopback-only network namespace")
    work = tmp_path_factory.mktemp("kube")
    a = kubeapi.start(work, addresses=SERVER_IPS)
    try:
        yield a
    finally:
        a.stop()
        kubeapi.cleanup_dir(work)


def _there(read: Any) -> Any:
    try:
        return read()
    except ApiException as err:
        if err.status == 404:
            return None
        raise


@pytest.fixture
def lab(api: Any, tmp_path: Path) -> Iterator[ApiLab]:
    """The lab, the agents' Nodes registered Ready with their node-password secrets."""
    with api.ns.entered():
        core = api.core()
        for node in AGENT_NODES:  # a fresh cluster for each test (the API is the module's)
            if _there(lambda node=node: core.read_node(node)) is not None:
                core.delete_node(node)
            if _there(lambda node=node: core.read_namespaced_secret(
                    kube.node_password_secret(node), "kube-system")) is not None:
                core.delete_namespaced_secret(kube.node_password_secret(node), "kube-system")
        for node in AGENT_NODES:
            end = time.monotonic() + 30
            while _there(lambda node=node: core.read_node(node)) is not None:
                assert time.monotonic() < end, f"{node} not deleted"
                time.sleep(0.2)
            api.add_node(node, ready=True)
            core.create_namespaced_secret("kube-system", client.V1Secret(
                metadata=client.V1ObjectMeta(name=kube.node_password_secret(node)),
                string_data={"hash": "stand-in"}, type="k3s.cattle.io/node-password"))
    lab = ApiLab(tmp_path, api)
    host_standins(lab, tmp_path)
    yield lab


def _workload(api: Any, node: str) -> tuple[str, str, str]:
    """A namespace with a ReplicaSet's pod and a DaemonSet's pod on ``node``."""
    core, apps = api.core(), client.AppsV1Api(api.api_client())
    ns = f"work-{int(time.time() * 1000) % 1000000}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    end = time.monotonic() + 30
    while not any(sa.metadata.name == "default"
                  for sa in core.list_namespaced_service_account(ns).items):
        assert time.monotonic() < end, "no default ServiceAccount"
        time.sleep(0.2)
    sel = {"app": "logs"}
    container = [client.V1Container(name="c", image="busybox")]
    ds = apps.create_namespaced_daemon_set(ns, client.V1DaemonSet(
        metadata=client.V1ObjectMeta(name="logs"),
        spec=client.V1DaemonSetSpec(
            selector=client.V1LabelSelector(match_labels=sel),
            template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=sel),
                                              spec=client.V1PodSpec(containers=container)))))
    owners = {
        "web": client.V1OwnerReference(api_version="apps/v1", kind="ReplicaSet", name="web",
                                       uid="00000000-0000-0000-0000-000000000001",
                                       controller=True),
        "logs": client.V1OwnerReference(api_version="apps/v1", kind="DaemonSet", name="logs",
                                        uid=ds.metadata.uid, controller=True),
    }
    for name, owner in owners.items():
        core.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name=f"{name}-0", labels=sel if name == "logs" else None,
                                         owner_references=[owner]),
            spec=client.V1PodSpec(node_name=node, containers=container)))
    return ns, "web-0", "logs-0"


def test_an_agent_host_reinstalled_then_the_agent_leaving(lab: ApiLab, tmp_path: Path) -> None:
    # one first up for both (each engine run costs): the reinstall, then the agent leaves
    node = "karl-k3s-agent"
    p = Project(tmp_path, lab)
    _first_up(p)
    _reinstalled(lab, p, node)
    _leaves(lab, p, node)


def _reinstalled(lab: ApiLab, p: Project, node: str) -> None:
    """karl is reinstalled: its old Node and node-password secret are deleted before the
    deploy's switch starts its new agent (and only then)."""
    api = lab.api
    with api.ns.entered():
        old = api.core().read_node(node).metadata.uid
        api.set_node_status(node, ready=False)  # the host was down while it was reinstalled
    # karl comes back from its stick: another system, no agent state (no node password)
    password = lab.hosts["karl"] / "var-lib" / agentmembers.NODE_PASSWORD_FILE.removeprefix(
        "/var/lib/")
    password.unlink()
    lab.repoint("karl", system_path("karl", 1))
    r = p.pulumi("refresh", "--yes")
    assert r.returncode == 0, _text(r)[-4000:]
    assert p.preview() == {"karl-deploy": "update"}

    register = lab.dir / "register.py"
    register.write_text(REGISTER)
    on_switch = [sys.executable, str(register), str(lab.kubeconfig), node, str(lab.seen_file),
                 "karl", str(lab.seen_script)]
    t0 = time.time()
    r = p.up(env={"COLMENA_ON_SWITCH": json.dumps(on_switch)})
    # at colmena's switch of karl (which starts the new agent) the old Node and its
    # node-password secret were gone already
    (at_switch,) = lab.seen()
    assert at_switch["t"] > t0
    assert at_switch["node"] is False and at_switch["secret"] is False, _text(r)[-3000:]
    assert r.returncode == 0, _text(r)[-6000:]
    assert [c["hosts"] for c in p.colmena_calls()
            if c["start"] > t0 and c["argv"][1] == "switch"] == [["karl"]]
    assert (f"{node}: 10.0.100.5 has no agent state (reinstalled): old Node deleted "
            "(Ready=False), old node-password secret deleted") in _text(r)
    with api.ns.entered():  # the new agent's Node and secret (made at the switch) stay
        new = api.core().read_node(node)
        assert _there(lambda: api.core().read_namespaced_secret(
            kube.node_password_secret(node), "kube-system")) is not None
    assert new.metadata.uid != old
    password.write_text("the new agent's node password\n")  # what its agent wrote


def _leaves(lab: ApiLab, p: Project, node: str) -> None:
    """karl's agent row goes: cordoned, drained, stopped, then its Node and secret deleted."""
    api = lab.api
    # the agent's stop runs the hook: what the API shows at that moment
    hook = lab.dir / "on-agent-stop"
    hook.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in lab.hook_argv(node))
                    + "\n")
    hook.chmod(0o755)
    with api.ns.entered():
        ns, web, logs = _workload(api, node)
        uid = api.core().read_node(node).metadata.uid

    _drop_rows(p, node)
    ops = p.preview()
    assert ops["karl-k3s-agent-leaves-cluster"] == "create"
    text = _preview_text(p)
    assert ("karl-k3s-agent (agent on karl) leaves: its row left plans/k3s.csv; it is "
            "cordoned, drained, stopped, and its Node and node-password secret are deleted"
            ) in text

    t0 = time.time()
    with api.kubelet():  # the pods' kubelet: evicted pods go once terminating
        r = p.up()
    assert r.returncode == 0, _text(r)[-6000:]
    # the agent was stopped on karl, once, before any host of this run deployed
    stops = [(t, h) for t, h, rest in lab.calls()
             if rest == f"systemctl stop {agentmembers.AGENT_UNIT}" and t > t0]
    assert [h for _t, h in stops] == ["karl"]
    assert all(c["start"] > stops[0][0] for c in p.colmena_calls() if c["start"] > t0)
    # at the stop: cordoned and drained (the ReplicaSet's pod evicted, the DaemonSet's left),
    # the Node and its node-password secret still there
    (at_stop,) = [s for s in lab.seen() if s["t"] > t0]
    assert at_stop == {**at_stop, "node": True, "uid": uid, "cordoned": True, "pods": [logs],
                       "secret": True}
    # then the Node and the secret went
    with api.ns.entered():
        core = api.core()
        assert _there(lambda: core.read_node(node)) is None
        assert _there(lambda: core.read_namespaced_secret(kube.node_password_secret(node),
                                                          "kube-system")) is None
        assert _there(lambda: core.read_namespaced_pod(web, ns)) is None
    out = _text(r)
    assert f"drain {node}: evicting 1 pod(s)" in out
    assert (f"{node}: left the cluster (cordoned, drained (1 pod(s) evicted), stopped, "
            "Node deleted, node-password secret deleted)") in out
    # the next run forgets the step (nothing runs again)
    assert p.preview() == {"karl-k3s-agent-leaves-cluster": "delete"}
