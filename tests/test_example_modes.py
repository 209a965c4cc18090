"""A fresh clone's example checks quietly: the set-up gives its secrets mode 0600.

Git keeps no modes but the executable bit, so a clone has examples/cluster/secrets/* at 0644
(umask 022) and `check` (and the preview of scripts/run-example) warned about the project's own
example. scripts/example-modes fixes that; scripts/setup runs it, scripts/run-example runs setup.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cluster"


def as_fresh_clone(dst: Path) -> Path:
    """The example as git checks it out under umask 022: directories 0755, files 0644."""
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns(".k3scluster"))
    for path in [dst, *dst.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


def check(cluster: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k3scluster", "check", str(cluster)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_fresh_clone_of_the_example_checks_without_a_warning(tmp_path: Path) -> None:
    cluster = as_fresh_clone(tmp_path / "cluster")
    before = check(cluster)
    assert "warning: readable by group/others (mode 0644)" in before.stdout  # as cloned
    subprocess.run([str(ROOT / "scripts" / "example-modes"), str(cluster)], check=True)
    after = check(cluster)
    assert (after.returncode, after.stdout, after.stderr) == (
        0,
        "ok: 5 host(s), 6 K3s node(s)\n",
        "",
    )
    secrets = cluster / "secrets"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in secrets.iterdir()}
    # private: tokens and password hashes; public keys and the README stay readable
    assert modes == {
        "token": 0o600,
        "agent-token": 0o600,
        "passwd": 0o600,
        "manfred.pub": 0o644,
        "olaf.pub": 0o644,
        "README.md": 0o644,
    }


def test_the_set_up_runs_it_on_the_example() -> None:
    """scripts/run-example runs scripts/setup, which runs scripts/example-modes (no argument:
    examples/cluster); nothing else changes the modes of a user's own cluster."""
    run_example = (ROOT / "scripts" / "run-example").read_text().splitlines()
    setup = (ROOT / "scripts" / "setup").read_text().splitlines()
    assert "scripts/setup" in [line.strip() for line in run_example]
    assert "scripts/example-modes" in [line.strip() for line in setup]
    script = (ROOT / "scripts" / "example-modes").read_text()
    assert "dir=${1:-examples/cluster}" in script
