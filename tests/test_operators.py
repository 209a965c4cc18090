"""Several operators on one stack: nothing a step records depends on whose checkout runs it.

With Pulumi's mocks (both runners): two checkouts of the project at different paths, each with
its own clone of the cluster directory and its own home, the same stack file (clusterDir, ssh
files and kubeconfig as relative or ``~`` paths), register exactly the same inputs, and none of
them names a path of either machine. The real engine on a shared PostgreSQL backend is below.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine import (
    changes,
    engine_pid,
    netns_available,
    require_engine,
    run_pulumi,
    start_pulumi,
)
from postgres import Postgres
from postgres import available as pg_available
from test_components import STEP_TYPES, RecordingMonitor, run_program

from k3scluster.stackpaths import STEP_PYTHON

ROOT = Path(__file__).resolve().parent.parent


class Checkout:
    """One operator: a copy of the program, a clone of the cluster, a home with an ssh key."""

    def __init__(self, base: Path, example: Path) -> None:
        self.base = base
        self.project = base / "src" / "project"
        self.cluster = base / "src" / "cluster"
        self.home = base / "home"
        self.project.mkdir(parents=True)
        shutil.copy(ROOT / "__main__.py", self.project)
        shutil.copytree(example, self.cluster, ignore=shutil.ignore_patterns(".k3scluster"))
        (self.home / ".ssh").mkdir(parents=True)
        (self.home / ".ssh" / "id_ed25519").write_text("not a key: never read by the program\n")

    def run(self, runner: str, monkeypatch: pytest.MonkeyPatch) -> RecordingMonitor:
        monkeypatch.setenv("HOME", str(self.home))
        return run_program(
            "../cluster",
            runner,
            main=self.project / "__main__.py",
            sshIdentity="~/.ssh/id_ed25519",
            sshKnownHosts="../cluster/known_hosts",
            kubeconfigPath="~/.kube/k3s",
            buildIsos="true",
        )


def _custom(m: RecordingMonitor) -> dict[str, str]:
    """name -> inputs as sent, for every custom resource (the steps)."""
    return {r.name: r.raw for r in m.registered if r.type in STEP_TYPES}


@pytest.mark.parametrize("runner", ["command", "python"])
def test_two_checkouts_record_the_same_steps(
    tmp_path: Path, example_dir: Path, runner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ann = Checkout(tmp_path / "ann", example_dir)
    bob = Checkout(tmp_path / "bob" / "deeper", example_dir)
    a, b = _custom(ann.run(runner, monkeypatch)), _custom(bob.run(runner, monkeypatch))
    assert a and set(a) == set(b)
    for name in a:
        assert a[name] == b[name], name
        for where in (tmp_path, ROOT):
            assert str(where) not in a[name], (name, where)
    raw = "\n".join(a.values())
    # what the steps record instead: the launcher, the stack file's own texts
    assert "scripts/k3scluster-python" in raw
    assert "../cluster/.k3scluster/mock/hive.nix" in raw
    assert "~/.ssh/id_ed25519" in raw and "~/.kube/k3s" in raw
    assert '"dir"' not in raw


class VmCheckout(Checkout):
    """A checkout whose stack is a VM stack (its lab under the cluster's .k3scluster/)."""

    def run_vms(self, runner: str, monkeypatch: pytest.MonkeyPatch,
                state: dict[str, Any]) -> RecordingMonitor:
        from test_update_components import StateMocks

        from k3scluster.lab import netcheck

        # the program checks this machine's routes; the mocks must not depend on them
        monkeypatch.setattr(netcheck, "check_machine", lambda *a: None)
        monkeypatch.setenv("HOME", str(self.home))
        return run_program("../cluster", runner, main=self.project / "__main__.py",
                           mocks=StateMocks(state), vms="true", vmAccel="tcg")


@pytest.mark.parametrize("runner", ["command", "python"])
def test_a_moved_vm_stack_records_the_same_lab(
    request: pytest.FixtureRequest, example_dir: Path, runner: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A VM stack's checkout and cluster moved elsewhere (or another operator's): its lab's
    steps (network, one machine per VM) record exactly what they did, so a preview shows no
    change, and no path of either place: the lab directory, the ISOs' result links and the
    known_hosts file as the stack file names them, resolved when a step runs."""
    from test_components import _argv
    from test_vm_components import lab_state

    from k3scluster.lab.spec import VmSpec

    state = lab_state(runner, {"state": "ok", "lab": "0123abcd"})
    base = Path(tempfile.mkdtemp(prefix="k3mv-"))  # a unix socket's path is short
    request.addfinalizer(lambda: shutil.rmtree(base))
    here = VmCheckout(base / "a", example_dir)
    moved = VmCheckout(base / "b" / "c", example_dir)
    m = here.run_vms(runner, monkeypatch, state)
    a, b = _custom(m), _custom(moved.run_vms(runner, monkeypatch, state))
    lab = [n for n in a if n.endswith(("-vm-machine", "-lab-network"))]
    assert len(lab) == 6 and set(a) == set(b)
    for name in a:
        assert a[name] == b[name], name
        for where in (base, ROOT):
            assert str(where) not in a[name], (name, where)
    spec = VmSpec.from_json(_argv(m.named("olaf-vm-machine"), runner)[-1])
    assert spec.dir == "../cluster/.k3scluster/mock-lab/olaf"
    assert spec.iso_result == "../cluster/.k3scluster/mock-iso/olaf"
    assert spec.known_hosts == "../cluster/.k3scluster/mock-vm-known_hosts"
    # resolved where a step runs (the project directory)
    monkeypatch.chdir(moved.project)
    assert spec.path == moved.cluster / ".k3scluster" / "mock-lab" / "olaf"


@pytest.mark.parametrize("runner", ["command", "python"])
def test_a_vm_made_before_relative_paths_is_not_installed_again(
    request: pytest.FixtureRequest, example_dir: Path, runner: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A VM whose machine step recorded its directory's absolute path (before specs recorded
    it relative to the project): in that same directory, with nothing else changed, its
    recorded triggers are kept (no replacement, no new install), and its hardware fetch's
    too; when its lab has moved, the triggers are the relative ones (installed again once)."""
    from test_components import RUNNERS, STEP_TYPES, _argv
    from test_vm_components import lab_state

    from k3scluster.lab.spec import VmSpec

    base = Path(tempfile.mkdtemp(prefix="k3mv-"))
    request.addfinalizer(lambda: shutil.rmtree(base))
    here = VmCheckout(base / "a", example_dir)
    moved = VmCheckout(base / "b" / "c", example_dir)
    state = lab_state(runner, {"state": "ok", "lab": "0123abcd"})
    new = here.run_vms(runner, monkeypatch, state)
    spec = VmSpec.from_json(_argv(new.named("olaf-vm-machine"), runner)[-1])
    legacy = spec.replace_keys(dir_as=str(here.cluster / ".k3scluster" / "mock-lab" / "olaf"))
    assert legacy != spec.replace_keys()
    typ = STEP_TYPES[RUNNERS.index(runner)]
    urn = ("urn:pulumi:mock::k3scluster::k3scluster:index:Cluster$k3scluster:index:Lab$"
           f"k3scluster:index:Vm${typ}::olaf-vm-machine")
    state[urn] = {"type": typ, "outputs": {"create": "vm-up", "triggers": legacy}}
    kept = here.run_vms(runner, monkeypatch, state)
    assert list(kept.named("olaf-vm-machine").inputs["triggers"]) == legacy
    assert list(kept.named("cluster-olaf-hardware").inputs["triggers"]) == [
        spec.ip, *legacy]
    ulf = VmSpec.from_json(_argv(kept.named("ulf-vm-machine"), runner)[-1])
    assert list(kept.named("ulf-vm-machine").inputs["triggers"]) == ulf.replace_keys()
    elsewhere = moved.run_vms(runner, monkeypatch, state)
    assert list(elsewhere.named("olaf-vm-machine").inputs["triggers"]) == spec.replace_keys()


# --- the real engine: two operators on one PostgreSQL backend --------------------------------

STANDIN = ROOT / "tests" / "bin" / "colmena"
STACK = "it"
HOSTS = ("olaf", "ulf", "rolf", "karl", "ulrich")
LOCKED = "the stack is currently locked by 1 lock(s)"
# the README's query for a stack's locks in PostgreSQL (each lock's JSON is base64 in "data")
SHOW_LOCKS = (
    "select key, convert_from(decode(data->>'data', 'base64'), 'UTF8') from pulumi_state "
    "where key like '%/.pulumi/locks/%'"
)


def _git(cwd: Path, *args: str) -> str:
    r = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd, capture_output=True, text=True, check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


class Operator:
    """A checkout of the project (a copy of its tree) at a path of its own, a clone of the
    team's cluster repository beside it, the shared backend and passphrase."""

    def __init__(self, base: Path, origin: Path, backend: str, passphrase: Path) -> None:
        self.project = base / "project"
        self.cluster = base / "cluster"
        self.log = base / "colmena.log"
        self.env = {
            "PULUMI_BACKEND_URL": backend,
            "PULUMI_CONFIG_PASSPHRASE_FILE": str(passphrase),
            "COLMENA_LOG": str(self.log),
        }
        self.project.mkdir(parents=True)
        for f in ("Pulumi.yaml", "__main__.py"):
            shutil.copy(ROOT / f, self.project)
        for d in ("k3scluster", "templates", "scripts"):
            shutil.copytree(ROOT / d, self.project / d, ignore=shutil.ignore_patterns("__pycache__"))
        assert (self.project / STEP_PYTHON).is_file()
        _git(base, "clone", "-q", str(origin), "cluster")
        self.fix_modes()

    def fix_modes(self) -> None:
        for f in ("token", "passwd"):  # git keeps no modes
            (self.cluster / "secrets" / f).chmod(0o600)

    def pulumi(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return run_pulumi(
            [*args, "--non-interactive"], cwd=self.project, env={**self.env, **(env or {})}
        )

    def start_up(self, out: Path, env: dict[str, str], teardown: str) -> Any:
        return start_pulumi(
            ["up", "--yes", "--skip-preview", "--non-interactive", "--stack", STACK],
            cwd=self.project, env={**self.env, **env}, setup=":", teardown=teardown, out=out,
        )

    def up(self) -> Any:
        r = self.pulumi("up", "--yes", "--skip-preview", "--stack", STACK)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
        return r

    def preview(self) -> dict[str, Any]:
        r = self.pulumi("preview", "--json", "--stack", STACK)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def calls(self) -> list[str]:
        if not self.log.exists():
            return []
        return [json.loads(ln)["hosts"][0] for ln in self.log.read_text().splitlines()]


def _wait_for(path: Path, proc: Any, what: str, limit: float = 240) -> None:
    end = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, f"pulumi ended before {what}"
        assert time.monotonic() < end, f"no {what} after {limit}s"
        time.sleep(0.1)


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a loopback-only network namespace")
    why = pg_available()
    if why:
        pytest.skip(why)
    with Postgres.start() as pg:
        yield pg


@pytest.mark.integration
@pytest.mark.root
def test_two_operators_share_one_stack_in_postgresql(tmp_path: Path, postgres: Postgres) -> None:
    # the team's cluster repository: the example, every host with a hardware file (no ssh)
    origin = tmp_path / "origin"
    shutil.copytree(ROOT / "examples" / "cluster", origin, ignore=shutil.ignore_patterns(".k3scluster"))
    for h in HOSTS:
        hw = origin / "nixConfigs" / f"{h}.hardware.nix"
        if not hw.exists():
            hw.write_text("{ ... }: { }\n")
    _git(origin, "init", "-q")
    _git(origin, "add", "-A")
    _git(origin, "commit", "-q", "-m", "cluster")
    passphrase = tmp_path / "passphrase"  # the team's secrets provider
    passphrase.write_text("the team's passphrase\n")
    passphrase.chmod(0o600)
    ann = Operator(tmp_path / "ann" / "src", origin, postgres.url, passphrase)
    bob = Operator(tmp_path / "bob" / "work" / "deeper", origin, postgres.url, passphrase)
    stack_file = (
        "config:\n"
        "  k3scluster:clusterDir: ../cluster\n"
        f"  k3scluster:colmena: {STANDIN}\n"
        "  k3scluster:runner: python\n"
        "  k3scluster:waitReady: false\n"
    )
    (ann.project / f"Pulumi.{STACK}.yaml").write_text(stack_file)
    r = ann.pulumi("stack", "init", STACK)
    assert r.returncode == 0, r.stdout + r.stderr
    # the stack file (with its encryptionsalt) is shared, as the project's repository shares it
    shutil.copy(ann.project / f"Pulumi.{STACK}.yaml", bob.project)
    assert "pulumi_state" in postgres.sql("select tablename from pg_tables")

    # 1. ann deploys; bob, from his own checkout and clone, has nothing to do
    ann.up()
    assert sorted(ann.calls()) == sorted(HOSTS)
    assert changes(bob.preview()) == {}
    assert changes(ann.preview()) == {}

    # 2. a change every K3s host takes (a new token), pulled by both
    (origin / "secrets" / "token").write_text("a-new-token-0123456789abcdef\n")
    _git(origin, "commit", "-q", "-am", "new token")
    for op in (ann, bob):
        _git(op.cluster, "pull", "-q")
        op.fix_modes()
    changed = {n.removesuffix("-deploy") for n in changes(bob.preview()) if n.endswith("-deploy")}
    assert {"olaf", "ulf", "rolf"} <= changed and "ulrich" not in changed  # the servers' token

    # 3. ann's up holds in ulf's deploy (olaf, the init-server's host, is done)
    hold = tmp_path / "hold"
    teardown = (  # the namespace ends with the engine: let the held colmena end first
        f"n=0; while [ $(grep -c {json.dumps('hosts.: ..ulf..')} {ann.log}) -lt 2 ] "
        "&& [ $n -lt 600 ]; do n=$((n+1)); sleep 0.1; done"
    )
    proc = ann.start_up(
        tmp_path / "ann-up.txt",
        {"COLMENA_HOLD": str(hold), "COLMENA_HOLD_HOSTS": "ulf"},
        teardown,
    )
    try:
        _wait_for(Path(f"{hold}.ulf.started"), proc, "ulf's deploy")
        # bob's up meanwhile is refused by Pulumi's lock, and changes nothing
        r = bob.pulumi("up", "--yes", "--skip-preview", "--stack", STACK)
        assert r.returncode != 0
        assert LOCKED in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
        assert bob.calls() == []
        assert not (bob.cluster / ".k3scluster").exists()  # not even the render ran
        # the lock, as the README shows it: who holds it, from where
        locks = postgres.sql(SHOW_LOCKS)
        assert locks.count("\n") == 1 and '"pid"' in locks and '"hostname"' in locks, locks
        # 4. ann's machine dies mid-up: the engine killed; ulf's colmena still ends
        pid = engine_pid(proc)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(2)
        Path(f"{hold}.release").touch()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ann.calls()[len(HOSTS):] == ["olaf", "ulf"]

    # 5. the README's recovery, by bob: the stale lock is seen, then cleared
    r = bob.pulumi("up", "--yes", "--skip-preview", "--stack", STACK)
    assert r.returncode != 0 and LOCKED in r.stdout + r.stderr and "pulumi cancel" in r.stdout + r.stderr
    r = bob.pulumi("cancel", "--yes", "--stack", STACK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert postgres.sql(SHOW_LOCKS) == ""
    r = bob.pulumi("refresh", "--yes", "--clear-pending-creates", "--stack", STACK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # bob's up deploys what was left (ulf again: its end was never recorded), not olaf
    bob.up()
    assert sorted(bob.calls()) == sorted(changed - {"olaf"})
    assert changes(ann.preview()) == {}
    assert changes(bob.preview()) == {}
