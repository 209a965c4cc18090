"""Objects the day-2 tests make in the real API server of tests/kubeapi.py, and waits on it
(tests only; shared by tests/test_kube_drain.py and tests/test_agent_members.py).

Names are unique per call (one API server serves a whole test module); pods are bound
with ``spec.nodeName`` (there is no scheduler), and a namespace is returned only once the
real serviceaccount controller has made its default ServiceAccount, which pod admission
needs.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

_N = itertools.count()


def unique_name(prefix: str) -> str:
    return f"{prefix}-{next(_N)}-{int(time.time() * 1000) % 100000}"


def until(what: str, cond: Any, timeout: float = 30) -> Any:
    """``cond()``'s first true value, asked every 0.2 s; an AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def namespace(core: Any) -> str:
    """A new namespace, once its default ServiceAccount is there."""
    ns = unique_name("ns")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    until("default ServiceAccount", lambda: any(
        sa.metadata.name == "default" for sa in core.list_namespaced_service_account(ns).items))
    return ns


def owner(kind: str, name: str, uid: str = "00000000-0000-0000-0000-000000000001") -> Any:
    """A controller owner reference (apps/v1 ``kind``), as the pod of a controller has."""
    return client.V1OwnerReference(api_version="apps/v1", kind=kind, name=name, uid=uid,
                                   controller=True)


def pod(core: Any, ns: str, node: str, owner: Any = None, *,
        labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        empty_dir: bool = False) -> str:
    """A pod bound to ``node`` (its name)."""
    name = unique_name("pod")
    volumes = [client.V1Volume(name="scratch", empty_dir=client.V1EmptyDirVolumeSource())] \
        if empty_dir else None
    core.create_namespaced_pod(ns, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels, annotations=annotations,
                                     owner_references=[owner] if owner else None),
        spec=client.V1PodSpec(node_name=node, volumes=volumes,
                              containers=[client.V1Container(name="c", image="busybox")]),
    ))
    return name


def pod_exists(core: Any, ns: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, ns)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True
