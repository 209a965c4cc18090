"""k3scluster.kube's day-2 calls against a real kube-apiserver (tests/kubeapi.py).

Cordon, drain through the Eviction API (PodDisruptionBudgets computed by the real disruption
controller in kube-controller-manager), Node and node-password deletion. There is no kubelet:
``kube.kubelet()`` runs the stand-in thread of tests/kubeapi.py (pods bound to a node become
Running and Ready; terminating ones are finalized), and tests that need a pod stuck
terminating run without it.
"""

from __future__ import annotations

import threading
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

from k3scluster import kube as kubelib
from k3scluster.errors import K3sClusterError

pytestmark = pytest.mark.root


def _node(core: Any, unschedulable: bool = False) -> str:
    name = _name("node")
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name),
                                   spec=client.V1NodeSpec(unschedulable=unschedulable or None)))
    return name


def _replicated(core: Any, ns: str, node: str, **kw: Any) -> str:
    return _pod(core, ns, node, owner=_owner("ReplicaSet", "web"), **kw)


def _running(core: Any, ns: str, name: str) -> bool:
    p = core.read_namespaced_pod(name, ns)
    return bool(p.status and p.status.phase == "Running")


def _daemonset(kube: Any, ns: str) -> Any:
    apps = client.AppsV1Api(kube.api_client())
    sel = {"app": "agent"}
    return apps.create_namespaced_daemon_set(ns, client.V1DaemonSet(
        metadata=client.V1ObjectMeta(name="agent"),
        spec=client.V1DaemonSetSpec(
            selector=client.V1LabelSelector(match_labels=sel),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=sel),
                spec=client.V1PodSpec(containers=[client.V1Container(name="c",
                                                                     image="busybox")])),
        ),
    ))


def _pdb(kube: Any, ns: str, labels: dict[str, str], min_available: int) -> str:
    policy = client.PolicyV1Api(kube.api_client())
    name = _name("pdb")
    policy.create_namespaced_pod_disruption_budget(ns, client.V1PodDisruptionBudget(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodDisruptionBudgetSpec(
            min_available=min_available, selector=client.V1LabelSelector(match_labels=labels)),
    ))
    return name


def _pdb_status(kube: Any, ns: str, name: str) -> Any:
    return client.PolicyV1Api(kube.api_client()).read_namespaced_pod_disruption_budget(
        name, ns).status


# --- cordon ------------------------------------------------------------------------------------
def test_cordon_says_whether_this_call_cordoned_and_uncordon_undoes_it(kube: Any) -> None:
    core = kube.core()
    node = _node(core)
    assert kubelib.cordon(kube.kubeconfig, kube.server, node) is True
    assert core.read_node(node).spec.unschedulable is True
    assert kubelib.cordon(kube.kubeconfig, kube.server, node) is False
    assert kubelib.uncordon(kube.kubeconfig, kube.server, node) is True
    assert not core.read_node(node).spec.unschedulable
    assert kubelib.uncordon(kube.kubeconfig, kube.server, node) is False


def test_a_node_cordoned_by_hand_is_not_claimed_and_a_drain_leaves_it_cordoned(kube: Any) -> None:
    core = kube.core()
    node = _node(core, unschedulable=True)
    assert kubelib.cordon(kube.kubeconfig, kube.server, node) is False
    kubelib.drain(kube.kubeconfig, kube.server, node, timeout=10)
    assert core.read_node(node).spec.unschedulable is True


def test_a_cordon_of_the_stack_carries_its_mark_and_a_later_run_of_it_claims_it(
    kube: Any,
) -> None:
    core = kube.core()
    node = _node(core)
    assert kubelib.cordon(kube.kubeconfig, kube.server, node, "prod") is True
    got = core.read_node(node)
    assert got.spec.unschedulable is True
    assert got.metadata.annotations[kubelib.CORDONED_BY] == "prod"
    assert kubelib.cordoned_by(kube.kubeconfig, kube.server, node) == "prod"
    # a later run of the same stack finds its own cordon: it is that run's to undo
    assert kubelib.cordon(kube.kubeconfig, kube.server, node, "prod") is True
    # another stack's run, or a caller without a stack, does not claim it
    assert kubelib.cordon(kube.kubeconfig, kube.server, node, "lab") is False
    assert kubelib.cordon(kube.kubeconfig, kube.server, node) is False
    # uncordon removes the mark with the cordon
    assert kubelib.uncordon(kube.kubeconfig, kube.server, node) is True
    got = core.read_node(node)
    assert not got.spec.unschedulable
    assert kubelib.CORDONED_BY not in (got.metadata.annotations or {})
    assert kubelib.cordoned_by(kube.kubeconfig, kube.server, node) is None


