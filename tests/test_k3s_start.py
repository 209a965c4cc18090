"""A reinstalled init-server joins the running cluster instead of starting a second one
(issue 13, review item 2).

modules/k3s-server-start.sh decides before each start of k3s.service in the server
container: etcd data here -> nothing to add; another server answers /cacerts -> join it
(K3S_URL); the planned init-server -> K3S_CLUSTER_INIT=true; else exit 1 (systemd retries).

The script runs for real (bash, curl, coreutils) against stand-in HTTPS servers on
loopback addresses inside a network namespace each test makes (tests/k3s_start_netns.py).
The Nix wiring is evaluated with nix-instantiate and the lib stand-in (tests/nixeval.py).

What the wiring relies on, read in nixpkgs (the files named in tests/nixos_options.py):
services.k3s.environmentFile becomes serviceConfig.EnvironmentFile of k3s.service, and
--cluster-init / --server are on ExecStart only when clusterInit is true / serverAddr is
not "" (k3s/default.nix in 24.11 and 25.05; rancher/default.nix 011c1bdb and
rancher/k3s.nix 01bb496c in 25.11+). K3s reads K3S_URL for --server and K3S_CLUSTER_INIT
for --cluster-init (k3s-io/k3s pkg/cli/cmds/server.go at 005499a9) and takes a server as
initialized when <data-dir>/server/db/etcd/member/wal is a directory (pkg/etcd/etcd.go
IsInitialized; pkg/cluster/managed.go assignManagedDriver picks etcd for it first).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nixeval import container_config, rendered

from k3scluster import plans
from k3scluster.k3s_start import (
    AGENT_SCRIPT_PATH,
    ENV_FILE,
    ETCD_WAL_DIR,
    PROBE_TEMPLATE,
    SCRIPT_PATH,
    SCRIPT_TEMPLATE,
    SCRIPT_VALUES,
    sh_value,
)
from k3scluster.render import _environment, host_inputs, render_files

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "k3s_start_netns.py"

netns = pytest.mark.skipif(
    not (
        sys.platform == "linux"
        and shutil.which("unshare")
        and shutil.which("ip")
        and shutil.which("curl")
        and shutil.which("openssl")
        and __import__("os").geteuid() == 0
    ),
    reason="needs root, unshare, ip, curl and openssl for a loopback-only namespace",
)

A, B, C = "127.0.0.10", "127.0.0.12", "127.0.0.14"


@pytest.fixture(scope="module")
def quick_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template with short probes and no pause between rounds (2 rounds)."""
    values = {**SCRIPT_VALUES, "connect_timeout": 1, "max_time": 2, "rounds": 2, "pause": 0}
    path = tmp_path_factory.mktemp("k3s-start") / "k3s-server-start.sh"
    path.write_text(_environment().get_template(SCRIPT_TEMPLATE).render(**values))
    return path


def run_case(
    script: Path,
    role: str,
    servers: list[tuple[str, str]],
    wal: bool = False,
    stale_env: bool = False,
) -> dict[str, object]:
    case = {
        "script": str(script),
        "role": role,
        "servers": servers,
        "wal": wal,
        "stale_env": stale_env,
    }
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, str(DRIVER), json.dumps(case)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert isinstance(result, dict)
    return result


# -- the decision, for real ------------------------------------------------------------


@netns
def test_reinstalled_init_server_joins_a_running_server(quick_script: Path) -> None:
    # olaf's disk is new (no etcd data); ulf is down, rolf runs the cluster
    r = run_case(quick_script, "init", [(B, "down"), (C, "k3s")])
    assert r["rc"] == 0, r
    assert r["env"] == f"K3S_URL=https://{C}:6443\n"
    assert r["leftovers"] == ["k3s-start.env"]  # no temporary file left beside it


@netns
def test_etcd_data_keeps_what_is_there(quick_script: Path) -> None:
    # a restart (or reboot) of any server with data: neither --server nor --cluster-init
    for role in ("init", "join"):
        r = run_case(quick_script, role, [(A, "k3s")], wal=True)
        assert r["rc"] == 0, r
        env = r["env"]
        assert isinstance(env, str)
        assert "K3S_" not in env and env.startswith("#")


@netns
def test_init_server_alone_starts_a_new_cluster(quick_script: Path) -> None:
    # the first start of a cluster: nobody answers, or only something that is not K3s
    # (200 without a certificate, a 404 for /cacerts, a port that never answers)
    r = run_case(quick_script, "init", [(B, "down"), (C, "other")])
    assert r["rc"] == 0, r
    assert r["env"] == "K3S_CLUSTER_INIT=true\n"
    r = run_case(quick_script, "init", [(B, "hang")])
    assert r["rc"] == 0, r
    assert r["env"] == "K3S_CLUSTER_INIT=true\n"


@netns
def test_joining_server_with_nobody_up_fails_and_leaves_no_decision(
    quick_script: Path,
) -> None:
    r = run_case(quick_script, "join", [(A, "down"), (C, "other")], stale_env=True)
    assert r["rc"] == 1, r
    assert r["env"] is None  # the earlier start's decision is gone
    assert "no server answers" in str(r["stderr"])


