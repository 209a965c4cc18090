"""Updates under the real engine (.tools/bin/pulumi), offline, with the colmena stand-in.

The example cluster: three servers (olaf, the init-server, and ulf carry an agent too; rolf
has none), an agent on a host of its own (karl) and a host without K3s (ulrich). The stand-in
records every deploy in order, with the hive it was given and the K3s releases that hive
gives the host (tests/bin/colmena, ``k3s``), so the order and the version each deploy carries
are read from what colmena was asked to do. Runs in a loopback-only network namespace.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
from engine import changes
from test_pulumi_integration import STACK, Project

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture
def project(tmp_path: Any) -> Project:
    from engine import netns_available, require_engine

    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a loopback-only network namespace")
    return Project(tmp_path)


def set_k3s(project: Project, minor: str) -> None:
    net = project.cluster / "plans" / "network.yaml"
    net.write_text(re.sub(r'(?m)^k3s: .*$', f'k3s: "{minor}"', net.read_text()))


def deploys(project: Project, since: int = 0) -> list[dict[str, Any]]:
    return [c for c in project.colmena_calls()[since:] if c["argv"][0] == "apply"]


def test_a_k3s_minor_upgrade_moves_every_server_before_any_agent(project: Project) -> None:
    set_k3s(project, "1.34")
    project.up()
    first = deploys(project)
    assert all(c["k3s"]["agent"] in ("k3s_1_34", None) for c in first)

    set_k3s(project, "1.35")
    plan = project.preview()
    got = changes(plan)
    # the first pass of the server hosts that carry an agent is a step of its own
    assert got["olaf-servers-first"] == "create" and got["ulf-servers-first"] == "create"
    assert got["cluster-render"] == "update"
    for h in ("olaf", "ulf", "rolf", "karl"):
        assert got[f"{h}-deploy"] == "update", h
    # the preview names the release each deploy carries
    step = next(s for s in plan["steps"] if s["urn"].endswith("::olaf-servers-first"))
    assert step["newState"]["inputs"]["inputs"]["k3s:agent"] == "1.34"
    assert step["newState"]["inputs"]["inputs"]["k3s:server"] == "1.35"

    before = len(project.colmena_calls())
    project.up()
    calls = deploys(project, before)
    seen = [
        (c["hosts"][0], c["argv"][c["argv"].index("-f") + 1].split("/")[-2:], c["k3s"])
        for c in calls
    ]
    release = "k3s_1_35"
    # 1. the server hosts one at a time, the init-server's first; agents kept at 1.34
    assert seen[:3] == [
        ("olaf", ["servers-first", "olaf.nix"], {"release": release, "agent": "k3s_1_34"}),
        ("ulf", ["servers-first", "ulf.nix"], {"release": release, "agent": "k3s_1_34"}),
        ("rolf", [project.render_dir.name, "hive.nix"], {"release": release, "agent": release}),
    ]
    # 2. then the agents move, one host at a time: olaf and ulf again, then karl; ulrich has
    # no K3s and nothing else changed for it: not deployed
    rest = {h: (f, k) for h, f, k in seen[3:]}
    assert [h for h, _, _ in seen[3:]] == ["olaf", "ulf", "karl"]
    for h in ("olaf", "ulf", "karl"):
        assert rest[h] == ([project.render_dir.name, "hive.nix"],
                           {"release": release, "agent": release}), h
    # no agent deploy started before the last server host's deploy ended
    last_server = calls[2]["end"]
    assert all(c["start"] >= last_server for c in calls[3:])
    # at no moment a kubelet newer than an API server: replay the deploys in order
    servers = {"olaf": "k3s_1_34", "ulf": "k3s_1_34", "rolf": "k3s_1_34"}
    agents = {"olaf": "k3s_1_34", "ulf": "k3s_1_34", "karl": "k3s_1_34"}
    for h, _, k3s in seen:
        if h in servers:
            servers[h] = k3s["release"]
        if h in agents:
            agents[h] = k3s["agent"]
        assert max(agents.values()) <= min(servers.values()), (h, servers, agents)

    # the next run: the first-pass steps and hives go, nothing is deployed
    after = project.preview()
    assert changes(after) == {
        "olaf-servers-first": "delete",
        "ulf-servers-first": "delete",
        "cluster-render": "update",
    }
    before = len(project.colmena_calls())
    project.up()
    assert deploys(project, before) == []
    assert not (project.render_dir / "servers-first").exists()
    assert changes(project.preview()) == {}




def set_release(project: Project, nixos: str, k3s: str | None) -> None:
    net = project.cluster / "plans" / "network.yaml"
    text = re.sub(r'(?m)^nixos: .*$', f'nixos: "{nixos}"', net.read_text())
    text = re.sub(r"(?m)^k3s: .*\n", "", text)
    text += "" if k3s is None else f'k3s: "{k3s}"\n'
    net.write_text(text)


def check_with_stack(project: Project) -> subprocess.CompletedProcess[str]:
    from engine import ROOT, engine_env

    return subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "k3scluster", "check", str(project.cluster),
         "--stack", STACK, "--project", str(project.dir)],
        cwd=ROOT, env=engine_env(project.dir), capture_output=True, text=True, check=False,
    )


def test_a_jump_of_two_k3s_minors_is_refused_by_preview_and_check(project: Project) -> None:
    set_release(project, "25.11", "1.33")
    project.up()
    assert check_with_stack(project).returncode == 0
    # NixOS 26.05 without k3s: would take its default, 1.35: two minors at once
    set_release(project, "26.05", None)
    before = len(project.colmena_calls())
    r = project.pulumi("preview", "--stack", STACK)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "would move K3s from 1.33 to 1.35, past 1.34" in out, out[-3000:]
    assert 'k3s: "1.34"' in out
    r = project.up(ok=False)
    assert r.returncode != 0 and len(project.colmena_calls()) == before  # nothing deployed
    got = check_with_stack(project)
    assert got.returncode == 1, got.stdout + got.stderr
    assert "stack it: plans/network.yaml: no k3s:, so NixOS 26.05's default K3s 1.35" in got.stdout
    assert "past 1.34" in got.stdout
    # one minor at a time passes
    set_release(project, "26.05", "1.34")
    assert check_with_stack(project).returncode == 0
    project.up()


def forget_k3s_releases(project: Project, old_digest: str | None = None) -> None:
    """The state as a k3scluster wrote it before the deploys recorded their K3s releases
    (``pulumi stack export``, edited, ``pulumi stack import``): no k3s:server/k3s:agent in any
    step; with ``old_digest`` the sha256 of the plan's release that such a deploy recorded."""
    import json
    import tempfile

    r = project.pulumi("stack", "export", "--stack", STACK)
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    for res in state["deployment"]["resources"]:
        for props in (res.get("inputs") or {}, res.get("outputs") or {}):
            got = props.get("inputs")
            if isinstance(got, dict) and "k3s-common.nix" in str(got.get("modules")):
                got.pop("k3s:server", None)
                got.pop("k3s:agent", None)
                if old_digest is not None:
                    got["version:k3s"] = old_digest
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=project.dir) as f:
        json.dump(state, f)
        f.flush()
        r = project.pulumi("stack", "import", "--stack", STACK, "--file", f.name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_state_without_k3s_releases_needs_k3s_written(project: Project) -> None:
    import hashlib

    set_release(project, "25.11", "1.33")
    project.up()
    forget_k3s_releases(project)
    # NixOS 26.05 without k3s: would take its default (1.35); what the hosts run is unknown
    set_release(project, "26.05", None)
    r = project.pulumi("preview", "--stack", STACK)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "records no K3s release for karl, olaf, rolf, ulf" in out, out[-3000:]
    assert "ulrich" not in out.split("records no K3s release for")[1].split("(")[0]
    got = check_with_stack(project)
    assert got.returncode == 1, got.stdout + got.stderr
    assert "cannot be checked" in got.stdout and 'k3s: "1.N"' in got.stdout
    # the release written: the user names it, and it passes, saying what is not checked
    set_release(project, "26.05", "1.34")
    got = check_with_stack(project)
    assert got.returncode == 0, got.stdout + got.stderr
    assert ('warning: stack it: plans/network.yaml: k3s: "1.34" is taken as given for karl, '
            "olaf, rolf, ulf") in got.stdout
    r = project.pulumi("preview", "--stack", STACK)
    assert r.returncode == 0 and 'k3s: "1.34" is taken as given' in r.stdout + r.stderr
    # a state that kept the digest of the release (k3scluster before the releases were
    # recorded): that release is known, and two minors at once are refused
    forget_k3s_releases(project, hashlib.sha256(b"1.33").hexdigest())
    set_release(project, "26.05", None)
    got = check_with_stack(project)
    assert got.returncode == 1 and "would move K3s from 1.33 to 1.35, past 1.34" in got.stdout
