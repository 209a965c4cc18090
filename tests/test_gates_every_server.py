"""The gates and the kubeconfig ask every server in turn, not only the init-server
(issue 19, item 5): while the init-server's host is down, a deploy's agent gate gets its
answer from the next server, and the credentials and the kubeconfig are read from the next
server host.

The agent gate's question runs for real (the kubernetes client, HTTPS with client
certificates) against the stand-in K3s API (tests/k3sapi.py) on loopback addresses in a
network namespace each case makes (tests/gates_netns.py); the argv the steps run is checked
through the Pulumi mocks (tests/test_components.py's run_program).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_k3s_start import netns

from k3scluster.components.tasks import first_answer
from k3scluster.kube import Check, NodeSeen

HERE = Path(__file__).resolve().parent
INIT, SECOND, THIRD = "127.0.0.10", "127.0.0.12", "127.0.0.14"


def run_case(servers: list[tuple[str, str]], states: list[str]) -> dict[str, object]:
    case = {"servers": servers, "node": {"name": "karl-k3s-agent", "states": states}}
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, str(HERE / "gates_netns.py"), json.dumps(case)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert isinstance(result, dict)
    return result


@netns
def test_the_init_servers_api_down_the_next_server_answers() -> None:
    r = run_case([(INIT, "down"), (SECOND, "up"), (THIRD, "up")], ["True"])
    assert r["ready"] is True, r
    assert r["asked"] == [SECOND]  # the third is never asked once the second answered


@netns
def test_an_answer_from_the_first_server_is_the_clusters() -> None:
    # not registered yet is an answer (one datastore): no other server is asked
    r = run_case([(INIT, "up"), (SECOND, "up")], ["absent"])
    assert r["ready"] is False and r["asked"] == [INIT]
    assert "not registered yet" in str(r["seen"])


@netns
def test_no_server_answering_says_what_each_said() -> None:
    r = run_case([(INIT, "down"), (SECOND, "down")], ["True"])
    assert r["ready"] is False and r["asked"] == []
    seen = str(r["seen"])
    assert f"https://{INIT}:6443: " in seen and f"https://{SECOND}:6443: " in seen


def test_first_answer_order() -> None:
    calls: list[str] = []

    def read(url: str) -> NodeSeen:
        calls.append(url)
        if url == "b":
            return NodeSeen(Check(False, "node n Ready=False"), registered=True)
        return NodeSeen(Check(False, "connection refused"), answered=False)

    assert first_answer(["a", "b", "c"], read) == Check(False, "node n Ready=False")
    assert calls == ["a", "b"]


# -- what the steps are told ---------------------------------------------------------------


@pytest.fixture
def program(example_dir: Path, tmp_path: Path) -> object:
    from test_components import run_program

    key = tmp_path / "id_ed25519"
    key.write_text("not a real key\n")
    return run_program(
        example_dir, "python", colmena="/opt/colmena", sshIdentity=str(key), readyTimeout="90s"
    )


def _argv(reg: object) -> list[str]:
    from test_components import _argv as argv_of

    return list(argv_of(reg, "python"))


def _opts(argv: list[str], name: str) -> list[str]:
    head = argv[: argv.index("--")] if "--" in argv else argv
    return [head[i + 1] for i, a in enumerate(head) if a == name]


def test_every_deploy_gate_knows_every_server(program: object) -> None:
    karl = _argv(program.named("karl-deploy"))  # type: ignore[attr-defined]
    # the servers' APIs and hosts, the init-server's first
    assert _opts(karl, "--api") == [
        "https://10.0.100.10:6443", "https://10.0.100.12:6443", "https://10.0.100.14:6443"
    ]
    assert _opts(karl, "--credentials-from") == ["10.0.100.2", "10.0.100.3", "10.0.100.4"]


def test_the_kubeconfig_is_read_from_the_next_server_host_when_needed(program: object) -> None:
    argv = _argv(program.named("cluster-kubeconfig"))  # type: ignore[attr-defined]
    assert _opts(argv, "--ip") == ["10.0.100.2"]  # the init-server's host first
    assert _opts(argv, "--also") == ["10.0.100.3", "10.0.100.4"]
    assert _opts(argv, "--server") == ["https://10.0.100.10:6443"]


# -- with the real engine, sshd per host (tests/test_health.py's lab) -----------------------


@pytest.mark.integration
@pytest.mark.root
def test_up_reads_the_credentials_and_the_kubeconfig_from_the_next_server_host(
    tmp_path: Path,
) -> None:
    import shutil as _shutil

    import test_health as th
    from engine import netns_available, require_engine

    from k3scluster import kube

    require_engine()
    if not netns_available() or not th.SSHD.is_file() or not _shutil.which("ssh"):
        pytest.skip("needs root, unshare, ip and OpenSSH")
    lab = th.Lab(tmp_path)
    # the init-server's host holds no admin kubeconfig (its K3s not up, or its disk new):
    # ulf's, the next server host, does
    olaf_kc = lab.hosts["olaf"] / "var-lib" / kube.KUBECONFIG_ON_HOST.removeprefix("/var/lib/")
    olaf_kc.unlink()
    p = th.Project(tmp_path, lab, readyTimeout="20s")
    r = p.up()
    text = th._text(r)
    assert r.returncode == 0, text[-6000:] + lab.sshd_logs()[-3000:]
    assert p.deployed()[:3] == th.CHAIN
    # the kubeconfig came from ulf's host, still pointed at the init-server's API
    assert f"cannot read {kube.KUBECONFIG_ON_HOST} from 10.0.100.2; asking the next" in text
    kubeconfig = p.render_dir / "kubeconfig"
    data = kube.parse_kubeconfig(kubeconfig.read_text(), str(kubeconfig))
    assert data["clusters"][0]["cluster"]["server"] == "https://10.0.100.10:6443"
    assert "Accepted publickey" in (lab.hosts["ulf"] / "sshd.log").read_text()
