"""The Pulumi program under the real engine (.tools/bin/pulumi), offline.

Each test gets a project of its own in a temporary directory (Pulumi.yaml, __main__.py and a
link to the k3scluster package), a copy of the example cluster with a hardware file for every
host (so no step would try ssh), runner ``python`` (the command provider cannot be had here),
a file backend, and the recording colmena stand-in (tests/bin/colmena). Every engine run
happens in a network namespace with only loopback (tests/engine.py), so nothing can reach a
plan address.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from engine import changes, engine_dirs, netns_available, require_engine, run_pulumi

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "bin" / "colmena"
STACK = "it"
HOSTS = ("olaf", "ulf", "rolf", "karl", "ulrich")
POISON_TOKEN = "POISON-TOKEN-k3scluster-integration-0123456789abcdef"
POISON_HASH = "$6$poisonSALT$POISONintegrationHASH0123456789abcdefghijklmnopqrstuv"

pytestmark = [pytest.mark.integration, pytest.mark.root]


class Project:
    def __init__(self, base: Path) -> None:
        self.dir = base / "project"
        self.cluster = base / "cluster"
        self.log = base / "colmena.log"
        self.dir.mkdir()
        shutil.copy(ROOT / "Pulumi.yaml", self.dir)
        shutil.copy(ROOT / "__main__.py", self.dir)
        (self.dir / "k3scluster").symlink_to(ROOT / "k3scluster")
        shutil.copytree(
            ROOT / "examples" / "cluster",
            self.cluster,
            ignore=shutil.ignore_patterns(".k3scluster"),
        )
        (self.cluster / "secrets" / "token").write_text(POISON_TOKEN + "\n")
        # the agent token contains the poison too: neither may reach state, log or store
        (self.cluster / "secrets" / "agent-token").write_text(POISON_TOKEN + "-agent\n")
        (self.cluster / "secrets" / "passwd").write_text(POISON_HASH + "\n")
        for f in ("token", "agent-token", "passwd"):
            (self.cluster / "secrets" / f).chmod(0o600)
        for h in HOSTS:
            hw = self.cluster / "nixConfigs" / f"{h}.hardware.nix"
            if not hw.exists():
                hw.write_text("{ ... }: { }\n")
        (self.dir / f"Pulumi.{STACK}.yaml").write_text(
            "config:\n"
            f"  k3scluster:clusterDir: {self.cluster}\n"
            f"  k3scluster:colmena: {STANDIN}\n"
            "  k3scluster:runner: python\n"
            # no K3s runs behind the colmena stand-in: nothing to wait for (test_health.py)
            "  k3scluster:waitReady: false\n"
        )
        self.render_dir = self.cluster / ".k3scluster" / STACK
        r = self.pulumi("stack", "init", STACK)
        assert r.returncode == 0, r.stderr

    def pulumi(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return run_pulumi(
            [*args, "--non-interactive"],
            cwd=self.dir,
            env={"COLMENA_LOG": str(self.log), **(env or {})},
        )

    def preview(self) -> dict[str, Any]:
        r = self.pulumi("preview", "--json", "--stack", STACK)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads(r.stdout)

    def up(self, *extra: str, env: dict[str, str] | None = None, ok: bool = True) -> Any:
        r = self.pulumi("up", "--yes", "--skip-preview", "--stack", STACK, *extra, env=env)
        if ok:
            assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
        return r

    def colmena_calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def state_text(self) -> str:
        return engine_dirs(self.dir).stack_file("k3scluster", STACK).read_text()


@pytest.fixture
def project(tmp_path: Path) -> Project:
    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a loopback-only network namespace")
    return Project(tmp_path)


def test_preview_lists_every_component_and_writes_nothing(project: Project) -> None:
    plan = project.preview()
    types: dict[str, int] = {}
    for s in plan["steps"]:
        assert s["op"] == "create"
        t = s["urn"].split("::")[-2].split("$")[-1]
        types[t] = types.get(t, 0) + 1
    assert types["k3scluster:index:Cluster"] == 1
    assert types["k3scluster:index:Host"] == 5
    assert types["k3scluster:index:K3sServer"] == 3
    assert types["k3scluster:index:K3sAgent"] == 3
    assert "k3scluster:index:InstallerIso" not in types  # buildIsos off: no image to build
    assert types["k3scluster:index:Secret"] == 5  # token, agent token, passwd, two public keys
    # five deploys and the render
    assert types["pulumi-python:dynamic/k3scluster:Step"] == 6
    assert not project.render_dir.exists()
    assert project.colmena_calls() == []


def test_preview_shows_a_hardware_fetch_for_a_host_without_one(project: Project) -> None:
    hw = project.cluster / "nixConfigs" / "karl.hardware.nix"
    hw.unlink()
    names = changes(project.preview())
    assert names["cluster-karl-hardware"] == "create"
    assert "cluster-olaf-hardware" not in names
    assert not hw.exists()  # a preview runs nothing


def test_up_deploys_every_host_init_server_first(project: Project) -> None:
    project.up()
    calls = project.colmena_calls()
    assert sorted(c["hosts"][0] for c in calls) == sorted(HOSTS)
    assert all(c["exit"] == 0 and len(c["hosts"]) == 1 for c in calls)
    for c in calls:
        assert c["argv"][:4] == ["apply", "switch", "--on", c["hosts"][0]]
        assert c["argv"][c["argv"].index("-f") + 1] == str(project.render_dir / "hive.nix")
    order = [c["hosts"][0] for c in calls]
    assert order[0] == "olaf"  # the init-server's host
    assert set(order[1:3]) == {"ulf", "rolf"}  # the other server hosts
    assert set(order[3:]) == {"karl", "ulrich"}
    assert (project.render_dir / "hive.nix").is_file()
    # a second run has nothing to do
    assert changes(project.preview()) == {}
    outputs = json.loads(project.pulumi("stack", "output", "--json", "--stack", STACK).stdout)
    assert outputs["apiEndpoint"] == "https://10.0.100.10:6443"
    assert outputs["hosts"]["olaf"]["roles"] == ["init-server", "agent"]
    assert outputs["hosts"]["olaf"]["ip"] == "10.0.100.2"
    assert len(outputs["hosts"]["olaf"]["digest"]) == 64
    # no image built (buildIsos off), and no InstallerIso component: the outputs stay the same
    assert outputs["hosts"]["olaf"]["installer"] == {"image": None, "sha256": None}


def test_one_changed_nix_config_deploys_that_host_only(project: Project) -> None:
    project.up()
    before = len(project.colmena_calls())
    conf = project.cluster / "nixConfigs" / "olaf.nix"
    conf.write_text(conf.read_text() + "# a change\n")
    plan = project.preview()
    assert changes(plan) == {"olaf-deploy": "update"}
    step = next(s for s in plan["steps"] if s["urn"].endswith("::olaf-deploy"))
    old, new = step["oldState"]["inputs"]["inputs"], step["newState"]["inputs"]["inputs"]
    assert [k for k in new if old.get(k) != new[k]] == ["nixConfig:nixConfigs/olaf.nix"]
    project.up()
    assert [c["hosts"] for c in project.colmena_calls()[before:]] == [["olaf"]]


def test_removed_host_is_deleted_without_touching_the_machine(project: Project) -> None:
    project.up()
    before = len(project.colmena_calls())
    hosts = project.cluster / "plans" / "hosts.csv"
    hosts.write_text(
        "".join(
            ln for ln in hosts.read_text().splitlines(keepends=True) if not ln.startswith("ulrich,")
        )
    )
    # its hardware file stays behind: it must not count as configuration of the others
    assert (project.cluster / "nixConfigs" / "ulrich.hardware.nix").exists()
    names = changes(project.preview())
    assert names["ulrich-deploy"] == "delete"
    assert names["ulrich"] == "delete"
    assert names["cluster-render"] == "update"  # the hive loses the node
    assert not [n for n, op in names.items() if n.endswith("-deploy") and n != "ulrich-deploy"]
    project.up()
    assert "::ulrich-deploy" not in project.state_text()
    assert project.colmena_calls()[before:] == []
    assert "ulrich" not in (project.render_dir / "hive.nix").read_text()


def test_a_failing_host_fails_alone_and_is_retried_alone(project: Project) -> None:
    r = project.up("--continue-on-error", env={"COLMENA_FAIL_HOSTS": "karl"}, ok=False)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "host karl: create failed with exit code 1" in text
    assert "apply switch --on karl" in text  # the argv
    assert "karl | [ERROR] Failed to switch" in text  # the tail of colmena's output
    calls = project.colmena_calls()
    done = {c["hosts"][0] for c in calls if c["exit"] == 0}
    assert done == {"olaf", "ulf", "rolf", "ulrich"}
    assert [c["hosts"] for c in calls if c["exit"] != 0] == [["karl"]]
    # the next run retries karl and nothing else
    assert changes(project.preview()) == {"karl-deploy": "create"}
    before = len(calls)
    project.up()
    assert [c["hosts"] for c in project.colmena_calls()[before:]] == [["karl"]]


def test_no_secret_in_the_state_or_the_colmena_environment(project: Project) -> None:
    project.up()
    state = project.state_text()
    assert "k3scluster:index:Secret" in state
    for poison in (POISON_TOKEN, POISON_HASH, "POISONintegrationHASH"):
        assert poison not in state
    log = project.log.read_text()
    assert POISON_TOKEN not in log and "POISONintegrationHASH" not in log
    # the rendered tree refers to the key files and never holds their content
    for f in project.render_dir.rglob("*"):
        if f.is_file():
            assert POISON_TOKEN not in f.read_text(errors="replace"), f


def test_plan_errors_end_the_run_cleanly(project: Project) -> None:
    hosts = project.cluster / "plans" / "hosts.csv"
    hosts.write_text(hosts.read_text().replace("10.0.100.3", "10.0.100.300"))
    r = project.pulumi("preview", "--stack", STACK)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "plans/hosts.csv:3" in text
    assert "Traceback" not in text