@netns
def test_joining_server_joins_the_first_that_answers(quick_script: Path) -> None:
    r = run_case(quick_script, "join", [(A, "down"), (B, "k3s"), (C, "k3s")])
    assert r["rc"] == 0, r
    assert r["env"] == f"K3S_URL=https://{B}:6443\n"


@netns
def test_the_rendered_script_itself(example_dir: Path, tmp_path: Path) -> None:
    result = plans.load(example_dir)
    assert result.cluster is not None
    files = render_files(result.cluster, tmp_path / "out")
    script = tmp_path / "k3s-server-start.sh"
    script.write_text(files[SCRIPT_PATH])
    r = run_case(script, "init", [(A, "k3s")])
    assert r["rc"] == 0, r
    assert r["env"] == f"K3S_URL=https://{A}:6443\n"


def test_bad_usage_is_refused(quick_script: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(quick_script), "leader", str(tmp_path / "env"), str(tmp_path / "wal")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "usage:" in proc.stderr
    assert not (tmp_path / "env").exists()


def test_rendered_constants_are_shell_words() -> None:
    assert sh_value(6443) == "6443"
    assert sh_value("a b'c") == "'a b'\"'\"'c'"
    with pytest.raises(TypeError):
        sh_value(True)


# -- the wiring in the server container ------------------------------------------------


@pytest.fixture
def out(example_dir: Path) -> Path:
    return rendered(example_dir)


def test_k3s_unit_gets_no_fixed_cluster_init_or_server(out: Path) -> None:
    for host in ("olaf", "ulf"):
        k3s = container_config(out, host, ".services.k3s")
        assert isinstance(k3s, dict)
        assert k3s["clusterInit"] is False and k3s["serverAddr"] == ""
        assert k3s["environmentFile"] == ENV_FILE


def test_decision_unit_runs_before_every_k3s_start(out: Path) -> None:
    unit = container_config(out, "olaf", ".systemd.services.k3s-server-start")
    assert isinstance(unit, dict)
    assert unit["before"] == ["k3s.service"] and unit["requiredBy"] == ["k3s.service"]
    assert unit["after"] == ["network-online.target"] == unit["wants"]
    assert unit["path"] == ["/stand-in/curl", "/stand-in/coreutils"]
    # oneshot without RemainAfterExit: inactive after each run, so each (re)start of
    # k3s.service (Requires) runs it again; a failure is retried without failing k3s
    assert unit["serviceConfig"] == {
        "Type": "oneshot",
        "Restart": "on-failure",
        "RestartSec": "5s",
        "RestartMode": "direct",
    }


def script_argv(out: Path, host: str) -> list[str]:
    unit = container_config(out, host, ".systemd.services.k3s-server-start")
    assert isinstance(unit, dict)
    argv = shlex.split(str(unit["script"]))
    assert argv[:2] == ["exec", "/stand-in/bash/bin/bash"]
    # the rendered script (./k3s-server-start.sh beside the module), as a store path
    assert argv[2].startswith("/nix/store/") and argv[2].endswith("-k3s-server-start.sh")
    return argv[3:]


def test_decision_gets_role_files_and_the_other_servers(out: Path) -> None:
    # plans/k3s.csv: olaf-k3s-server 10.0.100.10 (init), ulf 10.0.100.12, rolf 10.0.100.14
    assert script_argv(out, "olaf") == [
        "init",
        ENV_FILE,
        ETCD_WAL_DIR,
        "10.0.100.12",
        "10.0.100.14",
    ]
    assert script_argv(out, "ulf") == ["join", ENV_FILE, ETCD_WAL_DIR, "10.0.100.10", "10.0.100.14"]
    assert ETCD_WAL_DIR == "/var/lib/rancher/k3s/server/db/etcd/member/wal"


def test_server_hosts_depend_on_the_script(example_dir: Path, tmp_path: Path) -> None:
    result = plans.load(example_dir)
    assert result.cluster is not None
    files = render_files(result.cluster, tmp_path / "out")
    assert f"file:{SCRIPT_PATH}" in host_inputs(result.cluster, "olaf", files)
    assert f"file:{SCRIPT_PATH}" not in host_inputs(result.cluster, "karl", files)


def test_the_probe_is_rendered_from_one_snippet_in_both_scripts(
    example_dir: Path, tmp_path: Path
) -> None:
    # the /cacerts probe (and the env file's handling) is written once
    # (templates/k3s-probe.sh.j2) and included by the server's and the agent's script
    result = plans.load(example_dir)
    assert result.cluster is not None
    files = render_files(result.cluster, tmp_path / "out")
    shared = _environment().get_template(PROBE_TEMPLATE).render(**SCRIPT_VALUES)
    assert "/cacerts" in shared and "answers()" in shared and "write_env()" in shared
    for path in (SCRIPT_PATH, AGENT_SCRIPT_PATH):
        assert files[path].count(shared) == 1
        assert files[path].count("/cacerts\"") == 1  # the one curl of the snippet