def test_a_hand_cordon_is_never_claimed_by_a_stack(kube: Any) -> None:
    core = kube.core()
    node = _node(core, unschedulable=True)  # kubectl cordon: no mark
    assert kubelib.cordon(kube.kubeconfig, kube.server, node, "prod") is False
    assert kubelib.cordoned_by(kube.kubeconfig, kube.server, node) is None
    assert kubelib.CORDONED_BY not in (core.read_node(node).metadata.annotations or {})


def test_a_stale_mark_is_forgotten_only_on_a_schedulable_node_and_only_its_own(
    kube: Any,
) -> None:
    core = kube.core()
    node = _node(core)
    assert kubelib.cordon(kube.kubeconfig, kube.server, node, "prod") is True
    # still cordoned: the mark is the stack's cordon, kept
    assert kubelib.forget_stale_mark(kube.kubeconfig, kube.server, node, "prod") is False
    assert core.read_node(node).metadata.annotations[kubelib.CORDONED_BY] == "prod"
    core.patch_node(node, {"spec": {"unschedulable": None}})  # kubectl uncordon by hand
    assert kubelib.forget_stale_mark(kube.kubeconfig, kube.server, node, "lab") is False
    assert core.read_node(node).metadata.annotations[kubelib.CORDONED_BY] == "prod"
    assert kubelib.forget_stale_mark(kube.kubeconfig, kube.server, node, "prod") is True
    assert kubelib.CORDONED_BY not in (core.read_node(node).metadata.annotations or {})
    core.patch_node(node, {"spec": {"unschedulable": True}})  # kubectl cordon by hand, later
    assert kubelib.cordon(kube.kubeconfig, kube.server, node, "prod") is False
    assert kubelib.cordoned_by(kube.kubeconfig, kube.server, node) is None
    assert kubelib.forget_stale_mark(kube.kubeconfig, kube.server, "nosuch", "prod") is False


def test_cordon_of_a_node_that_is_not_there_is_a_clear_error(kube: Any) -> None:
    with pytest.raises(K3sClusterError, match="cannot cordon node nosuch: it is not in the"):
        kubelib.cordon(kube.kubeconfig, kube.server, "nosuch")


# --- drain -------------------------------------------------------------------------------------
def test_drain_evicts_what_kubectl_drain_evicts_and_leaves_daemonset_and_mirror_pods(
    kube: Any,
) -> None:
    core = kube.core()
    ns, node, other = _namespace(core), _node(core), _node(core)
    ds = _daemonset(kube, ns)
    web = _replicated(core, ns, node)
    scratch = _replicated(core, ns, node, empty_dir=True)  # --delete-emptydir-data
    agent = _pod(core, ns, node, owner=_owner("DaemonSet", "agent", ds.metadata.uid))
    mirror = _pod(core, ns, node, annotations={kubelib.MIRROR_POD_ANNOTATION: "x"})
    elsewhere = _replicated(core, ns, other)
    lines: list[str] = []
    with kube.kubelet():
        _until("pods running", lambda: all(_running(core, ns, p) for p in (web, scratch, agent)))
        result = kubelib.drain(kube.kubeconfig, kube.server, node, timeout=60,
                               progress=lines.append, retry_delay=0.5, poll=0.2)
    assert result.evicted == sorted([f"{ns}/{web}", f"{ns}/{scratch}"])
    assert sorted(result.left) == sorted([f"{ns}/{agent}", f"{ns}/{mirror}"])
    assert not _exists(core, ns, web) and not _exists(core, ns, scratch)
    assert _exists(core, ns, agent) and _exists(core, ns, mirror)
    assert _exists(core, ns, elsewhere)
    assert any("evicting 2 pod(s)" in ln for ln in lines)


