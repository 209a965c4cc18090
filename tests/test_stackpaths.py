"""Paths as the stack file writes them: recorded by steps, resolved when a step runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from k3scluster.stackpaths import STEP_PYTHON, recorded, resolve, resolve_args

ROOT = Path(__file__).resolve().parent.parent


def test_recorded_uses_the_deepest_root_and_keeps_other_paths() -> None:
    roots = [
        (Path("/home/ann/src/cluster"), "../cluster"),
        (Path("/srv/render"), "/srv/render"),
        (Path("/home/ann/src/cluster/.k3scluster/x"), "~/r"),
        (Path("/home/ann/.ssh/id_ed25519"), "~/.ssh/id_ed25519"),
    ]
    assert recorded(Path("/home/ann/src/cluster/nixConfigs/a.nix"), roots) == Path(
        "../cluster/nixConfigs/a.nix"
    )
    assert recorded(Path("/home/ann/src/cluster"), roots) == Path("../cluster")
    assert recorded(Path("/home/ann/src/cluster/.k3scluster/x/hive.nix"), roots) == Path(
        "~/r/hive.nix"
    )
    assert recorded(Path("/home/ann/.ssh/id_ed25519"), roots) == Path("~/.ssh/id_ed25519")
    assert recorded(Path("/home/ann/src/clusterx/a"), roots) == Path("/home/ann/src/clusterx/a")


def test_resolve_takes_the_home_of_whoever_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "bob"))
    assert resolve("~/.ssh/id") == tmp_path / "bob" / ".ssh" / "id"
    assert resolve("../c/x", tmp_path / "p") == tmp_path / "c" / "x"
    assert resolve("/abs/x", tmp_path) == Path("/abs/x")
    monkeypatch.chdir(tmp_path)
    assert resolve("c/x") == tmp_path / "c" / "x"
    assert resolve_args(["colmena", "-f", "~/c/hive.nix", "../c/h", "a~/b"]) == [
        "colmena", "-f", str(tmp_path / "bob" / "c" / "hive.nix"), "../c/h", "a~/b",
    ]


def _launcher(env: dict[str, str], cwd: Path) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("K3SCLUSTER_PYTHON", "PULUMI_PYTHON_CMD")}
    r = subprocess.run(
        [STEP_PYTHON, "-c", "import sys; print(sys.argv[0] or '-', sys.executable)"],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.split()[-1]


def test_the_launcher_is_found_relative_to_the_project_and_picks_the_python(
    tmp_path: Path,
) -> None:
    """The command runner's shell runs the recorded relative launcher in the project."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    launcher = project / STEP_PYTHON
    launcher.write_bytes((ROOT / STEP_PYTHON).read_bytes())
    launcher.chmod(0o755)
    python3 = subprocess.run(
        ["python3", "-c", "import sys; print(sys.executable)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # no setting, no .venv: python3 on PATH
    assert _launcher({}, project) == python3
    # PULUMI_PYTHON_CMD (scripts/env.sh sets it), then K3SCLUSTER_PYTHON wins
    venv_py = project / ".venv" / "bin" / "python"
    venv_py.parent.mkdir(parents=True)
    venv_py.symlink_to(python3)
    assert _launcher({}, project) == str(venv_py)
    assert _launcher({"PULUMI_PYTHON_CMD": python3}, project) == python3
    assert _launcher({"PULUMI_PYTHON_CMD": python3, "K3SCLUSTER_PYTHON": str(venv_py)}, project) == str(venv_py)


def test_the_launcher_finds_its_project_with_cdpath_set(tmp_path: Path) -> None:
    """``cd scripts/..`` consults CDPATH (an operator's shell often exports one) and then
    prints the directory, which the launcher captured as the project: it ran python3 on PATH
    instead of the project's .venv Python."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    launcher = project / STEP_PYTHON
    launcher.write_bytes((ROOT / STEP_PYTHON).read_bytes())
    launcher.chmod(0o755)
    venv_py = project / ".venv" / "bin" / "python"
    venv_py.parent.mkdir(parents=True)
    venv_py.symlink_to(sys.executable)
    assert _launcher({"CDPATH": "."}, project) == str(venv_py)
    assert _launcher({"CDPATH": str(tmp_path / "elsewhere") + ":."}, project) == str(venv_py)
