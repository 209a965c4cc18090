"""The command line: exit codes and output of init and check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from k3scluster.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_check_clean(example_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(example_dir)]) == 0
    out = capsys.readouterr().out
    assert out == "ok: 5 host(s), 6 K3s node(s)\n"


def test_check_errors(example_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = example_dir / "plans" / "hosts.csv"
    hosts.write_text(hosts.read_text().replace("10.0.100.3", "10.0.100.300"))
    (example_dir / "secrets" / "token").chmod(0o644)
    assert main(["check", str(example_dir)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "plans/hosts.csv:3: host ulf: '10.0.100.300' is not an IPv4 address"
    assert out[1].startswith("  hint: ")
    assert out[2] == "secrets/token: warning: readable by group/others (mode 0644)"
    assert out[3] == "  hint: chmod 600 secrets/token"
    assert out[-1] == f"1 error(s), 1 warning(s) in {example_dir}"


def test_check_warnings_exit_0(example_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (example_dir / "nixConfigs" / "stray.nix").write_text("{ }\n")
    assert main(["check", str(example_dir)]) == 0
    out = capsys.readouterr().out
    assert "nixConfigs/stray.nix: warning:" in out
    assert out.endswith("ok: 5 host(s), 6 K3s node(s), 1 warning(s)\n")


def test_check_json(example_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--json", str(example_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "diagnostics": []}
    (example_dir / "secrets" / "token").unlink()
    assert main(["check", str(example_dir), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert data["diagnostics"] == [
        {
            "file": "secrets/token",
            "line": 0,
            "severity": "error",
            "message": "missing K3s token",
            "hint": "`k3scluster init DIR` creates it; never regenerate the token of a cluster "
            "that exists (K3s rejects nodes with a new token)",
        }
    ]


def test_check_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope")]) == 1
    assert "the cluster directory does not exist" in capsys.readouterr().out


def test_init_then_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "c"
    assert main(["init", str(root)]) == 0
    out = capsys.readouterr().out
    assert "created  secrets/token" in out and "next:" in out
    assert main(["init", str(root)]) == 0
    out = capsys.readouterr().out
    assert "kept     secrets/token (exists, not touched)" in out
    assert "created" not in out


def test_user_error_is_message_and_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    assert main(["init", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("k3scluster: error: ") and "hint:" in err
    assert "Traceback" not in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["check"]) == 2
    assert main(["frobnicate", "x"]) == 2
    assert "usage:" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("k3scluster ")


def test_render_stops_on_plan_errors(example_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (example_dir / "secrets" / "token").unlink()
    out = example_dir / "out"
    assert main(["render", str(example_dir), "--out", str(out)]) == 1
    assert "secrets/token: missing K3s token" in capsys.readouterr().err
    assert not out.exists()


def test_render_writes(example_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(example_dir)]) == 0
    default = example_dir / ".k3scluster" / "render"
    out = capsys.readouterr().out
    assert f"into {default}" in out
    assert (default / "hive.nix").is_file() and "wrote    hive.nix" in out


def test_boot_stick_stops_on_plan_errors(
    example_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (example_dir / "plans" / "network.yaml").unlink()
    assert main(["boot-stick", str(example_dir), "olaf", "/dev/null", "--yes"]) == 1
    assert "plans/network.yaml: missing file" in capsys.readouterr().err


def test_python_dash_m(example_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "k3scluster", "check", str(example_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (0, "ok: 5 host(s), 6 K3s node(s)\n")
    (example_dir / "plans" / "hosts.csv").write_bytes(b"\x00\xff garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "k3scluster", "check", str(example_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout.startswith("plans/hosts.csv:1: binary data")
    assert "Traceback" not in proc.stderr
