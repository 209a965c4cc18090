"""A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager.

The binaries are the ones ``scripts/bootstrap-kube`` builds into ``.tools/bin`` from Go modules
(k8s.io/kubernetes v1.35.4, etcd v3.6.16). Everything runs inside a network namespace the test
made (:class:`netns.NetNS`), so the API answers at a plan's own address without anything on the
host network:

- etcd on ``https://127.0.0.1:2379`` (TLS, client certificates required);
- kube-apiserver on ``https://<ip>:6443`` for every address the namespace holds (it binds
  0.0.0.0 inside the namespace), the serving certificate naming those addresses and 127.0.0.1;
  clients authenticate with a client certificate (``O=system:masters``), as K3s's admin does;
- kube-controller-manager with only the ``disruption`` controller (it computes
  PodDisruptionBudget status, which the Eviction API obeys) and the ``serviceaccount``
  controller (it makes each namespace's ``default`` ServiceAccount, which pod admission needs).

The CA and certificates are throwaway ones made with ``openssl`` (:func:`k3sapi.make_pki`).

There is no kubelet. :meth:`KubeAPI.kubelet` starts a thread that **stands in for the
kubelets** of the nodes: it marks each pod bound to a node (``spec.nodeName``) Running and
Ready, and deletes each such pod that is terminating with a grace period of 0, as a kubelet
does once the containers stopped. Without it a pod evicted from a node stays, terminating.

Fixtures (tests/conftest.py):

``kube_api`` (session)
    a :class:`KubeAPI` at ``10.0.100.10`` (the example plan's init server) and ``10.0.100.11``,
    ``10.0.100.12``; started on first use, stopped (process groups killed, namespace removed)
    at the end of the session.
``kube`` (function)
    the same, with the test's thread inside the namespace for the whole test: the
    ``kubernetes`` client and ``k3scluster.kube`` reach ``kube.server`` directly.

The :class:`KubeAPI` object::

    api.ns           the NetNS (api.ns.entered(), api.ns.popen(...), api.ns.addresses)
    api.ip, api.server          "10.0.100.10", "https://10.0.100.10:6443"
    api.kubeconfig   a kubeconfig dict (server api.server, CA, admin client cert): for
                     k3scluster.kube functions and kubernetes.config.load_kube_config_from_dict
    api.k3s_yaml     the same as K3s writes it (server https://127.0.0.1:6443, all "default")
    api.pki          the directory of the CA and certificates (server-ca.crt, client.crt, ...)
    api.core()       a kubernetes CoreV1Api (use it inside the namespace)
    api.kubelet()    context manager: the kubelet stand-in thread runs for the block
    api.add_node(name, ready=True, version="v1.35.4+k3s1", labels=None)
                     a Node as a K3s agent's kubelet registers it (Ready, kubeletVersion);
                     api.set_node_status(name, ready=..., version=...) changes both later

A test that needs other addresses starts its own with :func:`start` (about 10-20 s).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import k3sapi
import yaml
from netns import NetNS, stop

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".tools" / "bin"
BINARIES = ("etcd", "etcdctl", "kube-apiserver", "kube-controller-manager")
ADDRESSES = ("10.0.100.10", "10.0.100.11", "10.0.100.12")
SERVICE_RANGE = "10.43.0.0/16"  # K3s's default service CIDR
START_TIMEOUT = 120.0


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not (BIN / b).is_file()]


def require_binaries(names: Sequence[str] = BINARIES) -> None:
    """Fails (not skips) when the control plane is not built: CI must run these tests."""
    missing = [b for b in names if b in missing_binaries()]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not in .tools/bin: run scripts/bootstrap-kube "
            "(scripts/setup does; cold about 20 min, from the machine cache seconds)"
        )


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def sign(d: Path, name: str, cn: str, ca: str, sans: Sequence[str] = (),
         usage: str = "serverAuth,clientAuth", org: str = "") -> None:
    """``d/name.{key,crt}``: an EC key and a certificate signed by ``d/ca.{crt,key}``."""
    subj = (f"/O={org}" if org else "") + f"/CN={cn}"
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", subj)
    ext = d / f"{name}.ext"
    lines = [f"extendedKeyUsage={usage}"]
    if sans:
        lines.append("subjectAltName=" + ",".join(
            f"IP:{s}" if s[0].isdigit() else f"DNS:{s}" for s in sans))
    ext.write_text("\n".join(lines) + "\n")
    openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.crt"),
            "-CAkey", str(d / f"{ca}.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(ext), "-out", str(d / f"{name}.crt"))
    (d / f"{name}.key").chmod(0o600)


def _make_pki(d: Path, ips: Sequence[str]) -> None:
    k3sapi.make_pki(d, list(ips))  # server-ca, client-ca, server (the API's), client (admin)
    sign(d, "etcd-server", "etcd", "server-ca", ["127.0.0.1", "localhost"])
    sign(d, "etcd-client", "kube-apiserver-etcd-client", "client-ca", usage="clientAuth")
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
            "-out", str(d / "service-account.key"))
    (d / "service-account.key").chmod(0o600)


@dataclass
class KubeAPI:
    ns: NetNS
    ip: str
    pki: Path
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # the addresses its serving certificate names (a test may add others to ``ns`` for hosts of
    # its own; the API answers there too, but TLS verification fails for them)
    served: tuple[str, ...] = ()

    @property
    def server(self) -> str:
        return f"https://{self.ip}:6443"

    @property
    def k3s_yaml(self) -> str:
        return k3sapi.k3s_yaml(self.pki)

    @property
    def kubeconfig(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(self.k3s_yaml)
        data["clusters"][0]["cluster"]["server"] = self.server
        return data

    def api_client(self) -> Any:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config_from_dict(self.kubeconfig, client_configuration=cfg)
        return client.ApiClient(cfg)

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def add_node(self, name: str, *, ready: bool = True, version: str = "v1.35.4+k3s1",
                 labels: dict[str, str] | None = None) -> None:
        """Registers Node ``name`` with a Ready condition and a kubelet version, as a K3s
        agent's kubelet does (it stands in for that registration). Call it inside the
        namespace."""
        from kubernetes import client

        core = self.core()
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels)))
        self.set_node_status(name, ready=ready, version=version)

    def set_node_status(self, name: str, *, ready: bool = True,
                        version: str = "v1.35.4+k3s1") -> None:
        """Node ``name``'s Ready condition and kubelet version, as its kubelet reports them."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        info = {k: "" for k in ("machineID", "systemUUID", "bootID", "kernelVersion",
                                "osImage", "containerRuntimeVersion", "kubeProxyVersion",
                                "operatingSystem", "architecture")}
        info.update(kubeletVersion=version, operatingSystem="linux", architecture="amd64")
        self.core().patch_node_status(name, {"status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                            "reason": "KubeletReady" if ready else "KubeletNotReady",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "nodeInfo": info,
        }})

    def log_tail(self, name: str, lines: int = 30) -> str:
        p = self.logs / f"{name}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""

    @contextlib.contextmanager
    def kubelet(self, interval: float = 0.2) -> Iterator[KubeletStandIn]:
        k = KubeletStandIn(self, interval)
        k.start()
        try:
            yield k
        finally:
            k.stop()

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.procs:
                stop(self.procs.pop(name))
        self.ns.delete()


