"""A preview a person can read (the real engine on the example, with the colmena stand-in).

A host's plan values are in clear in its deploy step, digests are short, and ``pulumi preview
--diff`` prints only what changed: a re-addressed host shows its old and new address on one
``=>`` line and none of its unchanged plan values or digests (the step runner answers a change
"unknown", so the engine diffs the inputs itself: runner.StepProvider.diff), the first preview
of a six-host cluster stays short, and no secret is ever in clear.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from engine import netns_available, require_engine
from test_pulumi_integration import POISON_HASH, POISON_TOKEN, STACK, Project

from k3scluster.records import PYTHON_STEP_TYPE, is_digest_name

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a loopback-only network namespace")
    p = Project(tmp_path)
    # a sixth host (an agent), as the issue measures: the example has five
    hosts = p.cluster / "plans" / "hosts.csv"
    hosts.write_text(hosts.read_text() + "uwe,eno1,10.0.100.7,manfred,,efi,shelf\n")
    k3s = p.cluster / "plans" / "k3s.csv"
    k3s.write_text(k3s.read_text() + "uwe,uwe-k3s-agent,agent,10.0.100.16\n")
    (p.cluster / "nixConfigs" / "uwe.hardware.nix").write_text("{ ... }: { }\n")
    return p


def _preview_diff(project: Project) -> list[str]:
    r = project.pulumi("preview", "--diff", "--stack", STACK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert POISON_TOKEN not in r.stdout + r.stderr and POISON_HASH not in r.stdout + r.stderr
    return r.stdout.splitlines()


def _shown(key: str, text: str) -> bool:
    """Whether the preview prints property ``key`` (as ``key : value``, changed or not)."""
    return re.search(rf"^\s*[~+-]?\s*{re.escape(key)}\s*:", text, re.MULTILINE) is not None


def test_the_first_preview_of_six_hosts_is_short(project: Project) -> None:
    first = _preview_diff(project)
    # 228 with two maps per deploy step and an InstallerIso per host; about 615 for five before
    assert len(first) < 200, "\n".join(first)
    assert not re.search(r"[0-9a-f]{64}", "\n".join(first))


def test_a_re_addressed_host_reads_like_a_sentence(tmp_path: Path) -> None:
    """A move needs the gates (membership.py refuses it with waitReady false), so this one
    runs in test_health's lab (five hosts: real sshds at the plan addresses, the K3s API
    stand-in); a preview contacts nothing."""
    from test_health import Project as GatedProject
    from test_health import new_lab

    p = GatedProject(tmp_path, new_lab(tmp_path))
    r = p.up()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    hosts = p.cluster / "plans" / "hosts.csv"
    hosts.write_text(hosts.read_text().replace("karl,eni1,10.0.100.5,", "karl,eni1,10.0.100.50,"))
    r = p.pulumi("preview", "--diff")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    text = r.stdout
    assert len(lines) < 40, text  # 25 here; 40 or more when the engine printed every input
    # old and new address on one line, in the deploy step's plan
    assert re.search(r'address\s*: "10\.0\.100\.5" => "10\.0\.100\.50"', text), text
    # the digest that changed, short; no unchanged plan value, no unchanged digest
    assert re.search(r'file:hosts/karl\.nix\s*: "[0-9a-f]{12}" => "[0-9a-f]{12}"', text), text
    assert not re.search(r"[0-9a-f]{64}", text), text
    for same in ("admin", "boot", "interface", "location", "network", "nixos", "roles",
                 "init-server", "k3s agent", "modules", "k3s:agent", "host",
                 "nixConfig:nixConfigs/karl.hardware.nix", "secret:passwd-manfred",
                 "secret:k3s-agent-token"):
        assert not _shown(same, text), f"{same} did not change:\n{text}"
    # only karl's deploy changes
    assert "karl-deploy" in text and not re.search(r"(olaf|ulf|rolf|ulrich)-deploy", text)
    state = p.state_text()
    assert POISON_TOKEN not in state and POISON_HASH not in state


def _old_layout(props: dict[str, Any], render_dir: Path) -> None:
    """A deploy step's properties as an older version might have recorded them: commands as
    argv lists, whole sha256s of the rendered files, the plan values in a map of their own
    (``plan``), the K3s releases among them, and the host named in a property ``host``."""
    for key in ("create", "update"):
        if isinstance(props.get(key), str):
            props[key] = shlex.split(props[key])
    inputs = props["inputs"]
    assert "plan" not in props and "host" not in props
    argv = props["create"]  # an argv list by now
    props["host"] = argv[argv.index("--host") + 1]
    plan = props["plan"] = {}
    for name in list(inputs):
        if name.startswith("file:"):
            whole = hashlib.sha256((render_dir / name[len("file:"):]).read_bytes()).hexdigest()
            assert whole.startswith(inputs[name])
            inputs[name] = whole
        elif name.startswith("k3s:") or not is_digest_name(name):
            plan[name] = inputs.pop(name)
    assert "address" in plan


def _installer_component(host: dict[str, Any]) -> dict[str, Any]:
    """The InstallerIso an older version registered under every host, with buildIsos off."""
    base, name = host["urn"].rsplit("::", 1)
    return {"urn": f"{base}$k3scluster:index:InstallerIso::{name}-installer", "custom": False,
            "type": "k3scluster:index:InstallerIso", "parent": host["urn"],
            "outputs": {"digest": "ab" * 32, "image": None, "sha256": None}}


def test_an_up_after_an_upgrade_that_only_shows_values_another_way_runs_no_colmena(
    project: Project,
) -> None:
    """Item 3 of the readable preview: the same values recorded in another layout (runner
    .trigger_view) are no reason to deploy; the state is rewritten into an older layout with
    ``pulumi stack export/import``, as a state written by an earlier version would be (with
    an InstallerIso per host, which the program registers only when it builds the image)."""
    project.up()
    deployed = len(project.colmena_calls())
    exported = project.pulumi("stack", "export", "--stack", STACK)
    assert exported.returncode == 0, exported.stderr
    state = json.loads(exported.stdout)
    rewritten = 0
    for res in state["deployment"]["resources"]:
        if res["type"] == PYTHON_STEP_TYPE and res["urn"].endswith("-deploy"):
            for part in ("inputs", "outputs"):
                _old_layout(res[part], project.render_dir)
            rewritten += 1
    assert rewritten == 6
    hosts = [r for r in state["deployment"]["resources"] if r["type"] == "k3scluster:index:Host"]
    state["deployment"]["resources"] += [_installer_component(h) for h in hosts]
    dump = project.dir / "old-layout.json"
    dump.write_text(json.dumps(state))
    imported = project.pulumi("stack", "import", "--stack", STACK, "--file", str(dump))
    assert imported.returncode == 0, imported.stderr
    steps = project.preview()["steps"]
    # the InstallerIsos no longer registered (buildIsos off) leave the state, nothing else
    gone = {f"{h['urn'].rsplit('::', 1)[-1]}-installer": "delete" for h in hosts}
    assert {s["urn"].rsplit("::", 1)[-1]: s["op"] for s in steps if s["op"] != "same"} == gone
    project.up()
    assert project.colmena_calls()[deployed:] == []
    assert "InstallerIso" not in project.state_text()
    # a real change still deploys, and only that host (its interface: a move needs the gates)
    hosts = project.cluster / "plans" / "hosts.csv"
    hosts.write_text(hosts.read_text().replace("karl,eni1,", "karl,eni2,"))
    project.up()
    assert [c["hosts"] for c in project.colmena_calls()[deployed:]] == [["karl"]]
