"""The cluster's API after a deploy: the kubeconfig, and the health gates' checks.

Plain library code (no pulumi). The client is the real ``kubernetes`` Python client; the
credentials are the admin kubeconfig K3s writes on every server
(``/etc/rancher/k3s/k3s.yaml`` inside the ``k3s-server`` container, which is
:data:`KUBECONFIG_ON_HOST` on the host), read over ssh and kept in memory. Nothing here ever
prints a key: messages carry URLs, node names, HTTP status and the API's own check lines.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
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


def rewrite_kubeconfig(text: str, server: str, name: str, where: str = "k3s.yaml") -> str:
    """K3s's admin kubeconfig pointed at ``server``, its cluster, user and context called ``name``.

    K3s writes ``server: https://127.0.0.1:6443`` and names everything ``default``.
    """
    data = parse_kubeconfig(text, where)
    cluster = dict(data["clusters"][0]["cluster"])
    cluster["server"] = server
    user = dict(data["users"][0]["user"])
    out = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
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
            return NodeSeen(Check(False, f"node {node}: API answered {err.status}"))
    except unreachable as err:
        return NodeSeen(Check(False, f"node {node}: {_short_error(err)}"))
    info = obj.status.node_info if obj.status else None
    version = getattr(info, "kubelet_version", None) or None
    for cond in (obj.status.conditions if obj.status else None) or []:
        if cond.type == "Ready":
            if cond.status == "True":
                return NodeSeen(Check(True, f"node {node} Ready"), version, True)
            reason = f" ({cond.reason})" if cond.reason else ""
            return NodeSeen(Check(False, f"node {node} Ready={cond.status}{reason}"), version, True)
    return NodeSeen(Check(False, f"node {node} has no Ready condition yet"), version, True)


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