class KubeletStandIn(threading.Thread):
    """Stands in for the kubelets (there are none): pods bound to a node become Running and
    Ready; terminating pods bound to a node are deleted with grace period 0 (what a kubelet
    does once their containers stopped). Nothing else."""

    def __init__(self, api: KubeAPI, interval: float) -> None:
        super().__init__(daemon=True, name="kubelet-stand-in")
        self.api, self.interval = api, interval
        self._halt = threading.Event()
        self.errors: list[str] = []

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        with self.api.ns.entered():
            core = self.api.core()
            while not self._halt.is_set():
                try:
                    self._step(core)
                except ApiException as err:
                    if err.status not in (404, 409):
                        self.errors.append(f"{err.status} {err.reason}")
                except Exception as err:  # noqa: BLE001 - kept for the test to see
                    self.errors.append(repr(err))
                self._halt.wait(self.interval)

    @staticmethod
    def _step(core: Any) -> None:
        from kubernetes.client.exceptions import ApiException

        for pod in core.list_pod_for_all_namespaces().items:
            if not pod.spec.node_name:
                continue
            md = pod.metadata
            try:
                if md.deletion_timestamp:
                    core.delete_namespaced_pod(md.name, md.namespace, grace_period_seconds=0)
                elif not pod.status or pod.status.phase != "Running":
                    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    core.patch_namespaced_pod_status(md.name, md.namespace, {"status": {
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True",
                                        "lastTransitionTime": now}],
                    }})
            except ApiException as err:
                if err.status not in (404, 409):
                    raise


