"""Long commands say they are alive (k3scluster/progress.py): the ISO builds of both kinds of
stack run through it, colmena's deploys and dry activations through its heartbeat, and its
lines carry the prefix the python runner forwards (pulumi-command shows every line)."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest

from k3scluster import drain
from k3scluster.components import tasks
from k3scluster.progress import heartbeat, run_with_progress


def test_a_long_command_gets_progress_lines_and_its_exit_status() -> None:
    said: list[str] = []
    code = run_with_progress(
        [sys.executable, "-c", "import time; time.sleep(1.5); raise SystemExit(3)"],
        "the build", said.append, every=0.3,
    )
    assert code == 3
    assert len(said) >= 2 and all(s.startswith("the build: still running after ") for s in said)


def test_a_short_command_says_nothing() -> None:
    said: list[str] = []
    assert run_with_progress(["true"], "x", said.append, every=30) == 0
    assert said == []


def test_the_iso_task_reports_through_the_runners_prefix(capfd, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("k3scluster.progress.PROGRESS_EVERY", 0.2)
    iso = tmp_path / "result" / "iso"
    iso.mkdir(parents=True)
    (iso / "x.iso").write_bytes(b"iso")
    assert tasks.main(["iso", "--result", str(tmp_path / "result"), "--",
                       sys.executable, "-c", "import time; time.sleep(0.7)"]) == 0
    err = capfd.readouterr().err
    assert f"{tasks.PROGRESS_PREFIX}the ISO build (result): still running after" in err


def test_heartbeat_says_the_block_is_still_running() -> None:
    said: list[str] = []
    with heartbeat("olaf: colmena", said.append, every=0.1):
        time.sleep(0.5)
    assert said and all(re.fullmatch(r"olaf: colmena still running \(\d+ s\)", s) for s in said)
    n = len(said)
    time.sleep(0.3)
    assert len(said) == n  # the thread ended with the block


def test_heartbeat_says_nothing_after_its_block() -> None:
    """A line being said when the block ends is finished before the block is left, and no
    line follows: nothing of the heartbeat runs on into what the step prints next (here
    each line takes long to say, so the block ends while one is being said)."""
    said: list[str] = []
    saying = threading.Event()

    def slow_say(line: str) -> None:
        saying.set()
        time.sleep(0.3)
        said.append(line)

    with heartbeat("olaf: colmena", slow_say, every=0.05):
        assert saying.wait(5)
    n = len(said)
    assert n == 1
    time.sleep(0.5)
    assert len(said) == n


def _sleeping_colmena(tmp_path: Path) -> Path:
    """A stand-in for colmena (``colmena apply …``): it sleeps, prints nothing and succeeds,
    as a long deploy looks from outside."""
    script = tmp_path / "colmena"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(0.8)\n")
    script.chmod(0o755)
    return script


def test_the_deploy_task_says_colmena_is_still_running(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """waitReady false: the deploy step runs colmena alone (--no-gates), which prints
    nothing for minutes while it builds; the step says every PROGRESS_EVERY seconds that
    it still runs, with the prefix the python runner forwards (pulumi-command shows all)."""
    monkeypatch.setattr("k3scluster.progress.PROGRESS_EVERY", 0.2)
    colmena = _sleeping_colmena(tmp_path)
    assert tasks.main(["deploy", "--host", "olaf", "--ip", "10.0.100.2", "--timeout", "60",
                       "--no-gates", "--", str(colmena), "apply", "switch", "--on", "olaf",
                       "-f", "hive.nix"]) == 0
    err = capfd.readouterr().err
    assert re.search(rf"^{tasks.PROGRESS_PREFIX}olaf: colmena still running \(\d+ s\)$", err,
                     re.MULTILINE), err


def test_the_dry_activation_says_it_is_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain first asks colmena's dry activation what the switch restarts; it builds the
    new system first, its output held until it ends."""
    monkeypatch.setattr("k3scluster.progress.PROGRESS_EVERY", 0.2)
    said: list[str] = []
    drain.dry_activate([str(_sleeping_colmena(tmp_path)), "apply", "switch", "--on", "olaf"],
                       said.append)
    assert any(re.fullmatch(r"colmena's dry activation still running \(\d+ s\)", s)
               for s in said), said