def test_drain_refuses_pods_without_controller_before_evicting_anything(kube: Any) -> None:
    core = kube.core()
    ns, node = _namespace(core), _node(core)
    web = _replicated(core, ns, node)
    bare = _pod(core, ns, node)
    orphan = _pod(core, ns, node, owner=_owner("DaemonSet", "deleted-ds"))
    with pytest.raises(K3sClusterError) as err:
        kubelib.drain(kube.kubeconfig, kube.server, node, timeout=10)
    msg = str(err.value)
    assert f"{ns}/{bare} (declares no controller" in msg
    assert f"{ns}/{orphan} (its DaemonSet deleted-ds is gone)" in msg
    assert web not in msg
    assert _exists(core, ns, web)  # nothing was evicted


def test_a_pod_disruption_budget_blocks_the_drain_until_the_timeout_naming_the_pod(
    kube: Any,
) -> None:
    core = kube.core()
    ns, node = _namespace(core), _node(core)
    labels = {"app": "db"}
    db = _replicated(core, ns, node, labels=labels)
    pdb = _pdb(kube, ns, labels, min_available=1)
    with kube.kubelet():
        _until("the disruption controller counts the pod", lambda: (
            (s := _pdb_status(kube, ns, pdb)) and s.current_healthy == 1
            and s.observed_generation == 1))
        with pytest.raises(K3sClusterError) as err:
            kubelib.drain(kube.kubeconfig, kube.server, node, timeout=3, retry_delay=0.5,
                          poll=0.2)
    msg = str(err.value)
    assert f"draining node {node} timed out after 3s" in msg
    assert f"{ns}/{db} (eviction refused: Cannot evict pod as it would violate the pod's " \
           "disruption budget." in msg
    assert _exists(core, ns, db)


def test_a_refused_eviction_is_retried_until_the_budget_allows_it(kube: Any) -> None:
    core = kube.core()
    ns, node, other = _namespace(core), _node(core), _node(core)
    labels = {"app": "db"}
    db = _replicated(core, ns, node, labels=labels)
    pdb = _pdb(kube, ns, labels, min_available=1)
    lines: list[str] = []
    with kube.kubelet():
        _until("budget computed", lambda: (s := _pdb_status(kube, ns, pdb))
               and s.current_healthy == 1 and s.disruptions_allowed == 0)
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(kubelib.drain(
            kube.kubeconfig, kube.server, node, timeout=60, progress=lines.append,
            retry_delay=0.5, poll=0.2)))
        with kube.ns.entered():  # the thread starts in the test's namespace
            t.start()
        _until("a refused eviction", lambda: any("waiting on" in ln for ln in lines))
        assert t.is_alive()
        assert core.read_namespaced_pod(db, ns).metadata.deletion_timestamp is None  # refused
        _replicated(core, ns, other, labels=labels)  # a second replica: one may go now
        t.join(60)
    assert result and result[0].evicted == [f"{ns}/{db}"]
    assert not _exists(core, ns, db)


def test_drain_waits_until_the_evicted_pods_are_gone(kube: Any) -> None:
    core = kube.core()
    ns, node = _namespace(core), _node(core)
    web = _replicated(core, ns, node)
    core.patch_namespaced_pod_status(web, ns, {"status": {"phase": "Running"}})
    # No kubelet stand-in: the evicted pod stays terminating.
    with pytest.raises(K3sClusterError) as err:
        kubelib.drain(kube.kubeconfig, kube.server, node, timeout=2, poll=0.2)
    assert f"{ns}/{web} (evicted, still terminating)" in str(err.value)
    assert core.read_namespaced_pod(web, ns).metadata.deletion_timestamp is not None
    # Again, with time enough: the drain waits on the terminating pod until a kubelet
    # finishes it, and only then returns.
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(kubelib.drain(
        kube.kubeconfig, kube.server, node, timeout=60, poll=0.2)))
    with kube.ns.entered():
        t.start()
    t.join(2)
    assert t.is_alive() and not result
    with kube.kubelet():
        t.join(60)
    assert result and result[0].evicted == [f"{ns}/{web}"]
    assert not _exists(core, ns, web)


def test_drain_of_an_empty_node_returns_at_once(kube: Any) -> None:
    node = _node(kube.core())
    assert kubelib.drain(kube.kubeconfig, kube.server, node, timeout=1) == kubelib.DrainResult(
        [], [])


