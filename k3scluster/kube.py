"""The cluster's API after a deploy: the kubeconfig, the health gates' checks, and day 2.

Plain library code (no pulumi). The client is the real ``kubernetes`` Python client; the
credentials are the admin kubeconfig K3s writes on every server
(``/etc/rancher/k3s/k3s.yaml`` inside the ``k3s-server`` container, which is
:data:`KUBECONFIG_ON_HOST` on the host), read over ssh and kept in memory. Nothing here ever
prints a key: messages carry URLs, node names, HTTP status and the API's own check lines.

Day 2 (each takes ``kubeconfig, server, node``; errors are :class:`K3sClusterError`):

- :func:`cordon` -> True only when the cordon is the caller's (this call, or an earlier run
  of the same stack, by its mark :data:`CORDONED_BY`): uncordon only then; :func:`uncordon`;
  :func:`cordoned_by`, :func:`mark_of`; :func:`forget_stale_mark`;
- :func:`drain` (``timeout``, ``progress``) -> :class:`DrainResult`: ``kubectl drain
  --ignore-daemonsets --delete-emptydir-data`` through the Eviction API, waiting until the
  evicted pods are gone; it does not cordon;
- :func:`delete_node` (``uid``: only that very Node), :func:`delete_node_password_secret`
  (only a secret as K3s makes it) -> False when there was nothing to delete.

Every request ends within :data:`REQUEST_TIMEOUT` s; an API that cannot be reached is a
:class:`K3sClusterError` naming the call and the server.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from k3scluster.errors import K3sClusterError

# NixOS keeps a container's root under /var/lib/nixos-containers/<name> (stateVersion >= 22.05,
# nixos/modules/virtualisation/nixos-containers.nix: stateDirectory); K3s writes its admin
# kubeconfig to /etc/rancher/k3s/k3s.yaml inside it.
KUBECONFIG_IN_CONTAINER = "/etc/rancher/k3s/k3s.yaml"
KUBECONFIG_ON_HOST = "/var/lib/nixos-containers/k3s-server" + KUBECONFIG_IN_CONTAINER
API_PORT = 6443


def server_url(ip: str) -> str:
    return f"https://{ip}:{API_PORT}"


def parse_kubeconfig(text: str, where: str) -> dict[str, Any]:
    """The kubeconfig K3s wrote, checked for the one cluster and user it always has."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise K3sClusterError(f"{where} is not YAML ({type(err).__name__})") from None
    ok = (
        isinstance(data, dict)
        and isinstance(data.get("clusters"), list)
        and len(data["clusters"]) >= 1
        and isinstance(data["clusters"][0].get("cluster"), dict)
        and isinstance(data.get("users"), list)
        and len(data["users"]) >= 1
        and isinstance(data["users"][0].get("user"), dict)
    )
    if not ok:
        raise K3sClusterError(
            f"{where} is not a kubeconfig with a cluster and a user",
            hint="K3s writes it when its server starts; look at the server's log",
        )
    return data  # type: ignore[no-any-return]


def rewrite_kubeconfig(
    text: str,
    server: str,
    name: str,
    where: str = "k3s.yaml",
    others: Sequence[tuple[str, str]] = (),
) -> str:
    """K3s's admin kubeconfig pointed at ``server``, its cluster, user and context called ``name``
    (the current context), and for each ``(node, url)`` of ``others`` (the other K3s servers)
    a cluster and context ``<name>-<node>`` pointed at ``url``, with the same CA and user.

    K3s writes ``server: https://127.0.0.1:6443`` and names everything ``default``. Every
    server's certificate names its own node addresses (k3s pkg/cli/server/server.go adds the
    node IPs to the SANs) and is signed by the one cluster CA, so the same CA data verifies
    each of them: `kubectl --context <name>-<node>` works while the init-server is down.
    """
    data = parse_kubeconfig(text, where)
    ca = dict(data["clusters"][0]["cluster"])
    user = dict(data["users"][0]["user"])
    targets = [(name, server), *((f"{name}-{node}", url) for node, url in others)]
    out = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": n, "cluster": {**ca, "server": url}} for n, url in targets],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": n, "context": {"cluster": n, "user": name}} for n, _ in targets],
        "current-context": name,
        "preferences": {},
    }
    return yaml.safe_dump(out, sort_keys=False)


