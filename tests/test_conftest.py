"""The test suite's own helpers (conftest.py) where a mistake would make other tests fail for
a reason that is not theirs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from conftest import short_example_copy

from k3scluster.lab.spec import UNIX_PATH_MAX, lab_dir


def test_the_short_example_copy_ignores_a_long_tmpdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its point is a path short enough for a VM's QMP socket: a long TMPDIR (tempfile's
    default directory) must not lengthen it."""
    long_dir = tmp_path / ("x" * 80)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    with short_example_copy() as path:
        assert (path / "plans" / "hosts.csv").is_file()
        # a VM's QMP socket in a lab of a stack named as long as the tests name theirs
        sock = lab_dir(path / ".k3scluster" / "test-vms") / "ulrich" / "qmp.sock"
        assert len(str(sock)) <= UNIX_PATH_MAX, sock
    assert not path.exists()