# --- deletion ----------------------------------------------------------------------------------
def test_delete_node_and_its_password_secret_and_again_is_fine(kube: Any) -> None:
    core = kube.core()
    node = _node(core)
    secret = f"{node}.node-password.k3s"
    core.create_namespaced_secret("kube-system", client.V1Secret(
        metadata=client.V1ObjectMeta(name=secret), string_data={"hash": "x"}))
    keep = _node(core)
    core.create_namespaced_secret("kube-system", client.V1Secret(
        metadata=client.V1ObjectMeta(name=f"{keep}.node-password.k3s"),
        string_data={"hash": "y"}))
    assert kubelib.delete_node_password_secret(kube.kubeconfig, kube.server, node) is True
    assert kubelib.delete_node(kube.kubeconfig, kube.server, node) is True
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_secret(secret, "kube-system")
    assert gone.value.status == 404
    _until("node gone", lambda: node not in [n.metadata.name for n in core.list_node().items])
    assert kubelib.delete_node_password_secret(kube.kubeconfig, kube.server, node) is False
    assert kubelib.delete_node(kube.kubeconfig, kube.server, node) is False
    core.read_node(keep)
    core.read_namespaced_secret(f"{keep}.node-password.k3s", "kube-system")


# --- proof of target: only the objects this run read ------------------------------------------
def test_cordon_never_claims_a_cordon_made_by_hand_while_it_decided(
    kube: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = kube.core()
    node = _node(core)
    real_read = client.CoreV1Api.read_node
    raced: list[str] = []

    def read_then_someone_cordons(self: Any, name: str, **kw: Any) -> Any:
        obj = real_read(self, name, **kw)
        if not raced:  # between this read and the cordon's patch: kubectl cordon by hand
            raced.append(name)
            core.patch_node(name, {"spec": {"unschedulable": True}})
        return obj

    monkeypatch.setattr(client.CoreV1Api, "read_node", read_then_someone_cordons)
    assert kubelib.cordon(kube.kubeconfig, kube.server, node) is False  # not this run's
    assert raced == [node]
    assert core.read_node(node).spec.unschedulable is True


def test_an_eviction_never_hits_a_pod_made_since_under_the_same_name(
    kube: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = kube.core()
    ns, node, other = _namespace(core), _node(core), _node(core)
    web = _replicated(core, ns, node)
    real_pods_on = kubelib._pods_on

    def listed_then_replaced(c: Any, n: str) -> list[Any]:
        pods = real_pods_on(c, n)
        # after the listing: the pod goes and its controller makes one of the same name on
        # another node (a StatefulSet does exactly this)
        core.delete_namespaced_pod(web, ns, grace_period_seconds=0)
        _until("old pod gone", lambda: not _exists(core, ns, web))
        core.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name=web, owner_references=[_owner("ReplicaSet", "web")]),
            spec=client.V1PodSpec(node_name=other,
                                  containers=[client.V1Container(name="c", image="busybox")])))
        return pods

    monkeypatch.setattr(kubelib, "_pods_on", listed_then_replaced)
    result = kubelib.drain(kube.kubeconfig, kube.server, node, timeout=10, poll=0.2)
    assert result.evicted == [f"{ns}/{web}"]  # the listed pod is gone
    now = core.read_namespaced_pod(web, ns)
    assert now.spec.node_name == other and now.metadata.deletion_timestamp is None


def test_delete_node_with_a_uid_leaves_a_node_registered_since(kube: Any) -> None:
    core = kube.core()
    node = _node(core)
    old = core.read_node(node).metadata.uid
    core.delete_node(node)
    _until("node gone", lambda: node not in [n.metadata.name for n in core.list_node().items])
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))  # re-registered
    with pytest.raises(K3sClusterError, match=f"cannot delete node {node}: it is not the one"):
        kubelib.delete_node(kube.kubeconfig, kube.server, node, uid=old)
    new = core.read_node(node).metadata.uid
    assert new != old
    assert kubelib.delete_node(kube.kubeconfig, kube.server, node, uid=new) is True


def test_only_a_secret_as_k3s_makes_it_is_deleted_as_a_node_password(kube: Any) -> None:
    core = kube.core()
    node, typed = _node(core), _node(core)
    name = kubelib.node_password_secret(node)
    core.create_namespaced_secret("kube-system", client.V1Secret(  # not K3s's: no hash
        metadata=client.V1ObjectMeta(name=name), string_data={"token": "keep me"}))
    with pytest.raises(K3sClusterError, match=f"kube-system/{name} is not a K3s node password "
                       r"\(type Opaque, keys token\): not deleting it"):
        kubelib.delete_node_password_secret(kube.kubeconfig, kube.server, node)
    core.read_namespaced_secret(name, "kube-system")  # still there
    # current K3s: its own secret type
    core.create_namespaced_secret("kube-system", client.V1Secret(
        metadata=client.V1ObjectMeta(name=kubelib.node_password_secret(typed)),
        type="k3s.cattle.io/node-password", string_data={"hash": "$1:x"}))
    assert kubelib.delete_node_password_secret(kube.kubeconfig, kube.server, typed) is True


