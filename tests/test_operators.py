"""Several operators on one stack: nothing a step records depends on whose checkout runs it.

With Pulumi's mocks (both runners): two checkouts of the project at different paths, each with
its own clone of the cluster directory and its own home, the same stack file (clusterDir, ssh
files and kubeconfig as relative or ``~`` paths), register exactly the same inputs, and none of
them names a path of either machine. The real engine on a shared PostgreSQL backend is below.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_components import STEP_TYPES, RecordingMonitor, run_program

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
