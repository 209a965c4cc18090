"""What the lab's steps run: ``python -m k3scluster.lab.ctl <task> --spec JSON``.

- ``net-up`` / ``net-down``: the stack's bridge with the plan's gateway (and optional NAT);
  ``network``;
- ``vm-up``: make a host's VM (disk, EFI variables, tap), install it from its ISO (QEMU
  ends when the installer powers off), then run it from its disk, daemonized, and wait until
  it answers ping at its planned IP; idempotent: a second run of an installed, running VM
  changes nothing, an installed, stopped one is only started (``machine``). A failed
  ``vm-up`` stops its QEMU and removes its tap: nothing runs that the state does not know
  (the disk stays: the next ``vm-up`` takes it up again);
- ``vm-stop`` / ``vm-start``: power a VM off (ACPI, then hard) or on again (the bridge made
  again from the lab's record when it is missing, after a reboot of this machine);
- ``vm-delete``: stop it and delete its files, proven by its manifest first.

Every VM task holds the VM's lock (``lock``), ``net-up``/``net-down`` (also run by a
VM task that makes a missing bridge again) the lab's network lock; all run with umask 077. Failures print the end
of the VM's console log. Plain library code: no pulumi here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from k3scluster.errors import K3sClusterError
from k3scluster.lab import machine, network, qemu
from k3scluster.lab.lock import vm_lock
from k3scluster.lab.machine import read_manifest
from k3scluster.lab.process import NEEDS_ROOT_HINT, running_pid, say, stop
from k3scluster.lab.spec import MARKER, NetSpec, VmSpec


def _ovmf(spec: VmSpec) -> qemu.Ovmf | None:
    return qemu.find_ovmf() if spec.boot == "efi" else None


def vm_up(spec: VmSpec) -> None:
    with vm_lock(spec):
        try:
            accel = _vm_up(spec)
        except BaseException:
            # nothing left running that the state does not know: QEMU stopped, tap removed
            if stop(spec):
                say(f"host {spec.host}: its QEMU was stopped")
            network.delete_tap(spec)
            raise
    # the console as the spec records the VM's directory (this output is in the state)
    console = Path(spec.dir) / qemu.files(spec)["console"].name
    print(json.dumps({"host": spec.host, "mac": spec.mac, "accel": accel,
                      "console": str(console)}))


def _vm_up(spec: VmSpec) -> str:
    m = machine.claim(spec)
    ovmf = _ovmf(spec)
    machine.prepare_disk(spec, ovmf)
    network.ensure_tap(spec)
    accel = machine.resolve_accel(spec, m)
    machine.write_manifest(spec.path, m)
    if not m.get("installed"):
        if running_pid(spec) is not None:  # an install that an interrupted run left
            stop(spec)
        machine.install(spec, m, accel, ovmf)
    machine.boot(spec, accel, ovmf)
    return accel


def vm_start(spec: VmSpec) -> None:
    with vm_lock(spec):
        m = read_manifest(spec.path)
        if not machine.is_ours(m, spec) or not (m or {}).get("installed"):
            raise K3sClusterError(
                f"host {spec.host} has no installed VM in {spec.path}", hint="run pulumi up"
            )
        assert m is not None
        network.ensure_tap(spec)
        accel = str(m.get("accel") or machine.resolve_accel(spec, m))
        machine.boot(spec, accel, _ovmf(spec))


def vm_stop(spec: VmSpec) -> None:
    with vm_lock(spec):
        if not machine.is_ours(read_manifest(spec.path), spec):
            raise K3sClusterError(f"no VM of host {spec.host} in {spec.path}")
        say(f"host {spec.host}: " + ("stopped" if stop(spec, graceful=30) else "was not running"))


def vm_delete(spec: VmSpec) -> None:
    with vm_lock(spec, remove=True):
        _vm_delete(spec)


def _vm_delete(spec: VmSpec) -> None:
    d = spec.path
    m = read_manifest(d)
    if m is None:
        if d.exists() and any(d.iterdir()):
            raise K3sClusterError(
                f"{d} has no {MARKER}: not a VM directory of k3scluster, nothing was deleted"
            )
        network.delete_tap(spec)
        machine.forget_host_keys(spec)
        say(f"host {spec.host}: no VM (already gone)")
        return
    if not machine.is_ours(m, spec):
        raise K3sClusterError(
            f"{d} belongs to VM {m.get('host')!r} of lab {machine.manifest_owner(m)!r}; "
            "nothing was deleted"
        )
    stop(spec)
    network.delete_tap(spec)
    machine.forget_host_keys(spec)
    names = [n for n in m.get("files", []) if isinstance(n, str) and "/" not in n and n]
    for n in names:
        (d / n).unlink(missing_ok=True)
    machine.manifest_path(d).unlink(missing_ok=True)
    left = sorted(p.name for p in d.iterdir()) if d.exists() else []
    if left:
        say(f"host {spec.host}: kept files the VM did not make: {', '.join(left)}")
    else:
        d.rmdir()
    say(f"host {spec.host}: VM stopped, disk and files deleted")


# -- the listing behind `k3scluster vms` ------------------------------------------------------


def list_vms(lab: Path) -> list[dict[str, Any]]:
    """Every VM of a lab directory: host, state, ip, mac, console log, from the manifests."""
    rows = []
    for d in sorted(p for p in lab.iterdir() if p.is_dir()) if lab.is_dir() else []:
        m = read_manifest(d)
        if m is None or "spec" not in m:
            continue
        spec = VmSpec(**m["spec"]).here(d)
        pid = running_pid(spec)
        if pid is not None:
            state = "running" if m.get("installed") else "installing"
        else:
            state = "stopped" if m.get("installed") else "not installed"
        rows.append(
            {
                "host": spec.host,
                "state": state,
                "ip": spec.ip,
                "mac": spec.mac,
                "accel": m.get("accel"),
                "pid": pid,
                "console": str(qemu.files(spec)["console"]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k3scluster.lab.ctl")
    parser.add_argument(
        "task", choices=("net-up", "net-down", "vm-up", "vm-start", "vm-stop", "vm-delete")
    )
    parser.add_argument("--spec", required=True, help="the NetSpec or VmSpec as JSON")
    args = parser.parse_args(argv)
    os.umask(0o077)  # the disks, consoles and logs QEMU and qemu-img make: 0600
    try:
        if args.task in ("net-up", "net-down"):
            net = NetSpec.from_json(args.spec)
            (network.net_up if args.task == "net-up" else network.net_down)(net)
        else:
            spec = VmSpec.from_json(args.spec)
            {"vm-up": vm_up, "vm-start": vm_start, "vm-stop": vm_stop, "vm-delete": vm_delete}[
                args.task
            ](spec)
    except PermissionError as err:
        print(f"error: {args.task}: {err}\n  hint: {NEEDS_ROOT_HINT}", file=sys.stderr)
        return 1
    except K3sClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