# --- an API that does not answer --------------------------------------------------------------
def _each_day2_call(kubeconfig: Any, server: str) -> dict[str, Any]:
    return {
        "cordon": lambda: kubelib.cordon(kubeconfig, server, "olaf"),
        "uncordon": lambda: kubelib.uncordon(kubeconfig, server, "olaf"),
        "drain": lambda: kubelib.drain(kubeconfig, server, "olaf", timeout=60),
        "delete_node": lambda: kubelib.delete_node(kubeconfig, server, "olaf"),
        "delete_node_password_secret":
            lambda: kubelib.delete_node_password_secret(kubeconfig, server, "olaf"),
    }


def _outcome(kube: Any, call: Any, within: float) -> Any:
    """What ``call`` raised (inside the test's namespace), or "hangs" when it did not end."""
    got: list[Any] = []

    def run() -> None:
        try:
            got.append(call())
        except BaseException as err:  # noqa: BLE001 - handed to the test
            got.append(err)

    t = threading.Thread(target=run, daemon=True)
    with kube.ns.entered():
        t.start()
    t.join(within)
    return got[0] if got else "hangs"


def test_an_api_that_accepts_and_never_answers_fails_each_call_instead_of_hanging(
    kube: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    monkeypatch.setattr(kubelib, "REQUEST_TIMEOUT", 1.0, raising=False)
    silent = socket.socket()  # in the test's namespace: accepts (backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    server = f"https://127.0.0.1:{silent.getsockname()[1]}"
    try:
        for name, call in _each_day2_call(kube.kubeconfig, server).items():
            err = _outcome(kube, call, within=30)
            assert isinstance(err, K3sClusterError), (name, err)
            assert f"the API at {server} did not answer (" in str(err), (name, err)
    finally:
        silent.close()


def test_an_api_that_refuses_the_connection_is_a_clear_error(kube: Any) -> None:
    server = "https://127.0.0.1:1"  # nothing listens there in the test's namespace
    for name, call in _each_day2_call(kube.kubeconfig, server).items():
        err = _outcome(kube, call, within=30)
        assert isinstance(err, K3sClusterError), (name, err)
        assert f"the API at {server} did not answer (connection refused)" in str(err), name


# --- kubectl's rules for finished pods and terminating namespaces --------------------------
def test_finished_pods_are_evicted_even_without_a_controller(kube: Any) -> None:
    core = kube.core()
    ns, node = _namespace(core), _node(core)
    done = _pod(core, ns, node)  # a bare pod that completed: kubectl drain deletes it
    failed = _pod(core, ns, node, owner=_owner("DaemonSet", "deleted-ds"))
    core.patch_namespaced_pod_status(done, ns, {"status": {"phase": "Succeeded"}})
    core.patch_namespaced_pod_status(failed, ns, {"status": {"phase": "Failed"}})
    result = kubelib.drain(kube.kubeconfig, kube.server, node, timeout=30, poll=0.2)
    assert result.evicted == sorted([f"{ns}/{done}", f"{ns}/{failed}"])
    assert not _exists(core, ns, done) and not _exists(core, ns, failed)


def test_a_pod_in_a_terminating_namespace_is_retried_not_an_error(kube: Any) -> None:
    core = kube.core()
    ns, node = _namespace(core), _node(core)
    web = _replicated(core, ns, node)
    core.delete_namespace(ns)  # the test's controller-manager runs no namespace controller:
    # the namespace stays terminating with its pod not deleted, and the Eviction API answers
    # 403 NamespaceTerminating, which kubectl drain retries
    _until("namespace terminating", lambda: core.read_namespace(ns).status.phase == "Terminating")
    with pytest.raises(K3sClusterError) as err:
        kubelib.drain(kube.kubeconfig, kube.server, node, timeout=2, retry_delay=0.5, poll=0.2)
    assert f"{ns}/{web} (eviction refused: " in str(err.value)
    assert "timed out after 2s" in str(err.value)
