"""One VM's directory, disk and install.

Each VM's directory holds a manifest (``k3scluster-vm.json``) written before anything else:
stack, host, guest name and the file names it may hold. Nothing is deleted that the
manifest does not name, and nothing at all when the manifest is another VM's. The lab
directory and each VM's directory are 0700 and every file the lab or QEMU makes is 0600
(``ctl`` runs with umask 077): a disk holds the K3s token and password hashes after the
first deploy.

An install counts only when the installer said so: its last console line is
``installer.OK_MARKER``. A QEMU that ends without it (killed, out of memory, a failed
script that powered off) leaves the VM not installed, and the next ``vm-up`` installs it
again. ``installer.FAILED_MARKER`` ends the wait at once, with the end of the console.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from k3scluster import installer
from k3scluster.errors import K3sClusterError
from k3scluster.lab import hostkeys, qemu
from k3scluster.lab.lock import make_lab_dir
from k3scluster.lab.process import (
    PROGRESS_EVERY,
    cmdline,
    console_since,
    console_tail,
    pid_alive,
    run,
    running_pid,
    say,
    start,
    stop,
)
from k3scluster.lab.spec import MARKER, VmSpec, lab_owner
from k3scluster.progress import run_with_progress
from k3scluster.stackpaths import resolve_args

MANIFEST_KIND = "k3scluster-vm"
PRIVATE = 0o600


def manifest_path(spec_dir: Path) -> Path:
    return spec_dir / MARKER


def read_manifest(d: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(manifest_path(d).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == MANIFEST_KIND else None


def write_manifest(d: Path, data: dict[str, Any]) -> None:
    tmp = d / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(manifest_path(d))


def manifest_owner(m: dict[str, Any]) -> str:
    """The lab a manifest's VM belongs to (``lab_owner``), for messages."""
    spec = m.get("spec")
    lab_id = spec.get("lab_id") if isinstance(spec, dict) else ""
    return lab_owner(str(m.get("stack")), str(lab_id or ""))


def is_ours(manifest: dict[str, Any] | None, spec: VmSpec) -> bool:
    return (
        manifest is not None
        and manifest.get("stack") == spec.stack
        and manifest.get("host") == spec.host
        and manifest.get("name") == spec.name
    )


def claim(spec: VmSpec) -> dict[str, Any]:
    """The VM's directory (0700, in the 0700 lab) with its manifest: made now, or proven ours."""
    d = spec.path
    make_lab_dir(d.parent)
    m = read_manifest(d)
    if m is not None:
        if not is_ours(m, spec):
            raise K3sClusterError(
                f"{d} belongs to VM {m.get('host')!r} of lab {manifest_owner(m)!r}, "
                f"not to {spec.host!r} of {spec.owner!r}; nothing was changed",
                hint="two stacks share a lab directory: give one another k3scluster:renderDir",
            )
        d.chmod(0o700)
        m["spec"] = json.loads(spec.to_json())
        # a VM made by an earlier version: the files this version makes are its, too
        m["files"] = sorted({*m.get("files", []), *(p.name for p in qemu.files(spec).values())})
        write_manifest(d, m)
        return m
    if d.exists() and any(d.iterdir()):
        raise K3sClusterError(
            f"{d} exists, is not empty and has no {MARKER}: it was not made by k3scluster, "
            "nothing was changed",
            hint="move it away, or set k3scluster:renderDir elsewhere",
        )
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)
    m = {
        "kind": MANIFEST_KIND,
        "stack": spec.stack,
        "host": spec.host,
        "name": spec.name,
        "files": sorted(p.name for p in qemu.files(spec).values()),
        "installed": False,
        "spec": json.loads(spec.to_json()),
    }
    write_manifest(d, m)
    return m


def prepare_disk(spec: VmSpec, ovmf: qemu.Ovmf | None) -> None:
    """The VM's disk and EFI variables, made when missing; both 0600."""
    f = qemu.files(spec)
    if not f["disk"].exists():
        run(qemu.disk_create_argv(spec.qemu_img, f["disk"], spec.disk_gib))
    f["disk"].chmod(PRIVATE)
    if ovmf is not None:
        if not f["efivars"].exists():
            shutil.copyfile(ovmf.vars_template, f["efivars"])
        f["efivars"].chmod(PRIVATE)


def resolve_accel(spec: VmSpec, m: dict[str, Any]) -> str:
    """``k3scluster:vmAccel`` for this start, checked here by the KVM probe (the program
    leaves it as it is, so a preview starts no QEMU and the probe's answer is never part of
    the spec): ``auto`` resolved, ``kvm`` refused with a clear error when KVM does not work
    here, before a VM is started. The answer is kept in the manifest, which a later
    ``vm-start`` reuses."""
    accel, warning = qemu.choose_accel(spec.accel, spec.qemu)
    if warning:
        print(f"warning: host {spec.host}: {warning}", file=sys.stderr, flush=True)
    m["accel"] = accel
    return accel


