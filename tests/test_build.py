"""``k3scluster build``: colmena's argv, per-host results, GC roots, and the closure diff.

The real ``k3scluster build`` runs against the stand-ins ``tests/bin/colmena`` (``build``: a
fake system per host, a GC root per host with ``--keep-result``, failing for the hosts in
``$COLMENA_FAIL_HOSTS``) and ``tests/bin/nix`` (``store diff-closures`` and ``path-info`` over
those fake systems, in Nix's own output format). The stack's records are read from a real
Pulumi stack (``pulumi stack import`` of a deployment holding the ``hosts`` output) when the
engine is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k3scluster import bootentries, build, closures, commands
from k3scluster.errors import K3sClusterError
from k3scluster.render import write_tree
from k3scluster.stackconfig import StackFile, stack_layout

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "tests" / "bin"
COLMENA = BIN / "colmena"
NIX = BIN / "nix"
HOSTS = ["olaf", "ulf", "rolf", "karl", "ulrich"]

# Nix 2.8 (printClosureDiff with "%s%+.1f KiB" ANSI_NORMAL), as `nix store diff-closures` prints
OLD_FORMAT = (
    "bash-interactive: 5.2p37 → 5.2p37, 5.2p37-man, +8.1 KiB\n"
    "hello: ∅ → 2.12.1, \x1b[31;1m+268.4 KiB\x1b[0m\n"
    "k3s: 1.32.4+k3s1 → 1.32.5+k3s1, \x1b[31;1m+1520.3 KiB\x1b[0m\n"
    "linux: 6.12.30, 6.12.30-modules → 6.12.31, 6.12.31-modules, \x1b[31;1m+1228.8 KiB\x1b[0m\n"
    "nano: 8.4 → ∅, \x1b[32;1m-2912.0 KiB\x1b[0m\n"
    "nixos-system-olaf: \x1b[31;1m+12.0 KiB\x1b[0m\n"
    "unit-script-x: ε → ∅\n"
)
# current Nix (renderSize: a unit that fits, no '+')
NEW_FORMAT = (
    "k3s: 1.32.4+k3s1 → 1.32.5+k3s1, \x1b[31;1m1.5 MiB\x1b[0m\n"
    "nano: 8.4 → ∅, \x1b[32;1m-2.8 MiB\x1b[0m\n"
)


# -- argv --------------------------------------------------------------------------------


def test_colmena_build_argv() -> None:
    argv = commands.colmena_build("colmena", Path("/r/hive.nix"), ["olaf", "ulf"])
    assert argv == ["colmena", "build", "--keep-result", "--no-build-on-target",
                    "--on", "olaf,ulf", "-f", "/r/hive.nix"]
    with pytest.raises(K3sClusterError):
        commands.colmena_build("colmena", Path("/r/hive.nix"), ["-x"])
    with pytest.raises(K3sClusterError):
        commands.colmena_build("colmena", Path("/r/hive.nix"), [])


def test_nix_argv() -> None:
    assert commands.nix_diff_closures("nix", "/nix/store/a", "/nix/store/b") == [
        "nix", "--extra-experimental-features", "nix-command", "store", "diff-closures",
        "/nix/store/a", "/nix/store/b"]
    assert commands.nix_path_info("nix", "/nix/store/a")[-2:] == ["path-info", "/nix/store/a"]
    with pytest.raises(K3sClusterError):
        commands.nix_path_info("nix", "--store=x")


# -- diff-closures -------------------------------------------------------------------------


def test_parse_diff_closures_nix_2_8_format() -> None:
    got = {c.name: c for c in closures.parse_diff_closures(OLD_FORMAT)}
    assert got["linux"].before == ("6.12.30", "6.12.30-modules")
    assert got["linux"].after == ("6.12.31", "6.12.31-modules")
    assert got["linux"].size_delta == round(1228.8 * 1024)
    assert got["hello"].added and got["hello"].after == ("2.12.1",)
    assert got["nano"].removed and got["nano"].size_delta == round(-2912.0 * 1024)
    assert got["k3s"].versions() == "1.32.4+k3s1 → 1.32.5+k3s1"
    assert got["nixos-system-olaf"].before == got["nixos-system-olaf"].after == ()
    assert got["unit-script-x"].before == ("",) and got["unit-script-x"].size_delta == 0
    # a version set on each side, joined by ", ", and a size delta without colour
    assert got["bash-interactive"].after == ("5.2p37", "5.2p37-man")
    assert got["bash-interactive"].size_delta == round(8.1 * 1024)
    assert len(got) == 7


def test_parse_diff_closures_current_format() -> None:
    got = {c.name: c for c in closures.parse_diff_closures(NEW_FORMAT)}
    assert got["k3s"].size_delta == round(1.5 * 1024 * 1024)
    assert got["nano"].size_delta == round(-2.8 * 1024 * 1024)


def test_summary_calls_out_the_kernel() -> None:
    summary = closures.summarise("olaf", closures.parse_diff_closures(OLD_FORMAT))
    lines = summary.lines()
    assert lines[0].startswith("olaf: 6 package(s) change, 1 only in size, ")
    assert lines[0].endswith(
        "; the kernel changes (6.12.30, 6.12.30-modules → 6.12.31, 6.12.31-modules): "
        "needs a reboot")
    assert lines[1].split() == ["linux", "6.12.30,", "6.12.30-modules", "→", "6.12.31,",
                                "6.12.31-modules", "+1.2", "MiB"]
    body = {ln.split()[0]: ln for ln in lines[1:]}
    assert body["hello"].split()[1:] == ["∅", "→", "2.12.1", "(added)", "+268.4", "KiB"]
    assert body["nano"].split()[1:] == ["8.4", "→", "∅", "(removed)", "-2.8", "MiB"]
    assert body["unit-script-x"].split()[1:] == ["ε", "→", "∅", "(removed)"]
    assert body["nixos-system-olaf"].split()[1:] == ["(size", "only)", "+12.0", "KiB"]
    assert list(body)[-1] == "nixos-system-olaf"  # size-only changes last
    none = closures.summarise("ulf", []).lines()
    assert none == ["ulf: no package changes"]
    assert "reboot" not in closures.summarise(
        "x", closures.parse_diff_closures(NEW_FORMAT)).lines()[0]


def test_colmena_log_per_host() -> None:
    lines = ["       | Enumerating nodes...", " (...) | Evaluating olaf, karl",
             "  olaf | Building olaf", "  karl | Building karl",
             "  karl | error: builder for 'x.drv' failed", "  olaf | Built \"/nix/store/a\"",
             "[ERROR] Failed to build karl - Last 1 lines of logs:"]
    assert build.host_log(lines, "karl") == (
        "karl | Building karl", "karl | error: builder for 'x.drv' failed")
    # a host colmena never named (its chunk failed to evaluate): the end of everything
    assert build.host_log(lines, "rolf", n=2) == (
        "olaf | Built \"/nix/store/a\"", "[ERROR] Failed to build karl - Last 1 lines of logs:")


def test_recorded_systems() -> None:
    hosts = {"olaf": {"ip": "10.0.100.2", "system": "/nix/store/a-nixos-system-olaf"},
             "karl": {"ip": "10.0.100.5", "system": None}, "rolf": "?"}
    assert build.recorded_systems(hosts) == {"olaf": "/nix/store/a-nixos-system-olaf",
                                             "karl": None, "rolf": None}
    with pytest.raises(K3sClusterError):
        build.recorded_systems([])


# -- the render keeps the GC roots ------------------------------------------------------


def test_render_keeps_gc_roots(tmp_path: Path) -> None:
    out = tmp_path / "render"
    write_tree({"hive.nix": "{ }\n"}, out)
    (out / ".gcroots").mkdir()
    (out / ".gcroots" / "node-olaf").symlink_to("/nix/store/aaa-nixos-system-olaf")
    (out / "stray").write_text("gone after the next render\n")
    write_tree({"hive.nix": "{ x = 1; }\n"}, out)
    assert os.readlink(out / ".gcroots" / "node-olaf") == "/nix/store/aaa-nixos-system-olaf"
    assert not (out / "stray").exists()


# -- the stack's configuration, read without Pulumi ------------------------------------


def _project(tmp_path: Path, stack: str, config: str) -> Path:
    proj = tmp_path / "project"
    proj.mkdir(exist_ok=True)
    (proj / "Pulumi.yaml").write_text((ROOT / "Pulumi.yaml").read_text())
    (proj / "__main__.py").write_text("# the program is not run by k3scluster build\n")
    (proj / f"Pulumi.{stack}.yaml").write_text("config:\n" + config)
    return proj


def test_stack_file_layout(tmp_path: Path) -> None:
    proj = _project(tmp_path, "lab", "  k3scluster:clusterDir: ../cluster\n"
                    "  k3scluster:vms: true\n  k3scluster:colmena: /opt/colmena\n")
    layout = stack_layout(StackFile(proj, "lab"), "lab", proj)
    assert layout.cluster_dir == (tmp_path / "cluster").resolve()
    assert layout.render_dir == layout.cluster_dir / ".k3scluster" / "lab"
    assert (layout.colmena, layout.nix, layout.vm_stack) == ("/opt/colmena", "nix", "lab")
    proj = _project(tmp_path, "hw", "  k3scluster:clusterDir: /c\n"
                    "  k3scluster:renderDir: out/r\n  k3scluster:vms: \"false\"\n")
    layout = stack_layout(StackFile(proj, "hw"), "hw", proj)
    assert layout.render_dir == proj / "out" / "r" and layout.vm_stack is None
    proj = _project(tmp_path, "s", "  k3scluster:clusterDir:\n    secure: v1:abc\n")
    with pytest.raises(K3sClusterError, match="is a secret"):
        stack_layout(StackFile(proj, "s"), "s", proj)
    with pytest.raises(K3sClusterError, match="does not exist"):
        StackFile(proj, "missing")


# -- the real `k3scluster build` against the stand-ins -------------------------------------


def _k3scluster(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = env.get("PATH", os.environ["PATH"])
    full = {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{path}"}
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "k3scluster", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, check=False, timeout=300)


def _calls(log: Path) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []


def _packages(path: Path, table: dict[str, list[list[object]]]) -> None:
    path.write_text(json.dumps(table))


BEFORE = [["linux", "6.12.30", 140_000_000], ["k3s", "1.32.4+k3s1", 220_000_000],
          ["nano", "8.4", 2_981_888], ["systemd", "257.5", 30_000_000],
          ["nixos-system", "", 20_000]]
AFTER = [["linux", "6.12.31", 141_258_291], ["k3s", "1.32.5+k3s1", 221_556_838],
         ["hello", "2.12.1", 274_841], ["systemd", "257.5", 30_000_000],
         ["nixos-system", "", 32_288]]


def test_build_every_host(example_dir: Path, tmp_path: Path) -> None:
    log, store = tmp_path / "colmena.jsonl", tmp_path / "store"
    env = {"COLMENA_LOG": str(log), "COLMENA_STORE": str(store)}
    r = _k3scluster(["build", str(example_dir)], tmp_path, env)
    assert r.returncode == 0, r.stderr
    render = example_dir / ".k3scluster" / "render"
    (call,) = _calls(log)
    assert call["argv"] == ["build", "--keep-result", "--no-build-on-target",
                            "--on", ",".join(HOSTS), "-f", str(render / "hive.nix")]
    # colmena's progress is passed through; the results are on stdout, one line per host
    assert "olaf | Building olaf" in r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("built")]
    assert [row[1] for row in rows] == HOSTS
    for _, host, system in rows:
        assert Path(system).parent == store and system.endswith(f"-nixos-system-{host}")
        # the GC root colmena --keep-result made, under the render directory
        assert os.readlink(render / ".gcroots" / f"node-{host}") == system
    assert "1 of" not in r.stdout and "FAILED" not in r.stdout
    # no stack: nothing to compare with, and no pulumi run
    assert "what the next deploy" not in r.stdout
    # a later render (the deploy's own) keeps the roots
    r = _k3scluster(["render", str(example_dir)], tmp_path, {})
    assert r.returncode == 0, r.stderr
    assert os.readlink(render / ".gcroots" / "node-olaf") == rows[0][2]


def test_build_keeps_the_stacks_servers_first_hives(example_dir: Path, tmp_path: Path) -> None:
    """A render made with --hold-agent (a stack's render step during a K3s minor upgrade)
    keeps its servers-first/ hives through a build, which cannot make them and which the
    next up's render step, its inputs unchanged, would not make again; a plain render
    drops them as before."""
    r = _k3scluster(["render", str(example_dir), "--hold-agent", "karl=1.33"], tmp_path, {})
    assert r.returncode == 0, r.stderr
    held = example_dir / ".k3scluster" / "render" / "servers-first" / "karl.nix"
    text = held.read_text()
    env = {"COLMENA_STORE": str(tmp_path / "store")}
    r = _k3scluster(["build", str(example_dir), "--on", "olaf"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert held.read_text() == text
    r = _k3scluster(["render", str(example_dir)], tmp_path, {})
    assert r.returncode == 0, r.stderr
    assert not held.parent.exists()


def test_build_failed_host(example_dir: Path, tmp_path: Path) -> None:
    log, store = tmp_path / "colmena.jsonl", tmp_path / "store"
    env = {"COLMENA_LOG": str(log), "COLMENA_STORE": str(store)}
    r = _k3scluster(["build", str(example_dir), "--on", "karl", "rolf"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    r = _k3scluster(["build", str(example_dir), "--on", "karl,rolf"], tmp_path,
                    {**env, "COLMENA_FAIL_HOSTS": "karl"})
    assert r.returncode == 1
    assert [c["argv"][4] for c in _calls(log)] == ["karl,rolf", "karl,rolf"]  # type: ignore[index]
    out = r.stdout.splitlines()
    assert out[0].split()[:2] == ["FAILED", "karl"]
    # the end of karl's log: its own lines, not rolf's; an earlier build's root is no result
    assert out[1].strip() == "karl | Building karl"
    assert out[2].strip().startswith("karl | error: builder for")
    assert out[3].strip() == "karl | Build failed: Child process exited with error code: 1"
    assert out[4].split()[:2] == ["built", "rolf"]
    assert out[-1] == "1 of 2 host(s) failed to build: karl"
    r = _k3scluster(["build", str(example_dir), "--on", "nobody"], tmp_path, env)
    assert r.returncode == 1 and "--on: no host nobody" in r.stderr


def test_build_fails_when_colmena_does(example_dir: Path, tmp_path: Path) -> None:
    """colmena's exit status counts even when every host's GC root is new (a colmena that
    built all and then failed): build says so and exits 1. A host named twice is built once."""
    wrapper = tmp_path / "bin" / "colmena"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\n{sys.executable} {COLMENA} "$@"; exit 3\n')
    wrapper.chmod(0o755)
    log = tmp_path / "colmena.jsonl"
    env = {**os.environ, "COLMENA_LOG": str(log), "COLMENA_STORE": str(tmp_path / "store"),
           "PATH": f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "k3scluster", "build", str(example_dir), "--on",
                        "olaf", "olaf,olaf"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, check=False, timeout=300)
    assert r.returncode == 1, r.stdout
    assert [ln.split()[:2] for ln in r.stdout.splitlines() if ln.startswith("built")] == [
        ["built", "olaf"]]
    assert "colmena exited with status 3 although every host was built" in r.stdout
    (call,) = _calls(log)
    assert call["argv"][3:5] == ["--on", "olaf"]  # type: ignore[index]


def test_build_progress_is_passed_through_while_colmena_runs(
    example_dir: Path, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}{os.pathsep}/usr/bin:/bin",
           "COLMENA_STORE": str(tmp_path / "store"), "COLMENA_HOLD": str(hold),
           "COLMENA_HOLD_HOSTS": "ulf"}
    err = tmp_path / "stderr"
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "k3scluster", "build", str(example_dir), "--on", "olaf,ulf"],
            env=env, stdout=subprocess.DEVNULL, stderr=f)
    try:
        started = Path(f"{hold}.ulf.started")
        for _ in range(600):
            if started.exists() and "ulf | Building ulf" in err.read_text():
                break
            time.sleep(0.05)
        # colmena is still at ulf, and its lines so far are already on k3scluster's stderr
        assert proc.poll() is None
        text = err.read_text()
        assert "olaf | Built" in text and "ulf | Building ulf" in text
        assert "ulf | Built" not in text
    finally:
        Path(f"{hold}.release").touch()
        assert proc.wait(timeout=60) == 0
    assert "ulf | Built" in err.read_text()


def _results(stdout: str) -> dict[str, tuple[str, list[str]]]:
    """host -> (built | FAILED, the lines below it) from build's per-host report."""
    out: dict[str, tuple[str, list[str]]] = {}
    host = ""
    for line in stdout.splitlines():
        if line.startswith(("built ", "FAILED ")):
            status, host = line.split()[:2]
            out[host] = (status, [])
        elif line.startswith("          ") and host:
            out[host][1].append(line.strip())
        else:
            host = ""
    return out


def test_build_evaluation_error(example_dir: Path, tmp_path: Path) -> None:
    error = "attribute 'k3s_1_99' missing, at /render/modules/k3s-release.nix:3:9"
    env = {"COLMENA_STORE": str(tmp_path / "store"), "COLMENA_EVAL_ERROR": error}
    r = _k3scluster(["build", str(example_dir), "--on", "olaf,ulf"], tmp_path, env)
    assert r.returncode == 1
    results = _results(r.stdout)
    assert list(results) == ["olaf", "ulf"]
    for status, tail in results.values():
        # colmena labels the error with the chunk it evaluated: each host shows its end
        assert status == "FAILED" and tail[-1] == f"[ERROR]   stderr) error: {error}"
        assert f"(...) | error: {error}" in tail
    assert r.stdout.splitlines()[-1] == "2 of 2 host(s) failed to build: olaf, ulf"
    assert not (example_dir / ".k3scluster" / "render" / ".gcroots").exists()


def test_build_without_colmena(example_dir: Path, tmp_path: Path) -> None:
    if shutil.which("colmena", path="/usr/bin:/bin"):
        pytest.skip("a real colmena is installed")
    r = subprocess.run([sys.executable, "-m", "k3scluster", "build", str(example_dir)],
                       env={**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1
    assert "k3scluster: error: colmena: not found" in r.stderr
    assert "pulumi config set k3scluster:colmena" in r.stderr


def _fake_system(tmp_path: Path, host: str, packages: list[list[object]]) -> str:
    """A system the colmena stand-in builds (as tests/bin/colmena build would)."""
    key = hashlib.sha256(json.dumps(packages).encode()).hexdigest()[:12]
    table = tmp_path / f"packages-{host}-{key}.json"
    _packages(table, {host: packages})
    hive_dir = tmp_path / "hive"
    hive_dir.mkdir(exist_ok=True)
    (hive_dir / "hive.nix").write_text("{ }\n")
    proc = subprocess.run(
        [sys.executable, str(COLMENA), "build", "--keep-result", "--on", host, "-f",
         str(hive_dir / "hive.nix")],
        env={**os.environ, "COLMENA_PACKAGES": str(table), "COLMENA_STORE": str(tmp_path / "s")},
        capture_output=True, text=True, check=True)
    assert proc.returncode == 0
    return os.readlink(hive_dir / ".gcroots" / f"node-{host}")


def test_host_changes_from_the_stand_in_diff(tmp_path: Path) -> None:
    before = _fake_system(tmp_path, "olaf", BEFORE)
    after = _fake_system(tmp_path, "olaf", AFTER)
    lines = build.host_changes(str(NIX), "olaf", before, after)
    assert lines[0].startswith("olaf: 4 package(s) change, 1 only in size, ")
    assert "the kernel changes (6.12.30 → 6.12.31): needs a reboot" in lines[0]
    body = {ln.split()[0]: ln.split()[1:] for ln in lines[1:]}
    assert body == {
        "linux": ["6.12.30", "→", "6.12.31", "+1.2", "MiB"],
        "hello": ["∅", "→", "2.12.1", "(added)", "+268.4", "KiB"],
        "k3s": ["1.32.4+k3s1", "→", "1.32.5+k3s1", "+1.5", "MiB"],
        "nano": ["8.4", "→", "∅", "(removed)", "-2.8", "MiB"],
        "nixos-system": ["(size", "only)", "+12.0", "KiB"],
    }
    assert next(iter(body)) == "linux"
    gone = str(tmp_path / "s" / "0000-nixos-system-olaf")
    assert build.host_changes(str(NIX), "olaf", gone, after) == [
        f"olaf: its deployed system {gone} is not in the local store: no package diff"]
    assert build.host_changes(str(NIX), "olaf", after, after) == [
        "olaf: already runs this system (no change)"]
    assert "records no deployed system" in build.host_changes(str(NIX), "olaf", None, after)[0]


def test_boot_entries_need_a_reboot(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for system, initrd in ((old, "/nix/store/a-initrd-linux-6.12.30"),
                           (new, "/nix/store/b-initrd-linux-6.12.30")):
        system.mkdir()
        (system / "kernel").symlink_to("/nix/store/k-linux-6.12.30/bzImage")
        (system / "initrd").symlink_to(initrd)
        (system / "kernel-params").write_text("loglevel=4")
    assert bootentries.boot_changes(str(old), str(new)) == ["initrd"]
    assert bootentries.boot_changes(str(old), str(old)) == []
    (new / "kernel-params").write_text("loglevel=7")
    assert bootentries.boot_changes(str(old), str(new)) == ["initrd", "kernel-params"]
    # no kernel package in the diff, but a new initrd: still a reboot
    lines = build.host_changes(str(NIX), "ulf", str(old), str(new), run=_diff_says(NEW_FORMAT))
    assert lines[0].endswith("; its initrd, kernel-params change: needs a reboot")


def test_diff_output_not_understood_is_said(tmp_path: Path) -> None:
    """A diff-closures line this cannot read (a format it does not know) is named, never
    dropped into a silent 'no package changes'; Nix's own lines are all read."""
    systems = [tmp_path / "a", tmp_path / "b"]
    for d in systems:
        d.mkdir()
    odd = "hello: 2.12 -> 2.13"  # not Nix's arrow
    lines = build.host_changes(str(NIX), "ulf", str(systems[0]), str(systems[1]),
                               run=_diff_says(odd + "\n"))
    assert lines == ["ulf: no package changes",
                     ("  1 line(s) of nix store diff-closures not understood, so changes may "
                      f"be missing above; the first: {odd}")]
    for text in (OLD_FORMAT, NEW_FORMAT, REAL_NIX_2_8):
        assert closures.unread_lines(text) == []
        said = build.host_changes(str(NIX), "ulf", str(systems[0]), str(systems[1]),
                                  run=_diff_says(text))
        assert not any("not understood" in ln for ln in said)


def _diff_says(text: str):  # type: ignore[no-untyped-def]
    """A runner for host_changes whose path-info succeeds and whose diff prints ``text``."""
    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, text if "diff-closures" in argv else "", "")
    return run


def test_build_vm_stack_renders_as_the_stack(example_dir: Path, tmp_path: Path) -> None:
    proj = _project(tmp_path, "lab", f"  k3scluster:clusterDir: {example_dir}\n"
                    f"  k3scluster:colmena: {COLMENA}\n  k3scluster:vms: true\n")
    env = {"COLMENA_STORE": str(tmp_path / "store"), "PATH": "/usr/bin:/bin"}
    r = _k3scluster(["build", str(example_dir), "--stack", "lab", "--project", str(proj),
                     "--on", "olaf"], tmp_path, env)
    render = example_dir / ".k3scluster" / "lab"
    assert r.returncode == 0, r.stderr
    assert os.readlink(render / ".gcroots" / "node-olaf").endswith("-nixos-system-olaf")
    # the VM stack's render: the NIC named by the VM's MAC
    assert "PermanentMACAddress" in (render / "hosts" / "olaf.nix").read_text()
    assert "the deployed systems are not known: pulumi is not on PATH" in r.stdout
    other = tmp_path / "other"
    shutil.copytree(example_dir, other, ignore=shutil.ignore_patterns(".k3scluster"))
    r = _k3scluster(["build", str(other), "--stack", "lab", "--project", str(proj)],
                    tmp_path, env)
    assert r.returncode == 1
    assert f"stack lab deploys the cluster {example_dir}, not {other}" in r.stderr


def test_help_lists_build(capsys: pytest.CaptureFixture[str]) -> None:
    from k3scluster.cli import main

    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert "    build " in listed and "no host is contacted" in listed
    assert main(["build", "--help"]) == 0
    usage = capsys.readouterr().out
    assert "--stack S" in usage and "--on HOST [HOST ...]" in usage


@pytest.mark.integration
def test_build_compares_with_what_the_stack_deployed(example_dir: Path, tmp_path: Path) -> None:
    """The stack's records read by the real engine: a stack whose ``hosts`` output is
    imported (``pulumi stack import``), as a deploy with ``waitReady`` leaves it."""
    from engine import engine_env, netns_available, require_engine

    require_engine()
    proj = _project(tmp_path, "hw", f"  k3scluster:clusterDir: {example_dir}\n"
                    f"  k3scluster:colmena: {COLMENA}\n  k3scluster:nix: {NIX}\n")
    table = tmp_path / "packages.json"
    _packages(table, {"*": BEFORE})
    nix_log = tmp_path / "nix.jsonl"
    env = engine_env(proj, {"COLMENA_PACKAGES": str(table), "NIX_STANDIN_LOG": str(nix_log),
                            "COLMENA_STORE": str(tmp_path / "store")})
    wrap = ["unshare", "-n"] if netns_available() else []

    def k3scluster_build() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*wrap, sys.executable, "-m", "k3scluster", "build", str(example_dir),
             "--stack", "hw", "--project", str(proj)],
            cwd=proj, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            check=False, timeout=300)

    def pulumi(*args: str) -> str:
        return subprocess.run([*wrap, "pulumi", *args, "--stack", "hw", "--non-interactive"],
                              cwd=proj, env=env, capture_output=True, text=True,
                              check=True).stdout

    # no stack yet: built, and one line on why nothing is compared
    r = k3scluster_build()
    assert r.returncode == 0, r.stderr
    assert "the deployed systems are not known: `pulumi stack output --stack hw` failed: " \
        "error: no stack named 'hw' found" in r.stdout
    render = example_dir / ".k3scluster" / "hw"
    first = {h: os.readlink(render / ".gcroots" / f"node-{h}") for h in HOSTS}

    # the stack records what olaf, ulf and rolf run; karl's deploy recorded no system
    subprocess.run([*wrap, "pulumi", "stack", "init", "hw", "--non-interactive"], cwd=proj,
                   env=env, capture_output=True, check=True)
    deployment = json.loads(pulumi("stack", "export"))
    gone = "/nix/store/00000000000000000000000000000000-nixos-system-rolf"
    hosts = {"olaf": {"ip": "10.0.100.2", "system": first["olaf"]},
             "ulf": {"ip": "10.0.100.3", "system": first["ulf"]},
             "rolf": {"ip": "10.0.100.4", "system": gone},
             "karl": {"ip": "10.0.100.5", "system": None}}
    deployment["deployment"]["resources"] = [{
        "urn": "urn:pulumi:hw::k3scluster::pulumi:pulumi:Stack::k3scluster-hw",
        "custom": False, "type": "pulumi:pulumi:Stack", "outputs": {"hosts": hosts}}]
    (tmp_path / "deployment.json").write_text(json.dumps(deployment))
    pulumi("stack", "import", "--file", str(tmp_path / "deployment.json"))

    # olaf's configuration changed (a new kernel and K3s, nano out, hello in)
    _packages(table, {"olaf": AFTER, "*": BEFORE})
    r = k3scluster_build()
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    i = out.index("what the next deploy of stack hw changes:")
    report = [ln.strip() for ln in out[i + 1:]]
    unrecorded = ("the stack records no deployed system (not deployed yet, or waitReady false): "
                  "nothing to compare with")
    assert report[0].startswith("olaf: 4 package(s) change, 1 only in size, ")
    assert report[0].endswith("; the kernel changes (6.12.30 → 6.12.31): needs a reboot")
    assert [ln.split()[0] for ln in report[1:6]] == [
        "linux", "hello", "k3s", "nano", "nixos-system"]
    assert report[6:] == [
        "ulf: already runs this system (no change)",
        f"rolf: its deployed system {gone} is not in the local store: no package diff",
        f"karl: {unrecorded}",
        f"ulrich: {unrecorded}",
    ]
    # nix was asked about the recorded systems only, and diffed olaf's alone (ulf's is built)
    second = os.readlink(render / ".gcroots" / "node-olaf")
    assert [c["argv"] for c in _calls(nix_log)] == [
        commands.nix_path_info("nix", first["olaf"])[1:],
        commands.nix_diff_closures("nix", first["olaf"], second)[1:],
        commands.nix_path_info("nix", gone)[1:],
    ]


# what Nix 2.8 (Debian's) printed for tests/nix/closures.nix, piped (its colours stay)
REAL_NIX_2_8 = (
    "hello: ∅ → 2.12.1, \x1b[31;1m+20.0 KiB\x1b[0m\n"
    "k3s: 1.32.4+k3s1 → 1.32.5+k3s1\n"
    "linux: 6.12.30 → 6.12.31, \x1b[31;1m+19.5 KiB\x1b[0m\n"
    "nano: 8.4 → ∅, \x1b[32;1m-29.8 KiB\x1b[0m\n"
)


def test_parse_recorded_nix_output() -> None:
    got = closures.summarise("olaf", closures.parse_diff_closures(REAL_NIX_2_8))
    assert [(c.name, c.versions(), c.size_delta) for c in got.changes] == [
        ("linux", "6.12.30 → 6.12.31", round(19.5 * 1024)),
        ("hello", "∅ → 2.12.1", round(20.0 * 1024)),
        ("k3s", "1.32.4+k3s1 → 1.32.5+k3s1", 0),
        ("nano", "8.4 → ∅", round(-29.8 * 1024)),
    ]


def _private_nix(tmp_path: Path) -> dict[str, str]:
    """The environment of a real Nix with a store of the test's own under ``tmp_path``."""
    if not shutil.which("nix-build") or not shutil.which("nix"):
        pytest.skip("Nix (Debian nix-bin) is not installed")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "nix.conf").write_text("build-users-group =\nsandbox = false\nsubstituters =\n")
    return {**os.environ, "NIX_STORE_DIR": str(tmp_path / "store"),
            "NIX_STATE_DIR": str(tmp_path / "state"), "NIX_LOG_DIR": str(tmp_path / "log"),
            "NIX_CONF_DIR": str(conf)}


