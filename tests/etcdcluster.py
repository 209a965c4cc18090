"""A real three-member etcd cluster with TLS, laid out like K3s's embedded etcd (tests only).

Each member is the real ``etcd`` v3.6.16 from ``.tools/bin`` (``scripts/bootstrap-kube``), in
a network namespace of its own that stands for its server host: ``eth0`` holds the host's
address on a LAN (a bridge in one more namespace), etcd listens for clients on
``https://127.0.0.1:2379`` and ``https://<ip>:2379`` and for peers on ``https://<ip>:2380``, as
K3s starts it. Each member's files are where K3s keeps them, under ``member.root``
(a stand-in for ``/var/lib/rancher/k3s``)::

    server/db/etcd/                        the data dir
    server/tls/etcd/server-ca.crt          the client CA (K3s: one per cluster)
    server/tls/etcd/server-client.{crt,key}  the member's serving certificate
    server/tls/etcd/peer-ca.crt, peer-server-client.{crt,key}
    server/tls/etcd/client.{crt,key}       the client certificate etcdctl uses

Member names are ``<host>-<8 hex digits>``, as K3s names them. Real ``etcdctl`` reaches a
member from inside its namespace at ``https://127.0.0.1:2379`` with the files above, the way
an operator on that server does.

    c = EtcdCluster.launch(tmp_path, {"olaf": "10.0.100.10", "sven": "10.0.100.11",
                                     "erik": "10.0.100.12"})
    c.members()                  # [{"name", "ID" (hex string), "peerURLs", ...}] from etcdctl
    c.etcdctl("olaf", "member", "remove", c.member_id("sven"))   # CompletedProcess
    c.stop("erik")               # kill that member's etcd (its data dir stays)
    c.start("erik")              # start it again on its data dir
    c.wipe("erik")               # stop it and remove its data dir (a reinstalled server)
    c.join("erik", via="olaf")   # `member add` a new erik-<hex> and start it empty
    c.shutdown()                 # every process killed, the namespaces removed

``c.hosts[host]`` is a :class:`Member` (``ns`` its NetNS, ``ip``, ``name``, ``root``,
``tls`` the ``server/tls/etcd`` directory). The fixture ``etcd_cluster`` (tests/conftest.py)
gives one per test, hosts olaf, sven and erik at 10.0.100.10-12.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeapi import BIN, require_binaries, sign
from netns import NetNS, stop

TLS_FILES = ("server-ca.crt", "client.crt", "client.key")


@dataclass
class Member:
    host: str
    ip: str
    ns: NetNS
    root: Path
    name: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def tls(self) -> Path:
        return self.root / "server" / "tls" / "etcd"

    @property
    def data(self) -> Path:
        return self.root / "server" / "db" / "etcd"


class EtcdCluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lan = NetNS.create()
        self.hosts: dict[str, Member] = {}
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # --- setting up ------------------------------------------------------------------------
    @classmethod
    def launch(cls, workdir: Path, hosts: dict[str, str]) -> EtcdCluster:
        require_binaries(("etcd", "etcdctl"))
        c = cls(workdir)
        try:
            ca = workdir / "ca"
            ca.mkdir(parents=True, exist_ok=True)
            for name in ("server-ca", "peer-ca"):
                c._ca(ca, name)
            for host, ip in hosts.items():
                m = Member(host, ip, NetNS.create(), workdir / host)
                c.hosts[host] = m
                c.lan.link(m.ns, ip)
                c._certs(ca, m)
                m.name = f"{host}-{secrets.token_hex(4)}"
            initial = ",".join(f"{m.name}=https://{m.ip}:2380" for m in c.hosts.values())
            for m in c.hosts.values():
                c._run(m, "new", initial)
            for m in c.hosts.values():
                c.wait_healthy(m.host)
        except BaseException:
            c.shutdown()
            raise
        return c

    @staticmethod
    def _ca(d: Path, name: str) -> None:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.crt"),
             "-subj", f"/CN=etcd-{name}@test"], check=True, capture_output=True)

    @staticmethod
    def _certs(ca: Path, m: Member) -> None:
        m.tls.mkdir(parents=True, exist_ok=True)
        for name in ("server-ca", "peer-ca"):
            shutil.copy(ca / f"{name}.crt", m.tls / f"{name}.crt")
            shutil.copy(ca / f"{name}.key", m.tls / f"{name}.key")
        sans = ["127.0.0.1", "localhost", m.ip, m.host]
        sign(m.tls, "server-client", "etcd-server", "server-ca", sans)
        sign(m.tls, "peer-server-client", "etcd-peer", "peer-ca", sans)
        sign(m.tls, "client", "etcd-client", "server-ca", usage="clientAuth")
        for p in m.tls.iterdir():
            p.chmod(0o600)

    def _run(self, m: Member, state: str, initial: str) -> None:
        t = m.tls
        m.data.mkdir(parents=True, exist_ok=True)
        m.data.chmod(0o700)
        m.proc = m.ns.popen([
            str(BIN / "etcd"), "--name", m.name, "--data-dir", str(m.data),
            "--listen-client-urls", f"https://127.0.0.1:2379,https://{m.ip}:2379",
            "--advertise-client-urls", f"https://{m.ip}:2379",
            "--listen-peer-urls", f"https://{m.ip}:2380",
            "--initial-advertise-peer-urls", f"https://{m.ip}:2380",
            "--initial-cluster", initial, "--initial-cluster-state", state,
            "--initial-cluster-token", "k3scluster-test",
            "--cert-file", str(t / "server-client.crt"), "--key-file", str(t / "server-client.key"),
            "--trusted-ca-file", str(t / "server-ca.crt"), "--client-cert-auth",
            "--peer-cert-file", str(t / "peer-server-client.crt"),
            "--peer-key-file", str(t / "peer-server-client.key"),
            "--peer-trusted-ca-file", str(t / "peer-ca.crt"), "--peer-client-cert-auth",
            "--log-level", "warn",
        ], self.logs / f"{m.host}.log")

    # --- etcdctl ---------------------------------------------------------------------------
    def etcdctl(self, host: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Real etcdctl inside ``host``'s namespace against ``https://127.0.0.1:2379`` with
        the K3s-layout certificates (not checked: look at ``returncode``)."""
        t = self.hosts[host].tls
        return self.hosts[host].ns.run(
            str(BIN / "etcdctl"), "--endpoints", "https://127.0.0.1:2379",
            "--cacert", str(t / "server-ca.crt"), "--cert", str(t / "client.crt"),
            "--key", str(t / "client.key"), "--dial-timeout", "3s",
            "--command-timeout", "10s", *args, check=False, timeout=timeout,
        )

    def members(self, via: str | None = None) -> list[dict[str, Any]]:
        """``member list`` (through ``via``, default any running member), IDs as hex."""
        host = via or self._running()
        r = self.etcdctl(host, "member", "list", "-w", "json")
        if r.returncode != 0:
            raise RuntimeError(f"etcdctl member list via {host}: {r.stderr.strip()}")
        out = json.loads(r.stdout).get("members") or []
        for m in out:
            m["ID"] = format(int(m["ID"]), "x")
        return out  # type: ignore[no-any-return]

    def member_id(self, host: str) -> str:
        name = self.hosts[host].name
        for m in self.members():
            if m.get("name") == name or any(f"//{self.hosts[host].ip}:" in u
                                             for u in m.get("peerURLs", [])):
                return str(m["ID"])
        raise KeyError(f"no member for {host}")

    def healthy(self, host: str) -> bool:
        m = self.hosts[host]
        if m.proc is None or m.proc.poll() is not None:
            return False
        return self.etcdctl(host, "endpoint", "health", timeout=15).returncode == 0

    def wait_healthy(self, host: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self.hosts[host]
            if m.proc is None or m.proc.poll() is not None:
                raise RuntimeError(f"etcd on {host} exited:\n{self.log_tail(host)}")
            if self.healthy(host):
                return
            time.sleep(0.5)
        raise RuntimeError(f"etcd on {host} not healthy after {timeout:.0f} s:\n"
                           f"{self.log_tail(host)}")

    def log_tail(self, host: str, lines: int = 20) -> str:
        p = self.logs / f"{host}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""

    def _running(self) -> str:
        for host, m in self.hosts.items():
            if m.proc is not None and m.proc.poll() is None:
                return host
        raise RuntimeError("no etcd member is running")

    # --- a member's life -------------------------------------------------------------------
    def stop(self, host: str) -> None:
        m = self.hosts[host]
        if m.proc is not None:
            stop(m.proc)
            m.proc = None

    def start(self, host: str) -> None:
        """Starts ``host``'s etcd again on its data dir and waits until it is healthy."""
        m = self.hosts[host]
        self.stop(host)
        initial = ",".join(f"{x.name}=https://{x.ip}:2380" for x in self.hosts.values())
        self._run(m, "existing", initial)
        self.wait_healthy(host)

    def wipe(self, host: str) -> None:
        """Stops ``host``'s etcd and removes its data dir (a reinstalled server)."""
        self.stop(host)
        shutil.rmtree(self.hosts[host].data, ignore_errors=True)

    def join(self, host: str, via: str) -> None:
        """What K3s does when a server with an empty data dir joins: ``member add`` a new
        ``<host>-<hex>`` through ``via`` (retried for 15 s while etcd answers "unhealthy
        cluster"), then start it with the cluster's members. Raises with etcdctl's answer
        when the add is refused."""
        m = self.hosts[host]
        self.wipe(host)
        m.name = f"{host}-{secrets.token_hex(4)}"
        end = time.monotonic() + 15
        while True:  # etcd refuses an add until its members were connected for 5 s
            r = self.etcdctl(via, "member", "add", m.name, f"--peer-urls=https://{m.ip}:2380",
                             "-w", "json")
            if r.returncode == 0 or "unhealthy cluster" not in r.stderr \
                    or time.monotonic() > end:
                break
            time.sleep(1)
        if r.returncode != 0:
            raise RuntimeError(f"member add {m.name} via {via}: {r.stderr.strip()}")
        peers = []
        for x in json.loads(r.stdout)["members"]:
            name = x.get("name") or m.name  # the new member has no name until it starts
            peers += [f"{name}={u}" for u in x.get("peerURLs", [])]
        self._run(m, "existing", ",".join(peers))
        self.wait_healthy(host)

    def shutdown(self) -> None:
        for m in self.hosts.values():
            if m.proc is not None:
                stop(m.proc)
                m.proc = None
            m.ns.delete()
        self.lan.delete()
