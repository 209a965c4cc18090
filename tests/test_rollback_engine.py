"""A host that fails its health gate goes back to the system it ran before (issue 17 item 5a),
through the real engine.

``pulumi up`` of the example cluster against the lab of tests/test_health.py (a real sshd per
host in network and mount namespaces of the test's own, the K3s API stand-in, the colmena
stand-in). rolf's sshd also has the test's own ``/nix/store`` and ``/nix/var/nix/profiles``:
it runs a stand-in system (tests/test_rollback.py ``make_system``), and colmena's stand-in
activates the new one over ssh as colmena does. Activating the new system makes rolf's K3s
server answer ``/readyz`` 503 (its ``on-switch`` rewrites the API stand-in's script); the old
one makes it answer 200 again. No packet leaves the machine.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
from engine import netns_available, require_engine
from test_health import AGENTS, SERVERS, SSHD, Lab, Project, _text
from test_rollback import make_system


def _api_script(rolf: str) -> str:
    """The API stand-in's script: every server ready but rolf's, which answers ``rolf``."""
    readyz = {ip: ["200"] for _, ip in SERVERS.values()}
    readyz[SERVERS["rolf"][1]] = [rolf]
    return json.dumps({"readyz": readyz, "nodes": {n: ["True"] for n in AGENTS.values()}})


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a loopback-only network namespace")
    if not SSHD.is_file() or not shutil.which("ssh") or not shutil.which("openssl"):
        pytest.skip("needs OpenSSH (ssh, /usr/sbin/sshd) and openssl")
    return Lab(tmp_path)


@pytest.mark.integration
@pytest.mark.root
def test_a_host_that_fails_its_gate_is_rolled_back_and_the_run_says_so(
    lab: Lab, tmp_path: Path
) -> None:
    store, profiles = tmp_path / "rolf-store", tmp_path / "rolf-profiles"
    store.mkdir()
    profiles.mkdir()
    lab.binds["rolf"] = [(store, "/nix/store"), (profiles, "/nix/var/nix/profiles")]
    script = shlex.quote(str(lab.api_script))

    def answers(status: str) -> str:
        return f"printf '%s' {shlex.quote(_api_script(status))} > {script}\n"

    prev = make_system(store, "rolf-prev", on_switch=answers("200"))
    new = make_system(store, "rolf-new", on_switch=answers("503"))
    (profiles / "system-1-link").symlink_to(prev)
    (profiles / "system").symlink_to("system-1-link")
    lab.repoint("rolf", prev)
    lab.api_script.write_text(_api_script("200"))

    p = Project(tmp_path, lab, rollback="true", readyTimeout="6s")
    r = p.up(env={"COLMENA_ACTIVATE": json.dumps({"rolf": new})})
    text = " ".join(_text(r).split())
    assert r.returncode != 0, text[-4000:]
    # the gate failed on the new system, the host went back to the one it ran, whose gate
    # passes, and the run fails naming the host, what failed and where it is now
    assert "rolf: K3s server rolf-k3s-server (10.0.100.14) not ready after 6s" in text
    assert f"rolf was rolled back to {prev} and passes its gates there" in text, text[-4000:]
    run = lab.hosts["rolf"] / "run" / "current-system"
    assert os.readlink(run) == prev
    assert os.readlink(profiles / "system") == "system-3-link"
    assert os.readlink(profiles / "system-2-link") == new
    assert os.readlink(profiles / "system-3-link") == prev
    # the servers before rolf in the chain were deployed and stayed
    assert p.deployed()[:3] == ["olaf", "ulf", "rolf"]
    assert "olaf-deploy" not in (p.preview())