def secret_values(text: str) -> list[str]:
    """The key material in a kubeconfig, for masking (client key, certificates, token)."""
    try:
        data = yaml.safe_load(text)
        users = data.get("users") or []
    except (yaml.YAMLError, AttributeError):
        return []
    found = []
    for u in users:
        user = (u or {}).get("user") or {}
        for key in ("client-key-data", "client-certificate-data", "token", "password"):
            if isinstance(user.get(key), str):
                found.append(user[key])
    return found


def _client(kubeconfig: dict[str, Any], server: str) -> Any:
    from kubernetes import client, config

    cfg = client.Configuration()
    data = dict(kubeconfig)
    data["clusters"] = [
        {**data["clusters"][0], "cluster": {**data["clusters"][0]["cluster"], "server": server}}
    ]
    config.load_kube_config_from_dict(data, client_configuration=cfg)
    cfg.retries = 0
    return client.ApiClient(cfg)


@dataclass(frozen=True)
class Check:
    """One poll: ready or not, and what was seen (for progress lines and the final error)."""

    ready: bool
    seen: str


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What a poll may meet while the API is not up (yet): an HTTP error status, a refused or
    dropped connection, TLS, a timeout, a kubeconfig the client cannot use. A programming
    error (AttributeError, TypeError, ...) is none of these: it propagates."""
    import urllib3
    from kubernetes.client.exceptions import OpenApiException
    from kubernetes.config.config_exception import ConfigException

    return (OpenApiException, urllib3.exceptions.HTTPError, OSError, ConfigException)


def _short_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    for marker in ("Connection refused", "timed out", "No route to host", "CERTIFICATE_VERIFY"):
        if marker in text:
            return marker.lower() if marker != "CERTIFICATE_VERIFY" else "TLS verify failed"
    return text[:160]


def check_readyz(kubeconfig: dict[str, Any], server: str, timeout: float = 10) -> Check:
    """``GET <server>/readyz?verbose`` with the cluster's credentials."""
    unreachable = _unreachable_errors()
    try:
        api = _client(kubeconfig, server)
        method, url, headers, body, post = api.param_serialize(
            "GET", "/readyz", query_params=[("verbose", "")], auth_settings=["BearerToken"]
        )
        resp = api.call_api(method, url, headers, body, post, _request_timeout=timeout)
        resp.read()
        status, text = resp.status, (resp.data or b"").decode(errors="replace")
    except unreachable as err:  # "not ready yet", shown to the user
        return Check(False, f"/readyz: {_short_error(err)}")
    if status == 200:
        return Check(True, "/readyz 200")
    failed = [ln[3:].split(" ")[0] for ln in text.splitlines() if ln.startswith("[-]")]
    why = f", {', '.join(failed)} not ready" if failed else ""
    return Check(False, f"/readyz {status}{why}")


def check_node_ready(
    kubeconfig: dict[str, Any], server: str, node: str, timeout: float = 10
) -> Check:
    """Is node ``node`` ``Ready`` in the API at ``server``?"""
    return read_node(kubeconfig, server, node, timeout).check


@dataclass(frozen=True)
class NodeSeen:
    """A node as the API shows it: its Ready check, and its kubelet's version when known."""

    check: Check
    version: str | None = None
    registered: bool = False
    # the API at that address answered about the node (False: unreachable, or an error
    # status other than 404: another server may answer)
    answered: bool = True
    # the Node object's uid and its Ready condition's status ("True", "False", "Unknown"; None
    # when it has none yet), when registered
    uid: str | None = None
    ready_status: str | None = None
    # its resourceVersion as read: a deletion conditioned on it is refused once the Node
    # changed since (its kubelet reported Ready again), not only once it was made anew
    resource_version: str | None = None
    # the boot id its kubelet reports (status.nodeInfo.bootID: the machine's
    # /proc/sys/kernel/random/boot_id when the kubelet last posted its status)
    boot_id: str | None = None


