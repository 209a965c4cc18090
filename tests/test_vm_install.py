"""``python -m k3scluster.lab.ctl vm-up`` for real (QEMU under TCG, the test guest), without
the engine, in a network namespace of the test's own: what happens to an install that fails,
or whose QEMU is killed, and what a failed create leaves behind (nothing running), with the
modes of the lab's files and the VM's lock.

The host is the example's rolf (BIOS: no firmware variables), its ISO built by the stand-in
nix (tests/bin/nix) from a VM stack's render, as the engine's steps do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import vmguest as vg

from k3scluster import plans
from k3scluster.lab import machine, process
from k3scluster.lab import spec as lab
from k3scluster.render import render_to_dir

pytestmark = [pytest.mark.vm, pytest.mark.root]
ROOT = Path(__file__).resolve().parent.parent
NIX = ROOT / "tests" / "bin" / "nix"
STACK = "test-vms"


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.fail("the vm tests need root (QEMU taps in a network namespace)")
    result = plans.load(ROOT / "examples" / "cluster")
    assert result.cluster is not None
    vg.build_guest()
    return result.cluster


@pytest.fixture
def ns(cluster) -> Iterator[str]:  # type: ignore[no-untyped-def]
    name = f"k3si-{os.getpid() % 100000}-{time.monotonic_ns() % 10000}"
    with vg.netns(name) as n:
        try:
            yield n
        finally:
            out = subprocess.run(
                ["ip", "netns", "pids", n], capture_output=True, text=True, check=False
            )
            for pid in out.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _ctl(ns: str, task: str, text: str, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "k3scluster.lab.ctl", task,
         "--spec", text],
        capture_output=True, text=True, cwd=ROOT, check=False, **kw,
    )


def _spec(cluster, tmp_path: Path, iso_result: Path) -> lab.VmSpec:  # type: ignore[no-untyped-def]
    vs = lab.VmSettings(
        stack=STACK, lab_dir=lab.lab_dir(tmp_path / STACK), memory_mib=512, cpus=1,
        disk_gib=2, accel="tcg", install_timeout=3600, boot_timeout=300,
    )
    specs = lab.vm_specs(cluster, vs, {h.name: str(iso_result) for h in cluster.hosts})
    return next(s for s in specs if s.host == "rolf")


def _net_up(ns: str, cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vs = lab.VmSettings(stack=STACK, lab_dir=lab.lab_dir(tmp_path / STACK))
    r = _ctl(ns, "net-up", lab.net_spec(cluster, vs).to_json())
    assert r.returncode == 0, r.stderr


def _links(ns: str) -> str:
    return vg.ns_run(ns, "ip", "-o", "link").stdout


def _qemus(name: str) -> list[int]:
    """Every QEMU on this machine whose command line names the VM (not just its pidfile)."""
    found = []
    for d in Path("/proc").iterdir():
        argv = process.cmdline(int(d.name)) if d.name.isdigit() else []
        if (
            argv
            and "qemu-system" in Path(argv[0]).name
            and process.pid_alive(int(d.name))
            and any(name in a for a in argv)
        ):
            found.append(int(d.name))
    return found


def test_an_installer_failure_is_reported_at_once_and_nothing_is_left_running(
    cluster, ns: str, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """A machine's image stays up after its installer failed; the lab sees the installer's
    FAILED line on the console and ends the step at once (not after vmInstallTimeout, an
    hour here), stops that QEMU and removes its tap; the disk is not counted installed."""
    rolf = cluster.host("rolf")
    cfg = vg.GuestConfig(
        host="rolf", serial=rolf.disk or "", boot="bios", job="install",
        setup_script=vg_setup(cluster, tmp_path), setup_args=("SERIAL=NO-SUCH-DISK",),
    )
    result = tmp_path / "result"
    vg.guest_iso(result / "iso" / "rolf.iso", config=cfg)
    spec = _spec(cluster, tmp_path, result)
    _net_up(ns, cluster, tmp_path)
    # the subprocess timeout bounds the step: waiting for the install timeout would fail here
    r = _ctl(ns, "vm-up", spec.to_json(), timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "host rolf: the installer failed" in r.stderr
    assert "k3scluster-install: FAILED host=rolf step=find-disk exit=1" in r.stderr
    assert "its QEMU was stopped" in r.stderr or "the VM was stopped" in r.stderr
    # nothing runs that the state does not know: no QEMU of this VM, no tap
    assert _qemus(spec.name) == []
    assert spec.tap not in _links(ns)
    m = machine.read_manifest(spec.path)
    assert m is not None and m["installed"] is False
    # the lab's files are the owner's alone: the disk will hold the cluster's secrets
    assert spec.path.parent.stat().st_mode & 0o777 == 0o700
    assert spec.path.stat().st_mode & 0o777 == 0o700
    for name in ("disk.qcow2", "console.log", "qemu.log", "k3scluster-vm.json"):
        assert (spec.path / name).stat().st_mode & 0o777 == 0o600, name


def vg_setup(cluster, tmp: Path) -> str:  # type: ignore[no-untyped-def]
    from k3scluster.installer import render_installer

    return render_installer(cluster, "rolf", tmp, vm=True)["installers/rolf/system-setup.sh"]


def test_a_qemu_killed_mid_install_is_not_installed_and_the_next_up_installs_again(
    cluster, ns: str, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    render = tmp_path / STACK
    render_to_dir(cluster, render, [], lab.vm_render(cluster, STACK, render))
    link = tmp_path / "result-rolf"
    built = subprocess.run(
        [str(NIX), "--extra-experimental-features", "nix-command", "build", "--file",
         str(render / "installers" / "rolf"), "--out-link", str(link)],
        capture_output=True, text=True, check=False,
    )
    assert built.returncode == 0, built.stderr
    spec = _spec(cluster, tmp_path, link)
    _net_up(ns, cluster, tmp_path)
    console = spec.path / "console.log"
    first = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "k3scluster.lab.ctl", "vm-up",
         "--spec", spec.to_json()],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while "K3SGUEST job install start" not in (
            console.read_text(errors="replace") if console.exists() else ""
        ):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the install did not start"
            time.sleep(0.5)
        # one VM, one action at a time: a second ctl is turned away while the first runs
        other = _ctl(ns, "vm-stop", spec.to_json())
        assert other.returncode == 1 and "another k3scluster process" in other.stderr
        # the OOM killer, say: QEMU dies in the middle of the install
        (pid,) = _qemus(spec.name)
        os.kill(pid, signal.SIGKILL)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1, out + err
    assert "ended without the installer's 'k3scluster-install: OK'" in err
    assert machine.read_manifest(spec.path)["installed"] is False  # type: ignore[index]
    assert spec.tap not in _links(ns)

    # the next vm-up (the next `pulumi up`) installs it again, on a new disk, and boots it
    again = _ctl(ns, "vm-up", spec.to_json(), timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    text = console.read_text(errors="replace")
    boots = [f.split(" job=")[1].split()[0] for f in vg.fact_values(text, "boot")]
    assert boots == ["install", "install", "serve"]
    assert text.count("k3scluster-install: OK host=rolf") == 1
    assert machine.read_manifest(spec.path)["installed"] is True  # type: ignore[index]
    assert vg.ping_until(ns, spec.ip, 30)
    done = _ctl(ns, "vm-delete", spec.to_json())
    assert done.returncode == 0, done.stderr
    assert _qemus(spec.name) == [] and not spec.path.exists()
