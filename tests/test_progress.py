"""Long commands say they are alive (k3scluster/progress.py): the ISO builds of both kinds of
stack run through it, and its lines carry the prefix the python runner forwards."""

from __future__ import annotations

import sys

from k3scluster.components import tasks
from k3scluster.progress import run_with_progress


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
