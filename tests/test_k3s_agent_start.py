"""Agents register with the first server that answers, not only the init-server
(issue 19, item 5).

modules/k3s-agent-start.sh runs in the preStart of podman-k3s-agent.service, before each
start of the agent container: the first of the plan's servers (the init-server first)
that answers /cacerts with a certificate becomes K3S_URL in an env file that
`podman run --env-file` reads; none answers -> exit 1, no env file (systemd starts the
unit again: oci-containers sets Restart=always).

The script runs for real (bash, curl, coreutils) against stand-in HTTPS servers on
loopback addresses inside a network namespace each case makes (tests/k3s_start_netns.py,
as tests/test_k3s_start.py does for the servers' own start). The Nix wiring is evaluated
with nix-instantiate and the lib stand-in (tests/nixeval.py).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from nixeval import module_config
from test_k3s_start import netns, run_case

from k3scluster import plans
from k3scluster.k3s_start import (
    AGENT_ENV_FILE,
    AGENT_SCRIPT_PATH,
    AGENT_SCRIPT_TEMPLATE,
    SCRIPT_VALUES,
)
from k3scluster.render import _environment, host_inputs, render_files, render_to_dir

INIT, SECOND, THIRD = "127.0.0.10", "127.0.0.12", "127.0.0.14"


@pytest.fixture(scope="module")
def quick_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template with short probes and no pause between rounds (2 rounds)."""
    values = {**SCRIPT_VALUES, "connect_timeout": 1, "max_time": 2, "rounds": 2, "pause": 0}
    path = tmp_path_factory.mktemp("k3s-agent-start") / "k3s-agent-start.sh"
    path.write_text(_environment().get_template(AGENT_SCRIPT_TEMPLATE).render(**values))
    return path


@netns
def test_the_init_server_first_when_it_answers(quick_script: Path) -> None:
    r = run_case(quick_script, "agent", [(INIT, "k3s"), (SECOND, "k3s"), (THIRD, "k3s")])
    assert r["rc"] == 0, r
    assert r["env"] == f"K3S_URL=https://{INIT}:6443\n"
    assert r["leftovers"] == ["k3s-start.env"]  # no temporary file beside it


@netns
def test_the_init_server_down_the_next_server_that_answers(quick_script: Path) -> None:
    # the init-server's host is down (nothing listens), the second hangs, the third is up
    r = run_case(quick_script, "agent", [(INIT, "down"), (SECOND, "hang"), (THIRD, "k3s")])
    assert r["rc"] == 0, r
    assert r["env"] == f"K3S_URL=https://{THIRD}:6443\n"
    # something that answers but is no K3s server is passed over
    r = run_case(quick_script, "agent", [(INIT, "other"), (SECOND, "k3s")])
    assert r["env"] == f"K3S_URL=https://{SECOND}:6443\n"


@netns
def test_none_answering_fails_and_leaves_no_decision(quick_script: Path) -> None:
    r = run_case(
        quick_script, "agent", [(INIT, "down"), (SECOND, "other")], stale_env=True
    )
    assert r["rc"] == 1, r
    assert r["env"] is None  # the earlier start's K3S_URL is gone
    assert "no K3s server answers" in str(r["stderr"])


@netns
def test_the_rendered_script_itself(example_dir: Path, tmp_path: Path) -> None:
    result = plans.load(example_dir)
    assert result.cluster is not None
    files = render_files(result.cluster, tmp_path / "out")
    script = tmp_path / "k3s-agent-start.sh"
    script.write_text(files[AGENT_SCRIPT_PATH])
    r = run_case(script, "agent", [(INIT, "down"), (SECOND, "k3s")])
    assert r["rc"] == 0, r
    assert r["env"] == f"K3S_URL=https://{SECOND}:6443\n"


# -- the wiring in the agent's unit ------------------------------------------------------


@pytest.fixture
def out(example_dir: Path) -> Path:
    result = plans.load(example_dir)
    assert result.cluster is not None
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(result.cluster, out)
    return out


def test_the_agent_unit_decides_before_each_start(out: Path) -> None:
    unit = module_config(out, "k3s-agent", "karl", ".systemd.services.k3s-agent-start")
    assert isinstance(unit, dict)
    # as k3s-server-start does for k3s.service (tests/test_k3s_start.py): Requires, so each
    # start of the container runs it again; a failure retried without failing the container
    assert unit["before"] == ["podman-k3s-agent.service"] == unit["requiredBy"]
    assert unit["after"] == ["network-online.target"] == unit["wants"]
    assert unit["serviceConfig"] == {
        "Type": "oneshot",
        "Restart": "on-failure",
        "RestartSec": "5s",
        "RestartMode": "direct",
    }
    # the container's own guard: nothing to decide before the agent token is there
    container = module_config(out, "k3s-agent", "karl", ".systemd.services.podman-k3s-agent")
    assert isinstance(container, dict)
    assert unit["unitConfig"] == container["unitConfig"]
    assert unit["path"] == ["/stand-in/curl", "/stand-in/coreutils"]
    argv = shlex.split(str(unit["script"]))
    assert argv[:2] == ["exec", "/stand-in/bash/bin/bash"]
    assert argv[2].startswith("/nix/store/") and argv[2].endswith("-k3s-agent-start.sh")
    # the env file, then every server of the plan, the init-server first
    assert argv[3:] == [AGENT_ENV_FILE, "10.0.100.10", "10.0.100.12", "10.0.100.14"]


def test_the_container_reads_k3s_url_from_that_decision_only(out: Path) -> None:
    c = module_config(out, "k3s-agent", "karl", ".virtualisation.oci-containers.containers.k3s-agent")
    assert isinstance(c, dict)
    assert f"--env-file={AGENT_ENV_FILE}" in c["extraOptions"]  # type: ignore[operator]
    env = c["environment"]
    assert isinstance(env, dict) and "K3S_URL" not in env


def test_agent_hosts_depend_on_the_script(example_dir: Path, tmp_path: Path) -> None:
    result = plans.load(example_dir)
    assert result.cluster is not None
    files = render_files(result.cluster, tmp_path / "out")
    assert f"file:{AGENT_SCRIPT_PATH}" in host_inputs(result.cluster, "karl", files)
    assert f"file:{AGENT_SCRIPT_PATH}" not in host_inputs(result.cluster, "rolf", files)