def read_node(
    kubeconfig: dict[str, Any], server: str, node: str, timeout: float = 10
) -> NodeSeen:
    """Node ``node`` in the API at ``server``: Ready or not (what was seen), its version."""
    unreachable = _unreachable_errors()
    try:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = _client(kubeconfig, server)
        try:
            obj = client.CoreV1Api(api).read_node(node, _request_timeout=timeout)
        except ApiException as err:
            if err.status == 404:
                return NodeSeen(Check(False, f"node {node} not registered yet"))
            return NodeSeen(Check(False, f"node {node}: API answered {err.status}"), answered=False)
    except unreachable as err:
        return NodeSeen(Check(False, f"node {node}: {_short_error(err)}"), answered=False)
    info = obj.status.node_info if obj.status else None
    version = getattr(info, "kubelet_version", None) or None
    boot = getattr(info, "boot_id", None) or None
    uid = str(obj.metadata.uid) if obj.metadata and obj.metadata.uid else None
    rv = str(obj.metadata.resource_version) if obj.metadata and obj.metadata.resource_version \
        else None
    for cond in (obj.status.conditions if obj.status else None) or []:
        if cond.type == "Ready":
            if cond.status == "True":
                return NodeSeen(Check(True, f"node {node} Ready"), version, True, uid=uid,
                                ready_status="True", resource_version=rv, boot_id=boot)
            reason = f" ({cond.reason})" if cond.reason else ""
            return NodeSeen(Check(False, f"node {node} Ready={cond.status}{reason}"), version,
                            True, uid=uid, ready_status=str(cond.status), resource_version=rv,
                            boot_id=boot)
    return NodeSeen(Check(False, f"node {node} has no Ready condition yet"), version, True,
                    uid=uid, resource_version=rv)


def server_version(kubeconfig: dict[str, Any], server: str, timeout: float = 10) -> str | None:
    """The ``gitVersion`` the API server at ``server`` reports (``GET /version``), or None."""
    unreachable = _unreachable_errors()
    try:
        from kubernetes import client

        info = client.VersionApi(_client(kubeconfig, server)).get_code(_request_timeout=timeout)
    except unreachable:  # unknown is an answer here; readyz says why
        return None
    return getattr(info, "git_version", None) or None


@contextlib.contextmanager
def private_tempdir() -> Iterator[str]:
    """While the kubernetes client runs it writes the credentials' certificates and key to
    temporary files: keep them in a private directory (0700), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="k3scluster-kube-") as private:
        tempfile.tempdir = private
        try:
            yield private
        finally:
            tempfile.tempdir = None


def duration(seconds: float) -> str:
    """``70`` -> ``1m10s``; ``600`` -> ``10m``."""
    s = round(seconds)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s or not (h or m) else ""]
    return "".join(parts)


def parse_duration(text: str, setting: str) -> float:
    """``600``, ``90s``, ``10m``, ``1h30m`` -> seconds."""
    import re

    raw = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        value = float(raw)
    else:
        m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", raw)
        if not raw or not m or not any(m.groups()):
            raise K3sClusterError(
                f"{setting} is {raw!r}; it must be a duration like 600, 90s, 10m or 1h30m",
                hint=f"pulumi config set {setting} 10m",
            )
        h, mi, s = (int(g or 0) for g in m.groups())
        value = float(h * 3600 + mi * 60 + s)
    if value <= 0:
        raise K3sClusterError(f"{setting} must be more than 0", hint=f"pulumi config set {setting} 10m")
    return value


def wait_until(
    what: str,
    poll: Callable[[], Check],
    timeout: float,
    progress: Callable[[str], None],
    *,
    interval: float = 2.0,
    report_every: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Check:
    """Poll until ready or ``timeout`` seconds passed; a progress line at most every
    ``report_every`` seconds (and whenever what is seen changes). Returns the last check."""
    start = clock()
    last_seen, last_report = "", -report_every
    while True:
        check = poll()
        elapsed = clock() - start
        if check.ready:
            progress(f"{what}: {check.seen} after {duration(elapsed)}")
            return check
        if check.seen != last_seen or elapsed - last_report >= report_every:
            progress(f"{what}: {check.seen} ({duration(elapsed)} of {duration(timeout)})")
            last_seen, last_report = check.seen, elapsed
        if elapsed >= timeout:
            return check
        sleep(min(interval, max(0.0, timeout - elapsed)) or interval)


# --- day 2: cordon, drain, delete (the rules of `kubectl drain`, k8s.io/kubectl pkg/drain) ---
DRAIN_RETRY_DELAY = 5.0  # kubectl drain's EvictErrorRetryDelay
MIRROR_POD_ANNOTATION = "kubernetes.io/config.mirror"
NODE_PASSWORD_NAMESPACE = "kube-system"
# What K3s gives a node-password secret (k3s pkg/nodepassword): the type since the
# node-password controller (older K3s: Opaque) and its one key.
NODE_PASSWORD_TYPES = ("k3s.cattle.io/node-password", "Opaque")
NODE_PASSWORD_KEY = "hash"
# Every request of the day-2 calls ends within this many seconds: an API that accepts a
# connection and never answers fails the call, it does not hang it. Not less than ~12 s: the
# Eviction API itself retries a conflict 20 times 0.5 s before it answers 409
# (kubernetes pkg/registry/core/pod/storage/eviction.go: EvictionsRetry).
REQUEST_TIMEOUT = 30.0


def node_password_secret(node: str) -> str:
    """The secret in which K3s servers keep an agent's node password (k3s pkg/nodepassword)."""
    return f"{node}.node-password.k3s"


