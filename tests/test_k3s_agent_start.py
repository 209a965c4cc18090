"""Agents register with the first server that answers, not only the init-server
(issue 19, item 5), and wait for one a bounded time (the small items after issues 16-19,
item 1).

modules/k3s-agent-start.sh runs as an ExecStartPre of podman-k3s-agent.service, before
each start of the agent container: the first of the plan's servers (the init-server
first) that answers /cacerts with a certificate becomes K3S_URL in an env file that
`podman run --env-file` reads. None answers: asked again until start_timeout (the server
container's start timeout), then exit 1 and no env file, so the unit's start fails (and
a deploy that started it, instead of waiting forever) and systemd starts it again:
oci-containers sets Restart=always on podman-<name>.service
(nixos/modules/virtualisation/oci-containers.nix, with TimeoutStartSec=0: nothing else
bounds its start), and a failing ExecStartPre leaves the service failed with restart
allowed (systemd src/core/service.c). It used to be a unit of its own that the container
required, restarted with RestartMode=direct: the container's start, and a switch that
started it, waited for as long as no server answered.

The script runs for real (bash, curl, coreutils) against stand-in HTTPS servers on
loopback addresses inside a network namespace each case makes (tests/k3s_start_netns.py,
as tests/test_k3s_start.py does for the servers' own start). The Nix wiring is evaluated
with nix-instantiate and the lib stand-in (tests/nixeval.py).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from nixeval import module_config, rendered
from test_k3s_start import netns, run_case

from k3scluster import plans
from k3scluster.k3s_start import (
    AGENT_ENV_FILE,
    AGENT_SCRIPT_PATH,
    AGENT_SCRIPT_TEMPLATE,
    AGENT_SERVERS_ETC,
    SCRIPT_VALUES,
    START_TIMEOUT_MIN,
)
from k3scluster.render import (
    AGENT_SECRETS_DIR,
    AGENT_TOKEN_KEY,
    _environment,
    host_inputs,
    render_files,
)

INIT, SECOND, THIRD = "127.0.0.10", "127.0.0.12", "127.0.0.14"


@pytest.fixture(scope="module")
def quick_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template with short probes, no pause and no wait beyond one round."""
    return _script(tmp_path_factory, pause=0, start_timeout=0)


def _script(factory: pytest.TempPathFactory, **values: int) -> Path:
    """The template with short probes and ``values`` (2 rounds where rounds count)."""
    values = {**SCRIPT_VALUES, "connect_timeout": 1, "max_time": 2, "rounds": 2, **values}
    path = factory.mktemp("k3s-agent-start") / "k3s-agent-start.sh"
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
    assert "no K3s server answered on port 6443 within 0 s" in str(r["stderr"])


@netns
def test_asks_until_its_time_is_up_not_a_number_of_rounds(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # the only server comes up a few seconds after the agent starts asking (LATE_S):
    # found, however many rounds that took
    script = _script(tmp_path_factory, pause=1, start_timeout=60)
    r = run_case(script, "agent", [(INIT, "down"), (SECOND, "late")])
    assert r["rc"] == 0, r
    assert r["env"] == f"K3S_URL=https://{SECOND}:6443\n"


@netns
def test_gives_up_when_its_time_is_up(tmp_path_factory: pytest.TempPathFactory) -> None:
    script = _script(tmp_path_factory, pause=1, start_timeout=2)
    r = run_case(script, "agent", [(INIT, "down"), (SECOND, "hang")], stale_env=True)
    assert r["rc"] == 1, r
    assert r["env"] is None
    stderr = str(r["stderr"])
    assert f"no K3s server answered on port 6443 within 2 s (asked: {INIT} {SECOND})" in stderr
    assert "systemd starts podman-k3s-agent again" in stderr


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
    return rendered(example_dir)


def test_the_agent_container_decides_in_its_own_start(out: Path) -> None:
    services = module_config(out, "k3s-agent", "karl", ".systemd.services")
    assert isinstance(services, dict)
    # no unit of its own that the container requires: its failure would fail the
    # container's start for good, and its retries (RestartMode=direct) kept that start,
    # and a switch, waiting for as long as no server answered
    assert set(services) == {"podman-k3s-agent"}
    unit = services["podman-k3s-agent"]
    assert isinstance(unit, dict)
    # an ExecStartPre of the container's unit: its failure is the unit's, which
    # oci-containers restarts (Restart=always)
    [decide] = unit["serviceConfig"]["ExecStartPre"]
    argv = shlex.split(decide)
    assert argv[0] == "/stand-in/bash/bin/bash"
    assert argv[1].startswith("/nix/store/") and argv[1].endswith("-k3s-agent-start.sh")
    # the env file, then the file of every server of the plan, the init-server first
    assert argv[2:] == [AGENT_ENV_FILE, f"/etc/{AGENT_SERVERS_ETC}"]
    etc = module_config(out, "k3s-agent", "karl", ".environment.etc")
    assert etc == {AGENT_SERVERS_ETC: {"text": "10.0.100.10\n10.0.100.12\n10.0.100.14\n"}}
    # so no server address is part of the unit: a changed server list changes no unit, and
    # the switch neither restarts nor drains the agent for it (ExecStartPre arguments
    # did: every agent was drained and restarted when a server was added or removed)
    for ip in ("10.0.100.10", "10.0.100.12", "10.0.100.14"):
        assert ip not in json.dumps(unit)
    assert unit["path"] == ["/stand-in/curl", "/stand-in/coreutils"]
    # the container's own guard holds for the decision too: nothing to decide before
    # the agent token is there
    assert unit["unitConfig"] == {"ConditionPathExists": f"{AGENT_SECRETS_DIR}/{AGENT_TOKEN_KEY}"}


def test_the_agent_waits_as_long_as_a_server_start_may_take(out: Path) -> None:
    # one bound for both (k3s_start.START_TIMEOUT_MIN): a joining server waits inside its
    # container's start, an agent in its script
    assert SCRIPT_VALUES["start_timeout"] == START_TIMEOUT_MIN * 60
    container = module_config(out, "k3s-server", "olaf", ".containers.k3s-server")
    assert isinstance(container, dict)
    assert container["timeoutStartSec"] == f"{START_TIMEOUT_MIN}min"
    script = (out / AGENT_SCRIPT_PATH).read_text()
    assert f"\nstart_timeout={START_TIMEOUT_MIN * 60}\n" in script


def test_both_bounds_are_rendered_from_the_constant(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with another bound both files change: neither template writes 10 minutes itself
    from k3scluster import render

    monkeypatch.setattr(render, "START_TIMEOUT_MIN", 7)
    monkeypatch.setitem(SCRIPT_VALUES, "start_timeout", 7 * 60)  # type: ignore[index]
    result = plans.load(example_dir)
    assert result.cluster is not None
    files = render_files(result.cluster, tmp_path / "out")
    assert 'timeoutStartSec = "7min";' in files["modules/k3s-server.nix"]
    assert "\nstart_timeout=420\n" in files[AGENT_SCRIPT_PATH]


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
