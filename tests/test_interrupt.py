"""An interrupted ``pulumi up``, with the real engine signalled in the middle of a deploy.

The colmena stand-in holds ulf's deploy (``COLMENA_HOLD_HOSTS``) until the test releases it;
meanwhile the test sends the engine SIGINT (Ctrl-C: the engine puts each plugin in a process
group of its own, so a terminal's Ctrl-C reaches the engine only), SIGINT twice (Ctrl-C
again, "to force": the engine then kills its plugins' process groups), or SIGKILL.
In every case the running colmena is allowed to finish (the python runner starts it in a
session of its own, writing to files, so neither the signal nor the end of the engine or the
provider reaches it), the state file stays readable, and the next ``up`` deploys what was not
recorded as done — and nothing that was.
Gates are off here (test_health.py covers them). olaf is the only K3s server here, the other
K3s hosts run agents: without the gates a server whose end was not recorded would join a
running cluster to this stack, which is refused (test_membership), and the next ``up`` would
stop there. The rolling order runs olaf, then the agent hosts one at a time, ulf first, and
ulrich (no K3s) beside them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from engine import (
    engine_dirs,
    engine_pid,
    netns_available,
    require_engine,
    start_pulumi,
)
from test_pulumi_integration import HOSTS, STACK, Project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a network namespace")
    p = Project(tmp_path)
    # olaf's server the only one: ulf keeps its agent, rolf runs one instead of a server
    k3s = p.cluster / "plans" / "k3s.csv"
    rows = [r for r in k3s.read_text().splitlines() if not r.startswith("ulf,ulf-k3s-server,")]
    k3s.write_text("\n".join(rows).replace("rolf,rolf-k3s-server,server,", "rolf,rolf-k3s-agent,agent,") + "\n")
    return p


def _calls(p: Project) -> list[dict[str, Any]]:
    log = p.dir.parent / "colmena.log"
    return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []


def _wait_for(path: Path, proc: Any, what: str, limit: float = 240) -> None:
    end = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, f"pulumi ended before {what}"
        assert time.monotonic() < end, f"no {what} after {limit}s"
        time.sleep(0.1)


def _interrupted_up(p: Project, tmp_path: Path, how: str) -> str:
    hold = tmp_path / "hold"
    log = tmp_path / "colmena.log"
    out = tmp_path / f"up-{how}.txt"
    # after the engine ends, the namespace (and everything in it) ends with it: wait there
    # for the held colmena to finish first, as it would on a machine of its own
    teardown = (
        f"n=0; while ! grep -q {json.dumps('hosts.: ..ulf..')} {log} 2>/dev/null "
        "&& [ $n -lt 600 ]; do n=$((n+1)); sleep 0.1; done"
    )
    proc = start_pulumi(
        ["up", "--yes", "--skip-preview", "--non-interactive", "--stack", STACK],
        cwd=p.dir,
        env={"COLMENA_LOG": str(log), "COLMENA_HOLD": str(hold), "COLMENA_HOLD_HOSTS": "ulf"},
        setup=":",
        teardown=teardown,
        out=out,
    )
    try:
        _wait_for(Path(f"{hold}.ulf.started"), proc, "ulf's deploy")
        pid = engine_pid(proc)
        assert pid is not None
        if how == "twice":  # Ctrl-C, then Ctrl-C again ("press ^C again to force")
            os.kill(pid, signal.SIGINT)
            time.sleep(1)
            os.kill(pid, signal.SIGINT)
        else:
            os.kill(pid, signal.SIGINT if how == "sigint" else signal.SIGKILL)
        time.sleep(2)  # the engine takes the signal while ulf's colmena still runs
        assert not [c for c in _calls(p) if c["hosts"] == ["ulf"]]
        Path(f"{hold}.release").touch()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    return out.read_text(errors="replace")


def _state(p: Project) -> dict[str, Any]:
    path = engine_dirs(p.dir).stack_file("k3scluster", STACK)
    return json.loads(path.read_text())  # type: ignore[no-any-return]


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.parametrize("how", ["sigint", "twice", "sigkill"])
def test_an_interrupted_up_lets_colmena_finish_and_the_next_up_does_the_rest(
    project: Project, tmp_path: Path, how: str
) -> None:
    text = _interrupted_up(project, tmp_path, how)
    calls = _calls(project)
    # olaf (the server host) was done; ulf's colmena ran to its end, undisturbed; no other
    # agent host started (each waits for the one before); ulrich (no K3s) may have run
    # beside ulf
    first = [c["hosts"][0] for c in calls]
    assert first[0] == "olaf" and "ulf" in first, text[-3000:]
    assert set(first) <= {"olaf", "ulf", "ulrich"} and len(first) == len(set(first)), first
    assert all(c["exit"] == 0 for c in calls)
    state = _state(project)  # readable
    done = {r["urn"].split("::")[-1] for r in state["checkpoint"]["latest"]["resources"]}
    pending = state["checkpoint"]["latest"].get("pending_operations") or []
    assert "olaf-deploy" in done
    if how == "sigint":
        # the engine waited for the running step: ulf's deploy is recorded as done
        assert "ulf-deploy" in done and not pending
    elif how == "sigkill":
        # killed: ulf's end was never recorded; the state names it as a pending operation
        assert "ulf-deploy" not in done
    # forced: the engine does not wait for the step (the provider is killed; colmena, in its
    # own session, is not). Either ulf's deploy is done, or it is the one pending operation:
    # (ulrich's deploy, when it was running beside ulf's, is in the same position)
    pending_names = {o["resource"]["urn"].split("::")[-1] for o in pending}
    assert pending_names <= {"ulf-deploy", "ulrich-deploy"}
    assert ("ulf-deploy" in done) != ("ulf-deploy" in pending_names)

    if how == "sigkill":
        # a killed engine leaves its lock: `pulumi cancel` is what pulumi itself asks for
        r = project.pulumi("up", "--yes", "--skip-preview", "--stack", STACK)
        assert r.returncode != 0 and "pulumi cancel" in r.stdout + r.stderr
        r = project.pulumi("cancel", "--yes", "--stack", STACK)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    if pending:
        # the README's recovery: drop the pending create (ulf's deploy is then not in the
        # state at all, so the next up deploys ulf again)
        r = project.pulumi("refresh", "--yes", "--clear-pending-creates", "--stack", STACK)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert not _state(project)["checkpoint"]["latest"].get("pending_operations")
    r = project.pulumi("up", "--yes", "--skip-preview", "--stack", STACK)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "pending operations" not in r.stdout + r.stderr
    after = [c["hosts"][0] for c in _calls(project)][len(first):]
    # what was recorded as done is not deployed again; what was not, is (ulf's deploy when
    # its end was not recorded: an agent that joins needs no gate)
    assert sorted(after) == sorted(h for h in HOSTS if f"{h}-deploy" not in done), after
    assert set(HOSTS) <= {c["hosts"][0] for c in _calls(project)}
    plan = project.preview()
    assert {s["op"] for s in plan["steps"]} == {"same"}
