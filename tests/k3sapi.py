#!/usr/bin/env python3
"""A stand-in for the K3s API, for tests only (no K3s can run here).

It answers, over HTTPS with a throwaway CA and only to clients holding a certificate of the
throwaway client CA (as K3s's API server does), exactly these:

- ``GET /readyz[?verbose]`` on each address it listens on;
- ``GET /version`` (``gitVersion`` is the script's ``version``, default :data:`VERSION`);
- ``GET /api/v1/nodes/<name>`` (a node object with its ``Ready`` condition, and the script's
  ``version`` as its kubelet's; its ``nodeInfo.bootID`` is ``b``, or with the script's
  ``bootIDs`` (node -> a host's ``reboots.jsonl``, tests/bin/host/systemctl) the boot id
  of that host's last reboot, or this machine's before any, as the host's kubelet reports it).
- ``DELETE`` of a Node or a secret: 404, it holds none (the clean-up of a reinstalled agent,
  k3scluster/agentmembers.py, asks for both whenever an agent host has no node password).
- ``PATCH /api/v1/nodes/<name>``: a cordon or uncordon (``spec.unschedulable``), kept in
  memory and shown in the node's ``spec`` from then on (the log line says ``unschedulable``);
- ``GET /api/v1/pods``: an empty pod list (a drain finds nothing to evict).

What it answers comes from a JSON script the test writes (and may rewrite at any time; it is
read on every request)::

    {"readyz": {"10.0.100.10": ["503", "503", "200"]},
     "nodes": {"olaf-k3s-agent": ["absent", "False", "True"]}}

Each list is consumed one entry per request to that address (or node); the last entry
repeats. A ``503`` answers like K3s does while etcd is not ready (``[-]etcd failed``). An
address or node missing from the script answers 503 / 404. Every request is appended to the
log file as one JSON line (address, path, the client certificate's CN, the status sent).

    python tests/k3sapi.py --script S.json --log L.jsonl --pki DIR --listen 10.0.100.10 ...

``make_pki(DIR, ips)`` makes the CA, the server certificate (those IPs as SANs), the client
CA and an admin client certificate with ``openssl``; ``k3s_yaml(DIR)`` is the admin
kubeconfig as K3s writes it (``server: https://127.0.0.1:6443``, everything ``default``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PORT = 6443
VERSION = "v1.35.2+k3s1"
_LOCK = threading.Lock()
_COUNTS: dict[str, int] = {}
_CORDONED: dict[str, bool] = {}  # node -> spec.unschedulable, set by PATCH

READYZ_FAILING = (
    "[+]ping ok\n[+]log ok\n[-]etcd failed: reason withheld\n[+]informer-sync ok\n"
    "readyz check failed\n"
)
READYZ_OK = "[+]ping ok\n[+]log ok\n[+]etcd ok\n[+]informer-sync ok\nreadyz check passed\n"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(d: Path, ips: list[str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca, cn in (("server-ca", "k3s-server-ca@test"), ("client-ca", "k3s-client-ca@test")):
        _openssl(
            "req", "-x509", *ec, "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.crt"),
            "-days", "2", "-subj", f"/CN={cn}",
        )
    sans = ",".join(f"IP:{ip}" for ip in ["127.0.0.1", *ips])
    ext = d / "server.ext"
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    _openssl("req", *ec, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
             "-subj", "/CN=k3s")
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "server-ca.crt"),
             "-CAkey", str(d / "server-ca.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", str(d / "server.crt"))
    cext = d / "client.ext"
    cext.write_text("extendedKeyUsage=clientAuth\n")
    _openssl("req", *ec, "-keyout", str(d / "client.key"), "-out", str(d / "client.csr"),
             "-subj", "/O=system:masters/CN=system:admin")
    _openssl("x509", "-req", "-in", str(d / "client.csr"), "-CA", str(d / "client-ca.crt"),
             "-CAkey", str(d / "client-ca.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(cext), "-out", str(d / "client.crt"))
    for p in d.iterdir():
        p.chmod(0o600)


def _b64(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


def k3s_yaml(d: Path) -> str:
    """The admin kubeconfig as K3s writes it to /etc/rancher/k3s/k3s.yaml."""
    return (
        "apiVersion: v1\n"
        "clusters:\n"
        "- cluster:\n"
        f"    certificate-authority-data: {_b64(d / 'server-ca.crt')}\n"
        "    server: https://127.0.0.1:6443\n"
        "  name: default\n"
        "contexts:\n"
        "- context:\n"
        "    cluster: default\n"
        "    user: default\n"
        "  name: default\n"
        "current-context: default\n"
        "kind: Config\n"
        "preferences: {}\n"
        "users:\n"
        "- name: default\n"
        "  user:\n"
        f"    client-certificate-data: {_b64(d / 'client.crt')}\n"
        f"    client-key-data: {_b64(d / 'client.key')}\n"
    )


def client_key_data(d: Path) -> str:
    return _b64(d / "client.key")


def _boot_id(script: dict[str, Any], node: str) -> str:
    """The boot id node's kubelet reports: ``b``, or its host's as the script's ``bootIDs``
    says (the last reboot's new id in that reboots.jsonl, else this machine's)."""
    log = (script.get("bootIDs") or {}).get(node)
    if not log:
        return "b"
    reboots = Path(log).read_text().splitlines() if Path(log).exists() else []
    if reboots:
        return str(json.loads(reboots[-1])["new"])
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _next(kind: str, key: str, entries: list[str]) -> str:
    with _LOCK:
        n = _COUNTS.get(f"{kind}:{key}", 0)
        _COUNTS[f"{kind}:{key}"] = n + 1
    return entries[min(n, len(entries) - 1)]


class Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: str, ctype: str = "text/plain",
              **extra: Any) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        cert = self.connection.getpeercert() or {}  # type: ignore[attr-defined]
        cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "")
        line = json.dumps({"addr": self.server.addr, "path": self.path, "cn": cn,
                           "status": status, "t": time.time(), "method": self.command,
                           **extra})
        with _LOCK, open(self.server.log, "a") as f:
            f.write(line + "\n")

    def do_GET(self) -> None:
        script = json.loads(Path(self.server.script).read_text())
        path = self.path.split("?", 1)[0]
        if path == "/readyz":
            entries = (script.get("readyz") or {}).get(self.server.addr) or ["503"]
            status = int(_next("readyz", self.server.addr, entries))
            self._send(status, READYZ_OK if status == 200 else READYZ_FAILING)
            return
        version = str(script.get("version") or VERSION)
        if path in ("/version", "/version/"):  # the python client asks for /version/
            major, minor = version.lstrip("v").split(".")[:2]
            info = {"major": major, "minor": minor, "gitVersion": version,
                    "gitCommit": "0" * 40, "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25",
                    "compiler": "gc", "platform": "linux/amd64"}
            self._send(200, json.dumps(info), "application/json")
            return
        if path == "/api/v1/pods":
            pods = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                    "items": []}
            self._send(200, json.dumps(pods), "application/json")
            return
        prefix = "/api/v1/nodes/"
        if path.startswith(prefix):
            name = path[len(prefix):]
            entries = (script.get("nodes") or {}).get(name) or ["absent"]
            state = _next("node", name, entries)
            if state == "absent":
                body = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404,
                        "message": f'nodes "{name}" not found'}
                self._send(404, json.dumps(body), "application/json")
                return
            node = {
                "kind": "Node", "apiVersion": "v1",
                "metadata": {"name": name, "resourceVersion": str(len(_CORDONED) + 1)},
                "spec": {"unschedulable": True} if _CORDONED.get(name) else {},
                "status": {"conditions": [{
                    "type": "Ready", "status": state,
                    "reason": "KubeletReady" if state == "True" else "KubeletNotReady",
                }], "nodeInfo": {
                    "architecture": "amd64", "bootID": _boot_id(script, name),
                    "containerRuntimeVersion":
                    "containerd://2.0.0", "kernelVersion": "6.12.0", "kubeProxyVersion": "",
                    "kubeletVersion": version, "machineID": "m", "operatingSystem": "linux",
                    "osImage": "K3s", "systemUUID": "u",
                }},
            }
            self._send(200, json.dumps(node), "application/json")
            return
        self._send(404, "not in the stand-in\n")

    def do_PATCH(self) -> None:
        path = self.path.split("?", 1)[0]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        name = path[len("/api/v1/nodes/"):]
        value = bool((body.get("spec") or {}).get("unschedulable"))
        with _LOCK:
            _CORDONED[name] = value
        node = {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
                "spec": {"unschedulable": True} if value else {}}
        self._send(200, json.dumps(node), "application/json", unschedulable=value)

    def do_DELETE(self) -> None:
        path = self.path.split("?", 1)[0]
        kind = "nodes" if path.startswith("/api/v1/nodes/") else "secrets"
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                "code": 404, "message": f'{kind} "{path.rsplit("/", 1)[-1]}" not found'}
        self._send(404, json.dumps(body), "application/json")


def serve(addr: str, pki: Path, script: Path, log: Path) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer((addr, PORT), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki / "client-ca.crt")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.addr = addr  # type: ignore[attr-defined]
    httpd.script = script  # type: ignore[attr-defined]
    httpd.log = log  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--script", type=Path, required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--listen", action="append", required=True)
    p.add_argument("--ready-file", type=Path, help="written once every address listens")
    a = p.parse_args(argv)
    for addr in a.listen:
        serve(addr, a.pki, a.script, a.log)
    if a.ready_file:
        a.ready_file.write_text(str(os.getpid()))
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