def _wait_ready(api: KubeAPI, what: str, check: Any, timeout: float) -> None:
    end = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < end:
        for name, proc in api.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{api.log_tail(name)}")
        with api.ns.entered():
            c = check()
        if c.ready:
            return
        seen = c.seen
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s ({seen}):\n"
                       f"{api.log_tail('kube-apiserver')}")


def _kubeconfig_file(api: KubeAPI) -> Path:
    p = api.pki / "admin.kubeconfig"
    cfg = api.kubeconfig
    cfg["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:6443"
    p.write_text(yaml.safe_dump(cfg))
    p.chmod(0o600)
    return p


def start(workdir: Path, addresses: Sequence[str] = ADDRESSES,
          controller_manager: bool = True) -> KubeAPI:
    """etcd, kube-apiserver (and kube-controller-manager) in a new namespace holding
    ``addresses``; the API at the first one. Ready when it returns; ``api.stop()`` ends it."""
    from k3scluster import kube as kubelib

    require_binaries(BINARIES if controller_manager else ("etcd", "kube-apiserver"))
    workdir.mkdir(parents=True, exist_ok=True)
    pki, logs = workdir / "pki", workdir / "logs"
    logs.mkdir(exist_ok=True)
    _make_pki(pki, addresses)
    ns = NetNS.create(addresses)
    api = KubeAPI(ns, addresses[0], pki, logs, served=tuple(addresses))
    try:
        p = str(pki)
        api.procs["etcd"] = ns.popen([
            str(BIN / "etcd"), "--name", "default", "--data-dir", str(workdir / "etcd"),
            "--listen-client-urls", "https://127.0.0.1:2379",
            "--advertise-client-urls", "https://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "default=http://127.0.0.1:2380",
            "--cert-file", f"{p}/etcd-server.crt", "--key-file", f"{p}/etcd-server.key",
            "--client-cert-auth", "--trusted-ca-file", f"{p}/client-ca.crt",
            "--log-level", "warn",
        ], logs / "etcd.log")
        api.procs["kube-apiserver"] = ns.popen([
            str(BIN / "kube-apiserver"),
            "--etcd-servers", "https://127.0.0.1:2379", "--etcd-cafile", f"{p}/server-ca.crt",
            "--etcd-certfile", f"{p}/etcd-client.crt", "--etcd-keyfile", f"{p}/etcd-client.key",
            "--bind-address", "0.0.0.0", "--secure-port", "6443",
            "--advertise-address", api.ip,
            "--tls-cert-file", f"{p}/server.crt", "--tls-private-key-file", f"{p}/server.key",
            "--client-ca-file", f"{p}/client-ca.crt",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", f"{p}/service-account.key",
            "--service-account-signing-key-file", f"{p}/service-account.key",
            "--authorization-mode", "Node,RBAC",
            "--service-cluster-ip-range", SERVICE_RANGE,
            "--cert-dir", str(workdir / "apiserver-certs"),
            "--profiling=false", "--v=1",
        ], logs / "kube-apiserver.log")
        cfg = api.kubeconfig
        _wait_ready(api, "kube-apiserver",
                    lambda: kubelib.check_readyz(cfg, api.server, timeout=5), START_TIMEOUT)
        if controller_manager:
            kc = str(_kubeconfig_file(api))
            api.procs["kube-controller-manager"] = ns.popen([
                str(BIN / "kube-controller-manager"), "--kubeconfig", kc,
                "--authentication-kubeconfig", kc, "--authorization-kubeconfig", kc,
                "--controllers", "disruption,serviceaccount",
                "--leader-elect=false", "--secure-port", "0",
                "--cert-dir", str(workdir / "kcm-certs"), "--v=1",
            ], logs / "kube-controller-manager.log")
    except BaseException:
        api.stop()
        raise
    return api


def cleanup_dir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
