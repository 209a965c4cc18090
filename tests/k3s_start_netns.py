"""Runs one case of modules/k3s-server-start.sh or k3s-agent-start.sh against stand-in K3s
servers (tests only).

Called by tests/test_k3s_start.py inside a network namespace it made (``unshare -n``):
nothing here reaches the machine's network. The stand-ins are real HTTPS servers (Python
``ssl``, a throwaway self-signed certificate made with ``openssl``) on loopback addresses
(127.0.0.0/8 is all local once ``lo`` is up), on port 6443 like K3s; the script runs with
bash and the real curl and coreutils. What a stand-in does, per address:

  k3s    GET /cacerts answers 200 with a PEM certificate, as K3s does (anything else 404)
  other  answers 200 with a page that is no certificate (some other HTTPS service)
  hang   accepts the connection and never answers (the probe's --max-time must end it)
  down   nothing listens
  late   nothing listens for the first LATE_S seconds, then as k3s (a server that comes up
         while the script is asking)

Input (argv[1], JSON): {"script", "role", "servers": [[ip, kind], ...], "wal": bool,
"stale_env": bool}; role "agent" runs modules/k3s-agent-start.sh (ENV_FILE SERVERS_FILE: the
servers one a line, as /etc holds them) instead of the server's script. Output (stdout, JSON): {"rc", "env" (file text or null),
"stdout", "stderr"}.
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PORT = 6443
LATE_S = 4.0


def make_cert(d: Path) -> tuple[Path, Path]:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=k3s-stand-in",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def serve(ip: str, kind: str, ctx: ssl.SSLContext, pem: str) -> None:
    if kind == "late":
        timer = threading.Timer(LATE_S, serve, (ip, "k3s", ctx, pem))
        timer.daemon = True
        timer.start()
        return
    if kind == "hang":
        sock = socket.create_server((ip, PORT))
        held: list[socket.socket] = []

        def accept() -> None:
            while True:
                conn, _ = sock.accept()
                held.append(conn)  # never answered, never closed

        threading.Thread(target=accept, daemon=True).start()
        return

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if kind == "k3s" and self.path == "/cacerts":
                body = pem.encode()
            elif kind == "other":
                body = b"<html>hello</html>\n"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer((ip, PORT), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()


def main() -> None:
    case = json.loads(sys.argv[1])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cert, key = make_cert(d)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        for ip, kind in case["servers"]:
            if kind != "down":
                serve(ip, kind, ctx, cert.read_text())
        env_file = d / "run" / "k3s-start.env"
        wal = d / "server" / "db" / "etcd" / "member" / "wal"
        if case["wal"]:
            wal.mkdir(parents=True)
        if case.get("stale_env"):
            env_file.parent.mkdir(parents=True)
            env_file.write_text("K3S_CLUSTER_INIT=true\n")
        if case["role"] == "agent":  # the servers in a file, as /etc holds them
            servers_file = d / "k3s-agent-servers"
            servers_file.write_text("".join(f"{ip}\n" for ip, _ in case["servers"]))
            argv = ["bash", case["script"], str(env_file), str(servers_file)]
        else:
            argv = ["bash", case["script"], case["role"], str(env_file), str(wal)]
            argv += [ip for ip, _ in case["servers"]]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        print(
            json.dumps(
                {
                    "rc": proc.returncode,
                    "env": env_file.read_text() if env_file.exists() else None,
                    "leftovers": sorted(p.name for p in env_file.parent.glob("*"))
                    if env_file.parent.exists()
                    else [],
                    "stdout": proc.stdout,
                    "stderr": proc.stderr,
                }
            )
        )


if __name__ == "__main__":
    main()