def forget_host_keys(spec: VmSpec) -> None:
    """A new install (or no VM) has other host keys: drop the old ones from the stack's
    known_hosts, and the hardware file read from the old disk."""
    qemu.files(spec)["hardware"].unlink(missing_ok=True)
    known_hosts = spec.known_hosts_path
    if known_hosts is not None and hostkeys.forget_host(known_hosts, spec.ip):
        say(f"host {spec.host}: its old ssh host keys dropped from {spec.known_hosts}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(nothing on the console yet)"


def build_iso(spec: VmSpec) -> None:
    """The host's installer ISO, built from the render now (``spec.iso_build``): only a VM
    about to be installed boots it."""
    if not spec.iso_build:
        return
    say(f"host {spec.host}: building its installer ISO")
    code = run_with_progress(
        resolve_args(spec.iso_build), f"host {spec.host}: the ISO build", say
    )
    if code != 0:
        raise K3sClusterError(
            f"host {spec.host}: the installer ISO build failed with exit code {code}",
            hint="its log is above; `pulumi up` builds it again",
        )


def install(spec: VmSpec, m: dict[str, Any], accel: str, ovmf: qemu.Ovmf | None) -> None:
    f = qemu.files(spec)
    build_iso(spec)
    iso = installer.find_iso(spec.iso_path).resolve()
    forget_host_keys(spec)
    m["installed"] = False
    write_manifest(spec.path, m)
    # every install on a new disk: what an interrupted one left is not an installed system
    # (and the installer would refuse to wipe a disk that looks installed)
    f["disk"].unlink(missing_ok=True)
    f["efivars"].unlink(missing_ok=True)
    prepare_disk(spec, ovmf)
    since = f["console"].stat().st_size if f["console"].exists() else 0
    say(f"host {spec.host}: installing from {iso} (console: {f['console']})")
    pid = start(spec, qemu.vm_argv(spec, accel, ovmf=ovmf, iso=iso), "the install")
    began = time.monotonic()
    last_report = began
    while True:
        text = console_since(f["console"], since)
        if installer.FAILED_MARKER in text:
            stop(spec)
            raise K3sClusterError(
                f"host {spec.host}: the installer failed; the VM was stopped, and "
                "`pulumi up` runs it again\n" + console_tail(f["console"], since=since)
            )
        if not pid_alive(pid):
            break
        now = time.monotonic()
        if now - began > spec.install_timeout:
            stop(spec)
            raise K3sClusterError(
                f"host {spec.host}: the installer did not finish within {spec.install_timeout} s "
                f"(k3scluster:vmInstallTimeout); the VM was stopped\n"
                + console_tail(f["console"], since=since)
            )
        if now - last_report >= PROGRESS_EVERY:
            say(f"host {spec.host}: installing for {now - began:.0f} s: {_last_line(text)}")
            last_report = now
        time.sleep(1)
    text = console_since(f["console"], since)
    if f"{installer.OK_MARKER} host={spec.host}" not in text:
        raise K3sClusterError(
            f"host {spec.host}: the install's QEMU ended without the installer's "
            f"'{installer.OK_MARKER}' (killed, or out of memory?): not installed; "
            "`pulumi up` installs it again\n" + console_tail(f["console"], since=since)
        )
    m["installed"] = True
    write_manifest(spec.path, m)
    say(f"host {spec.host}: installed; the ISO is not attached again")


def boot(spec: VmSpec, accel: str, ovmf: qemu.Ovmf | None) -> None:
    """Run the installed VM from its disk (restarted when its settings changed) until it
    answers ping at its IP."""
    f = qemu.files(spec)
    argv = qemu.vm_argv(spec, accel, ovmf=ovmf, iso=None)
    pid = running_pid(spec)
    if pid is not None and cmdline(pid) == argv:
        say(f"host {spec.host}: running (pid {pid})")
    else:
        if pid is not None:
            say(f"host {spec.host}: restarting with its new settings")
            stop(spec, graceful=60)
        pid = start(spec, argv, "the boot from disk")
        say(f"host {spec.host}: booted from its disk (pid {pid})")
    began = time.monotonic()
    last_report = began
    while not _ping(spec.ip):
        if not pid_alive(pid):
            raise K3sClusterError(
                f"host {spec.host}: the VM stopped before it answered at {spec.ip}\n"
                + console_tail(f["console"])
            )
        now = time.monotonic()
        if now - began > spec.boot_timeout:
            raise K3sClusterError(
                f"host {spec.host}: no answer at {spec.ip} within {spec.boot_timeout} s "
                f"(k3scluster:vmBootTimeout)\n" + console_tail(f["console"])
            )
        if now - last_report >= PROGRESS_EVERY:
            say(f"host {spec.host}: no answer at {spec.ip} yet after {now - began:.0f} s")
            last_report = now
        time.sleep(1)
    say(f"host {spec.host}: answers at {spec.ip}")


def _ping(ip: str) -> bool:
    ping = shutil.which("ping")
    argv = [ping, "-c", "1", "-W", "1", ip] if ping else ["busybox", "ping", "-c", "1", "-W", "1", ip]
    return run(argv, check=False).returncode == 0