def _core(kubeconfig: dict[str, Any], server: str) -> Any:
    from kubernetes import client

    return client.CoreV1Api(_client(kubeconfig, server))


def _api_error(what: str, err: Any) -> K3sClusterError:
    reason = f"{err.status} {err.reason}" if getattr(err, "status", None) else _short_error(err)
    return K3sClusterError(f"{what}: the API answered {reason}")


@contextlib.contextmanager
def _reaching(server: str, what: str) -> Iterator[None]:
    """An API that cannot be reached (refused, timed out, TLS, an unusable kubeconfig)
    becomes a :class:`K3sClusterError` naming ``what`` and ``server``; an HTTP error status
    is the caller's to judge, and a programming error propagates."""
    import urllib3
    from kubernetes.config.config_exception import ConfigException

    try:
        yield
    except (urllib3.exceptions.HTTPError, OSError, ConfigException) as err:
        raise K3sClusterError(
            f"{what}: the API at {server} did not answer ({_short_error(err)})",
            hint="is the server up? look at: k3scluster status",
        ) from None


CORDONED_BY = "k3scluster.io/cordoned-by"  # the stack whose run cordoned the node


def _set_unschedulable(kubeconfig: dict[str, Any], server: str, node: str, value: bool,
                       owner: str | None = None) -> bool:
    """Sets ``spec.unschedulable``; returns whether THIS call changed it (a cordon: or
    whether the node carries ``owner``'s mark, :data:`CORDONED_BY`, from an earlier run of
    the same stack). A cordon with an ``owner`` sets the mark in the same update; an uncordon
    removes it. A missing node is an error. The patch carries the resourceVersion it was
    decided on: when someone else changed the node in between (a cordon by hand), the API
    refuses it (409) and the node is read again, so a change made by someone else is never
    claimed."""
    from kubernetes.client.exceptions import ApiException

    verb = "cordon" if value else "uncordon"
    with _reaching(server, f"cannot {verb} node {node}"):
        core = _core(kubeconfig, server)
        for _ in range(5):
            try:
                obj = core.read_node(node, _request_timeout=REQUEST_TIMEOUT)
                if bool(obj.spec and obj.spec.unschedulable) == value:
                    mark = (obj.metadata.annotations or {}).get(CORDONED_BY)
                    return bool(value and owner is not None and mark == owner)
                meta: dict[str, Any] = {"resourceVersion": obj.metadata.resource_version}
                if owner is not None or not value:
                    meta["annotations"] = {CORDONED_BY: owner if value else None}
                core.patch_node(node, {
                    "metadata": meta,
                    "spec": {"unschedulable": value or None},
                }, _request_timeout=REQUEST_TIMEOUT)
            except ApiException as err:
                if err.status == 409:
                    continue  # changed meanwhile: decide again on what it is now
                if err.status == 404:
                    raise K3sClusterError(
                        f"cannot {verb} node {node}: it is not in the cluster") from None
                raise _api_error(f"cannot {verb} node {node}", err) from None
            return True
    raise K3sClusterError(f"cannot {verb} node {node}: it kept changing while this run "
                          "tried (409 Conflict 5 times)", hint="run again")