def _nix_build(env: dict[str, str], attr: str) -> str:
    return subprocess.run(
        ["nix-build", str(ROOT / "tests" / "nix" / "closures.nix"), "-A", attr,
         "--no-out-link"], env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()


def test_gc_root_survives_a_render_and_a_garbage_collection(tmp_path: Path) -> None:
    """The root colmena --keep-result makes (its very nix-store call), then a render of that
    directory, then a real ``nix-store --gc``: the built system stays, an unrooted one goes."""
    env = _private_nix(tmp_path)
    kept, other = _nix_build(env, "after"), _nix_build(env, "before")
    render = tmp_path / "render"
    write_tree({"hive.nix": "{ }\n"}, render)
    root = build.gc_root(render, "olaf")
    subprocess.run(["nix-store", "--no-build-output", "--indirect", "--add-root", str(root),
                    "--realise", kept], env=env, check=True, capture_output=True)
    write_tree({"hive.nix": "{ changed = true; }\n"}, render)
    subprocess.run(["nix-store", "--gc"], env=env, check=True, capture_output=True)

    def valid(path: str) -> bool:
        return subprocess.run(commands.nix_path_info("nix", path), env=env,
                              capture_output=True, check=False).returncode == 0

    assert valid(kept) and os.readlink(root) == kept
    assert not valid(other)


def test_host_changes_with_the_real_nix(tmp_path: Path) -> None:
    """The real ``nix path-info`` and ``nix store diff-closures`` on two closures built by the
    real Nix in a store of this test's own."""
    env = _private_nix(tmp_path)
    before, after = _nix_build(env, "before"), _nix_build(env, "after")

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=env, capture_output=True, text=True, check=False)

    lines = build.host_changes("nix", "olaf", before, after, run=run)
    assert lines[0] == ("olaf: 4 package(s) change, 0 only in size, +9.7 KiB in all; the kernel "
                        "changes (6.12.30 → 6.12.31): needs a reboot")
    assert [ln.split() for ln in lines[1:]] == [
        ["linux", "6.12.30", "→", "6.12.31", "+19.5", "KiB"],
        ["hello", "∅", "→", "2.12.1", "(added)", "+20.0", "KiB"],
        ["k3s", "1.32.4+k3s1", "→", "1.32.5+k3s1"],
        ["nano", "8.4", "→", "∅", "(removed)", "-29.8", "KiB"],
    ]
    gone = before[:-len("olaf-26.05")] + "rolf-26.05"
    assert build.host_changes("nix", "rolf", gone, after, run=run) == [
        f"rolf: its deployed system {gone} is not in the local store: no package diff"]


def test_build_never_imports_pulumi(example_dir: Path, tmp_path: Path) -> None:
    """The whole `k3scluster build` (stack file, render, colmena, records) runs without the
    pulumi package: the library stays pulumi-free; only `pulumi` the CLI is run."""
    proj = _project(tmp_path, "hw", f"  k3scluster:clusterDir: {example_dir}\n"
                    f"  k3scluster:colmena: {COLMENA}\n")
    code = (
        "import sys\nfrom k3scluster.cli import main\n"
        f"rc = main(['build', {str(example_dir)!r}, '--stack', 'hw', '--project', "
        f"{str(proj)!r}, '--on', 'olaf'])\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'pulumi'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                            "COLMENA_STORE": str(tmp_path / "store")})
    assert r.stdout.splitlines()[-1] == "0 []", r.stdout + r.stderr
