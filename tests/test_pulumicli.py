"""k3scluster.pulumicli: one `pulumi stack …` command, run in the project, its error in words
(shared by records.read_export and stackinfo.read_outputs). A small shell script stands in
for the engine: what it prints and how it ends is all that is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from k3scluster import records, stackinfo
from k3scluster.errors import K3sClusterError
from k3scluster.pulumicli import run_stack_command


def _engine(tmp_path: Path, body: str) -> str:
    exe = tmp_path / "pulumi-stand-in"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return str(exe)


def test_prints_what_the_command_printed_run_in_the_project(tmp_path: Path) -> None:
    exe = _engine(tmp_path, 'echo "$@"; pwd\n')
    out = run_stack_command(exe, lambda e: [e, "stack", "x"], tmp_path, "pulumi stack x", "h")
    assert out == f"stack x\n{tmp_path}\n"


def test_a_failure_names_the_command_and_its_last_error_line(tmp_path: Path) -> None:
    exe = _engine(tmp_path, 'echo "warning: a" >&2; echo "error: no stack named \'hw\' found" >&2\n'
                  "echo >&2; exit 255\n")
    for read in (lambda: records.read_export(exe, tmp_path, "hw"),
                 lambda: stackinfo.read_outputs("hw", tmp_path, exe)):
        with pytest.raises(K3sClusterError) as err:
            read()
        assert "--stack hw` failed: error: no stack named 'hw' found" in str(err.value)
    silent = _engine(tmp_path, "exit 3\n")
    with pytest.raises(K3sClusterError, match="failed: exit status 3, no message"):
        run_stack_command(silent, lambda e: [e], tmp_path, "pulumi stack y", "h")


def test_no_engine_on_path_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(K3sClusterError) as err:
        run_stack_command(str(tmp_path / "nothing"), lambda e: [e], tmp_path, "x", "h")
    assert "is not on PATH" in str(err.value) and "scripts/env.sh" in (err.value.hint or "")