def cordon(kubeconfig: dict[str, Any], server: str, node: str, owner: str | None = None) -> bool:
    """Marks ``node`` unschedulable. Returns True only when the cordon is the caller's: THIS
    call cordoned it, or (with ``owner``, the stack) an earlier run of that stack did and
    marked it so (:data:`CORDONED_BY`). A node cordoned by hand (no mark, or another
    stack's) returns False, and the caller must then leave it cordoned (never
    :func:`uncordon` what it did not cordon)."""
    return _set_unschedulable(kubeconfig, server, node, True, owner)


def cordoned_by(kubeconfig: dict[str, Any], server: str, node: str) -> str | None:
    """The stack whose run cordoned ``node`` (its :data:`CORDONED_BY` mark), or None when the
    node is schedulable or was cordoned without the mark (by hand)."""
    mark, cordoned = mark_of(kubeconfig, server, node)
    return mark if cordoned else None


def mark_of(kubeconfig: dict[str, Any], server: str, node: str) -> tuple[str | None, bool]:
    """``node``'s :data:`CORDONED_BY` mark (None: none) and whether it is cordoned, in one
    read; (None, False) for a node that is not registered."""
    from kubernetes.client.exceptions import ApiException

    with _reaching(server, f"cannot read node {node}"):
        try:
            obj = _core(kubeconfig, server).read_node(node, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status == 404:
                return None, False  # not registered: nobody's cordon
            raise _api_error(f"cannot read node {node}", err) from None
    return ((obj.metadata.annotations or {}).get(CORDONED_BY),
            bool(obj.spec and obj.spec.unschedulable))


def forget_stale_mark(kubeconfig: dict[str, Any], server: str, node: str, owner: str) -> bool:
    """Removes ``owner``'s :data:`CORDONED_BY` mark from ``node`` when the node is schedulable:
    someone uncordoned it by hand (``kubectl uncordon`` leaves annotations alone), so the mark
    names a cordon that is gone, and a cordon made by hand later must not look like the
    stack's. Returns whether it removed one; a node that is not there has none. The patch
    carries the resourceVersion it was decided on (a cordon in between: decided again)."""
    from kubernetes.client.exceptions import ApiException

    with _reaching(server, f"cannot read node {node}"):
        core = _core(kubeconfig, server)
        for _ in range(5):
            try:
                obj = core.read_node(node, _request_timeout=REQUEST_TIMEOUT)
                mark = (obj.metadata.annotations or {}).get(CORDONED_BY)
                if mark != owner or (obj.spec and obj.spec.unschedulable):
                    return False
                core.patch_node(node, {"metadata": {
                    "resourceVersion": obj.metadata.resource_version,
                    "annotations": {CORDONED_BY: None},
                }}, _request_timeout=REQUEST_TIMEOUT)
                return True
            except ApiException as err:
                if err.status == 409:
                    continue
                if err.status == 404:
                    return False
                raise _api_error(f"cannot remove the mark of node {node}", err) from None
    return False  # kept changing: the next run looks again


def uncordon(kubeconfig: dict[str, Any], server: str, node: str) -> bool:
    """Marks ``node`` schedulable again and removes this project's mark; returns whether it
    was cordoned."""
    return _set_unschedulable(kubeconfig, server, node, False)


@dataclass(frozen=True)
class DrainResult:
    evicted: list[str]  # namespace/name of each pod evicted (and gone)
    left: list[str]  # DaemonSet and mirror pods, left on the node as kubectl drain leaves them


def _controller_of(pod: Any) -> Any:
    for ref in pod.metadata.owner_references or []:
        if ref.controller:
            return ref
    return None


def _finished(pod: Any) -> bool:
    return bool(pod.status and pod.status.phase in ("Succeeded", "Failed"))


def _classify(apps: Any, pod: Any) -> tuple[str, str]:
    """kubectl drain's pod filters with ``--ignore-daemonsets --delete-emptydir-data`` (and
    without ``--force``), in its order: ``("evict", "")``, ``("leave", why)`` or
    ``("refuse", why)`` (kubectl: an error that stops the drain before it evicts anything)."""
    from kubernetes.client.exceptions import ApiException

    ref = _controller_of(pod)
    daemon = ref is not None and ref.kind == "DaemonSet" and ref.api_version == "apps/v1"
    if daemon and not _finished(pod):
        try:
            apps.read_namespaced_daemon_set(ref.name, pod.metadata.namespace,
                                            _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status == 404:
                return "refuse", f"its DaemonSet {ref.name} is gone"
            return "refuse", f"its DaemonSet {ref.name}: the API answered {err.status}"
        return "leave", "DaemonSet-managed"
    if MIRROR_POD_ANNOTATION in (pod.metadata.annotations or {}):
        return "leave", "mirror pod"
    # Pods with emptyDir volumes are evicted (--delete-emptydir-data): their data goes.
    if not _finished(pod) and ref is None:
        return "refuse", "declares no controller (kubectl drain needs --force for it)"
    return "evict", ""


def _pods_on(core: Any, node: str) -> list[Any]:
    pods: list[Any] = []
    token = None
    while True:
        page = core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={node}", limit=500, _continue=token,
            _request_timeout=REQUEST_TIMEOUT,
        )
        pods.extend(page.items)
        token = page.metadata._continue if page.metadata else None
        if not token:
            return pods


def drain(
    kubeconfig: dict[str, Any],
    server: str,
    node: str,
    timeout: float,
    progress: Callable[[str], None] = lambda _: None,
    *,
    retry_delay: float = DRAIN_RETRY_DELAY,
    poll: float = 1.0,
    report_every: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DrainResult:
    """Evicts the pods on ``node`` as ``kubectl drain --ignore-daemonsets
    --delete-emptydir-data --timeout`` does, and waits until they are gone.

    Does not cordon: call :func:`cordon` first. DaemonSet and mirror pods stay. A pod that
    declares no controller, or whose DaemonSet is gone, stops the drain before anything is
    evicted. Evictions go through the Eviction API, so PodDisruptionBudgets hold: a refused
    eviction (429) is retried every ``retry_delay`` s; when ``timeout`` s have passed, the
    drain fails naming the pods that would not go and why. Each eviction names the pod's
    uid: a pod of the same name made since the listing (a StatefulSet's, on another node)
    is never evicted. Each request ends within :data:`REQUEST_TIMEOUT` s; an API that does
    not answer fails the drain.
    """
    with _reaching(server, f"cannot drain node {node}"):
        return _drain(kubeconfig, server, node, timeout, progress, retry_delay=retry_delay,
                      poll=poll, report_every=report_every, clock=clock, sleep=sleep)


def _drain(
    kubeconfig: dict[str, Any],
    server: str,
    node: str,
    timeout: float,
    progress: Callable[[str], None],
    *,
    retry_delay: float,
    poll: float,
    report_every: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> DrainResult:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = _client(kubeconfig, server)
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    try:
        pods = _pods_on(core, node)
        plan = [(pod, *_classify(apps, pod)) for pod in pods]
    except ApiException as err:
        raise _api_error(f"cannot list the pods on node {node}", err) from None
    refused = [f"{p.metadata.namespace}/{p.metadata.name} ({why})" for p, v, why in plan
               if v == "refuse"]
    if refused:
        raise K3sClusterError(
            f"cannot drain node {node}: {', '.join(refused)}",
            hint="give those pods a controller (a Deployment, StatefulSet, Job...) or delete "
            "them, then run again",
        )
    left = [f"{p.metadata.namespace}/{p.metadata.name}" for p, v, _ in plan if v == "leave"]
    todo = {f"{p.metadata.namespace}/{p.metadata.name}": p for p, v, _ in plan if v == "evict"}
    if not todo:
        progress(f"drain {node}: no pods to evict")
        return DrainResult([], left)
    progress(f"drain {node}: evicting {len(todo)} pod(s): {', '.join(todo)}")
    start = clock()
    blocked: dict[str, str] = {}  # pod -> the API's answer to its last eviction
    evicted: dict[str, Any] = {}  # pod -> its uid at eviction
    gone: list[str] = []
    next_try = start
    last_waiting, last_report = "", 0.0
    while True:
        now = clock()
        if now >= next_try:
            for key, pod in todo.items():
                if key in evicted or key in gone:
                    continue
                answer = _evict(core, pod)
                if answer is None:
                    evicted[key] = pod.metadata.uid
                    blocked.pop(key, None)
                elif answer == "gone":
                    gone.append(key)
                    blocked.pop(key, None)
                else:
                    blocked[key] = answer
            next_try = clock() + retry_delay
        for key, uid in list(evicted.items()):
            if _pod_gone(core, todo[key], uid):
                del evicted[key]
                gone.append(key)
        if len(gone) == len(todo):
            progress(f"drain {node}: {len(gone)} pod(s) evicted after {duration(clock() - start)}")
            return DrainResult(sorted(gone), left)
        elapsed = clock() - start
        if elapsed >= timeout:
            why = [f"{k} (eviction refused: {a})" for k, a in sorted(blocked.items())]
            why += [f"{k} (evicted, still terminating)" for k in sorted(evicted)]
            raise K3sClusterError(
                f"draining node {node} timed out after {duration(timeout)}; pods that did not "
                f"go: {', '.join(why)}",
                hint="a PodDisruptionBudget allows no disruption now (kubectl get pdb -A), or a "
                "pod does not terminate; fix that and run again, or allow the drain more time",
            )
        waiting = ", ".join(sorted(blocked) + sorted(evicted))
        if waiting != last_waiting or elapsed - last_report >= report_every:
            progress(f"drain {node}: waiting on {waiting} ({duration(elapsed)} of "
                     f"{duration(timeout)})")
            last_waiting, last_report = waiting, elapsed
        sleep(max(0.0, min(poll, timeout - elapsed)))


def _evict(core: Any, pod: Any) -> str | None:
    """One eviction of exactly the pod that was listed (its uid a precondition): None
    (accepted), "gone" (that pod is no more: 404, or another pod has its name), else the
    API's refusal to retry (429: a PodDisruptionBudget; 403 in a terminating namespace
    while the pod is not yet deleted). Anything else stops the drain."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    md = pod.metadata
    body = client.V1Eviction(
        api_version="policy/v1", kind="Eviction",
        metadata=client.V1ObjectMeta(name=md.name, namespace=md.namespace),
        delete_options=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=md.uid)),
    )
    try:
        core.create_namespaced_pod_eviction(md.name, md.namespace, body,
                                            _request_timeout=REQUEST_TIMEOUT)
    except ApiException as err:
        if err.status == 404:
            return "gone"
        if err.status == 429:
            return _api_message(err) or "429 Too Many Requests"
        if err.status == 409 or (err.status == 403 and "NamespaceTerminating" in (err.body or "")):
            # 409: the uid precondition failed, or a conflict worth another try; 403: as
            # kubectl, a pod already deleted in a terminating namespace is only waited on.
            now = _current(core, pod)
            if now is None or now.metadata.uid != md.uid:
                return "gone"
            if err.status == 403 and now.metadata.deletion_timestamp:
                return None
            return _api_message(err) or f"{err.status} {err.reason}"
        raise _api_error(f"cannot evict pod {md.namespace}/{md.name}", err) from None
    return None


def _api_message(err: Any) -> str:
    import json

    try:
        return str(json.loads(err.body).get("message") or "")
    except (TypeError, ValueError, AttributeError):
        return ""


def _current(core: Any, pod: Any) -> Any:
    """The pod of that name as the API has it now, or None."""
    from kubernetes.client.exceptions import ApiException

    try:
        return core.read_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                        _request_timeout=REQUEST_TIMEOUT)
    except ApiException as err:
        if err.status == 404:
            return None
        raise _api_error(f"cannot read pod {pod.metadata.namespace}/{pod.metadata.name}",
                         err) from None


def _pod_gone(core: Any, pod: Any, uid: str) -> bool:
    now = _current(core, pod)
    return now is None or bool(now.metadata.uid != uid)


class ChangedSinceRead(K3sClusterError):
    """A deletion conditioned on the resourceVersion read was refused: the object changed
    since (nothing was deleted)."""


def _delete_if_there(what: str, delete: Callable[[Any], Any], uid: str | None,
                     resource_version: str | None = None) -> bool:
    """``delete(options)``; False on 404. With ``uid`` the deletion holds only for that very
    object (a precondition): one made since under the same name is refused, never deleted.
    With ``resource_version`` too, only for the object as it was read: one changed since is
    refused (``ChangedSinceRead``), never deleted."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    options = client.V1DeleteOptions(
        preconditions=client.V1Preconditions(uid=uid, resource_version=resource_version)
        if uid or resource_version else None)
    try:
        delete(options)
    except ApiException as err:
        if err.status == 404:
            return False
        if err.status == 409 and resource_version:
            raise ChangedSinceRead(
                f"cannot delete {what}: it changed since this run read it (resourceVersion "
                f"{resource_version}); nothing was deleted",
                hint="run again: it is read again and judged as it is now") from None
        if err.status == 409 and uid:
            raise K3sClusterError(
                f"cannot delete {what}: it is not the one this run read (uid {uid}); one of "
                "the same name was made since, and it stays",
                hint="look at it (kubectl get -o yaml) and run again") from None
        raise _api_error(f"cannot delete {what}", err) from None
    return True


def node_uid(kubeconfig: dict[str, Any], server: str, node: str) -> str | None:
    """The uid of Node ``node`` (None when there is none): what :func:`delete_node` is then
    told to delete, so a Node registered since under that name is never deleted."""
    from kubernetes.client.exceptions import ApiException

    with _reaching(server, f"cannot read node {node}"):
        core = _core(kubeconfig, server)
        try:
            obj = core.read_node(node, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status == 404:
                return None
            raise _api_error(f"cannot read node {node}", err) from None
        return str(obj.metadata.uid)


def delete_node(kubeconfig: dict[str, Any], server: str, node: str,
                uid: str | None = None, resource_version: str | None = None) -> bool:
    """Deletes the Node object ``node`` (only the one with ``uid`` when given: the Node this
    run cordoned and drained, not one registered since; only as read, when
    ``resource_version`` is given: ``ChangedSinceRead`` once it changed); False when there
    was none."""
    with _reaching(server, f"cannot delete node {node}"):
        core = _core(kubeconfig, server)
        return _delete_if_there(f"node {node}", lambda opts: core.delete_node(
            node, body=opts, _request_timeout=REQUEST_TIMEOUT), uid, resource_version)


def delete_node_password_secret(kubeconfig: dict[str, Any], server: str, node: str) -> bool:
    """Deletes K3s's ``<node>.node-password.k3s`` secret in kube-system, so that a
    reinstalled agent with a new node password is accepted; False when there was none.

    Proof of target: only a secret as K3s makes it (type ``k3s.cattle.io/node-password``,
    or ``Opaque`` from older K3s, holding a ``hash``) is deleted, and only the very one
    read (its uid a precondition); anything else of that name is an error and stays."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = node_password_secret(node)
    what = f"secret {NODE_PASSWORD_NAMESPACE}/{name}"
    with _reaching(server, f"cannot delete {what}"):
        core = _core(kubeconfig, server)
        try:
            secret = core.read_namespaced_secret(name, NODE_PASSWORD_NAMESPACE,
                                                 _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status == 404:
                return False
            raise _api_error(f"cannot read {what}", err) from None
        keys = sorted(secret.data or {})
        if secret.type not in NODE_PASSWORD_TYPES or NODE_PASSWORD_KEY not in keys:
            raise K3sClusterError(
                f"{what} is not a K3s node password (type {secret.type}, keys "
                f"{', '.join(keys) or 'none'}): not deleting it",
                hint=f"K3s keeps an agent's node password in a secret of type "
                f"{NODE_PASSWORD_TYPES[0]} with one key, {NODE_PASSWORD_KEY}; find out what "
                "made this one before you delete it by hand",
            )
        only_this = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=secret.metadata.uid))
        try:
            core.delete_namespaced_secret(name, NODE_PASSWORD_NAMESPACE, body=only_this,
                                          _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status in (404, 409):  # gone, or K3s made a new one since: the old is gone
                return False
            raise _api_error(f"cannot delete {what}", err) from None
        return True
