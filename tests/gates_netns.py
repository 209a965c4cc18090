"""Runs the agent gate's question against stand-in K3s APIs (tests only).

Called by tests/test_gates_every_server.py inside a network namespace it made (``unshare
-n``): the stand-in API (tests/k3sapi.py, real HTTPS with client certificates) listens on
the loopback addresses given as "up"; the others have nothing listening (a server host that
is down). Asks ``tasks.first_answer`` over all addresses, in order, with the admin
credentials, and prints {"ready", "seen", "asked": [addresses the stand-in saw]} as JSON.

argv[1] (JSON): {"servers": [[ip, "up"|"down"], ...], "node": {"name": ..., "states": [...]}}
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import k3sapi

from k3scluster import kube
from k3scluster.components.tasks import first_answer


def main() -> None:
    case = json.loads(sys.argv[1])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ips = [ip for ip, _ in case["servers"]]
        k3sapi.make_pki(d / "pki", ips)
        script, log = d / "script.json", d / "log.jsonl"
        node = case["node"]
        script.write_text(json.dumps({"nodes": {node["name"]: node["states"]}}))
        log.touch()
        for ip, state in case["servers"]:
            if state == "up":
                k3sapi.serve(ip, d / "pki", script, log)
        creds = yaml.safe_load(k3sapi.k3s_yaml(d / "pki"))
        with kube.private_tempdir():
            check = first_answer(
                [f"https://{ip}:{k3sapi.PORT}" for ip in ips],
                lambda url: kube.read_node(creds, url, node["name"], timeout=3),
            )
        asked = [json.loads(line)["addr"] for line in log.read_text().splitlines()]
        print(json.dumps({"ready": check.ready, "seen": check.seen, "asked": asked}))


if __name__ == "__main__":
    main()
