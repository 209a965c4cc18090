"""What the lab's steps run: ``python -m k3scluster.lab.ctl <task> --spec JSON``.

- ``net-up`` / ``net-down``: the stack's bridge with the plan's gateway (and optional NAT);
- ``vm-up``: make a host's VM (disk, EFI variables, tap), install it from its ISO (QEMU
  ends when the installer reboots or powers off), then run it from its disk, daemonized,
  and wait until it answers ping at its planned IP; idempotent: a second run of an
  installed, running VM changes nothing, an installed, stopped one is only started;
- ``vm-stop`` / ``vm-start``: power a VM off (ACPI, then hard) or on again;
- ``vm-delete``: stop it and delete its files, proven by its manifest first.

Each VM's directory holds a manifest (``k3scluster-vm.json``) written before anything else:
stack, host, guest name and the file names it may hold. Nothing is deleted that the
manifest does not name, and nothing at all when the manifest is another VM's. Links are
deleted only when they carry the lab's ``ip link`` alias.

Failures print the end of the VM's console log. Plain library code: no pulumi here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from k3scluster.errors import K3sClusterError
from k3scluster.lab import netcheck, qemu
from k3scluster.lab.spec import MARKER, NetSpec, VmSpec, link_alias

CONSOLE_TAIL_LINES = 40
MANIFEST_KIND = "k3scluster-vm"
NAT_TABLE_PREFIX = "k3scluster_"


# -- small helpers -------------------------------------------------------------------------


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except OSError as exn:
        raise K3sClusterError(f"cannot run {argv[0]}: {exn.strerror or exn}") from None
    if check and proc.returncode != 0:
        raise K3sClusterError(
            f"`{' '.join(argv)}` failed with exit code {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc


def _say(text: str) -> None:
    print(text, flush=True)


def _link(name: str) -> dict[str, Any] | None:
    proc = _run(["ip", "-j", "-d", "link", "show", "dev", name], check=False)
    if proc.returncode != 0:
        return None
    data = json.loads(proc.stdout or "[]")
    return data[0] if data else None


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES, since: int = 0) -> str:
    try:
        with path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return f"(no console log at {path})"
    tail = text.replace("\r", "").splitlines()[-lines:]
    return f"--- end of {path} ---\n" + "\n".join(tail)


# -- the network ------------------------------------------------------------------------------


def nat_table(stack: str) -> str:
    from k3scluster.lab.spec import _hex

    return NAT_TABLE_PREFIX + _hex("nat", stack)[:8]


def nat_ruleset(net: NetSpec) -> str:
    """nft script: masquerade the lab subnet out of every other interface, forward it."""
    return f"""table ip {nat_table(net.stack)} {{
  chain lab_postrouting {{
    type nat hook postrouting priority srcnat;
    ip saddr {net.subnet} oifname != "{net.bridge}" masquerade
  }}
  chain lab_forward {{
    type filter hook forward priority filter;
    iifname "{net.bridge}" accept
    oifname "{net.bridge}" ct state established,related accept
  }}
}}
"""


def net_up(net: NetSpec) -> None:
    import ipaddress

    alias = link_alias(net.stack)
    # before anything is created: the subnet must be free on this machine
    netcheck.check_machine(
        ipaddress.IPv4Network(net.subnet), net.bridge, alias, net.location
    )
    link = _link(net.bridge)
    if link is not None and link.get("ifalias") != alias:
        raise K3sClusterError(
            f"a link named {net.bridge} exists and is not this stack's lab bridge "
            f"(its alias is {link.get('ifalias')!r}, not {alias!r}); nothing was changed",
            hint="delete or rename that link yourself",
        )
    if link is None:
        _run(["ip", "link", "add", "name", net.bridge, "type", "bridge"])
        _run(["ip", "link", "set", "dev", net.bridge, "alias", alias])
        _say(f"created bridge {net.bridge}")
    addrs = netcheck._ip_json("addr", "show", "dev", net.bridge)
    have = {
        f"{a.get('local')}/{a.get('prefixlen')}"
        for link_ in addrs for a in link_.get("addr_info", []) if a.get("family") == "inet"
    }
    if net.gateway not in have:
        _run(["ip", "addr", "add", net.gateway, "dev", net.bridge])
    _run(["ip", "link", "set", "dev", net.bridge, "up"])
    if net.nat:
        _run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        _run(["nft", "delete", "table", "ip", nat_table(net.stack)], check=False)
        proc = subprocess.run(
            ["nft", "-f", "-"], input=nat_ruleset(net), capture_output=True, text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise K3sClusterError(
                f"nft could not add the lab's NAT: {proc.stderr.strip()}",
                hint="install nftables, or pulumi config set k3scluster:vmNat false",
            )
        _say(f"NAT for {net.subnet} (nft table ip {nat_table(net.stack)})")
    _say(f"lab network {net.bridge}: {net.gateway}")


def net_down(net: NetSpec) -> None:
    link = _link(net.bridge)
    if link is None:
        _say(f"bridge {net.bridge} is gone already")
    elif link.get("ifalias") != link_alias(net.stack):
        _say(f"{net.bridge} is not this stack's bridge (alias {link.get('ifalias')!r}); kept")
    else:
        _run(["ip", "link", "delete", "dev", net.bridge])
        _say(f"deleted bridge {net.bridge}")
    if shutil.which("nft"):
        _run(["nft", "delete", "table", "ip", nat_table(net.stack)], check=False)


# -- one VM -----------------------------------------------------------------------------------


def manifest_path(spec_dir: Path) -> Path:
    return spec_dir / MARKER


def read_manifest(d: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(manifest_path(d).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == MANIFEST_KIND else None


def _write_manifest(d: Path, data: dict[str, Any]) -> None:
    tmp = d / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(manifest_path(d))


def _is_ours(manifest: dict[str, Any] | None, spec: VmSpec) -> bool:
    return (
        manifest is not None
        and manifest.get("stack") == spec.stack
        and manifest.get("host") == spec.host
        and manifest.get("name") == spec.name
    )


def _claim(spec: VmSpec) -> dict[str, Any]:
    """The VM's directory with its manifest: made now, or proven ours."""
    d = spec.path
    m = read_manifest(d)
    if m is not None:
        if not _is_ours(m, spec):
            raise K3sClusterError(
                f"{d} belongs to VM {m.get('host')!r} of stack {m.get('stack')!r}, "
                f"not to {spec.host!r} of {spec.stack!r}; nothing was changed",
                hint="two stacks share a lab directory: give one another k3scluster:renderDir",
            )
        m["spec"] = json.loads(spec.to_json())
        _write_manifest(d, m)
        return m
    if d.exists() and any(d.iterdir()):
        raise K3sClusterError(
            f"{d} exists, is not empty and has no {MARKER}: it was not made by k3scluster, "
            "nothing was changed",
            hint="move it away, or set k3scluster:renderDir elsewhere",
        )
    d.mkdir(parents=True, exist_ok=True)
    m = {
        "kind": MANIFEST_KIND,
        "stack": spec.stack,
        "host": spec.host,
        "name": spec.name,
        "files": sorted(p.name for p in qemu.files(spec).values()),
        "installed": False,
        "spec": json.loads(spec.to_json()),
    }
    _write_manifest(d, m)
    return m


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def running_pid(spec: VmSpec) -> int | None:
    """The pid of this VM's QEMU, proven by its ``-name`` (never just a pidfile's number)."""
    try:
        pid = int(qemu.files(spec)["pid"].read_text().strip())
    except (OSError, ValueError):
        return None
    if not _pid_alive(pid):
        return None
    argv = _cmdline(pid)
    if f"guest={spec.name},process={spec.name}" not in argv:
        return None
    return pid


def _qmp(path: Path, command: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """One QMP command; None when the socket does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        return None
                    reply = json.loads(line)
                    if "return" in reply or "error" in reply:
                        break
            return reply if isinstance(reply, dict) else None
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _pid_alive(pid):
            return True
        time.sleep(0.2)
    return not _pid_alive(pid)


def stop(spec: VmSpec, *, graceful: float = 0.0) -> bool:
    """Stop the VM (ACPI power button first when ``graceful`` > 0); False if it was not running."""
    pid = running_pid(spec)
    if pid is None:
        return False
    qmp = qemu.files(spec)["qmp"]
    if graceful > 0:
        _qmp(qmp, "system_powerdown")
        if _wait_gone(pid, graceful):
            return True
    _qmp(qmp, "quit")
    if not _wait_gone(pid, 10):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5)
    return True


def _ensure_tap(spec: VmSpec) -> None:
    alias = link_alias(spec.stack, spec.host)
    link = _link(spec.tap)
    if link is not None and link.get("ifalias") != alias:
        raise K3sClusterError(
            f"a link named {spec.tap} exists and is not {spec.host}'s tap "
            f"(alias {link.get('ifalias')!r}); nothing was changed"
        )
    if _link(spec.bridge) is None:
        raise K3sClusterError(f"the lab bridge {spec.bridge} does not exist: run pulumi up")
    if link is None:
        _run(["ip", "tuntap", "add", "dev", spec.tap, "mode", "tap"])
        _run(["ip", "link", "set", "dev", spec.tap, "alias", alias])
    _run(["ip", "link", "set", "dev", spec.tap, "master", spec.bridge])
    _run(["ip", "link", "set", "dev", spec.tap, "up"])


def _delete_tap(spec: VmSpec) -> None:
    link = _link(spec.tap)
    if link is not None and link.get("ifalias") == link_alias(spec.stack, spec.host):
        _run(["ip", "link", "delete", "dev", spec.tap])


def _start(spec: VmSpec, argv: list[str], what: str) -> int:
    f = qemu.files(spec)
    f["pid"].unlink(missing_ok=True)
    proc = _run(argv, check=False)
    if proc.returncode != 0:
        raise K3sClusterError(
            f"host {spec.host}: QEMU did not start for {what} (exit code {proc.returncode}): "
            f"{proc.stderr.strip()}\n{console_tail(f['console'])}"
        )
    pid = running_pid(spec)
    if pid is None:
        raise K3sClusterError(
            f"host {spec.host}: QEMU exited right after starting ({what})\n"
            + console_tail(f["console"])
        )
    return pid


def _ping(ip: str) -> bool:
    ping = shutil.which("ping")
    argv = [ping, "-c", "1", "-W", "1", ip] if ping else ["busybox", "ping", "-c", "1", "-W", "1", ip]
    return _run(argv, check=False).returncode == 0


def _accel(spec: VmSpec, m: dict[str, Any]) -> str:
    """``k3scluster:vmAccel`` for this start, checked here by the KVM probe (the program
    leaves it as it is, so a preview starts no QEMU): ``auto`` resolved, ``kvm`` refused with a
    clear error when KVM does not work here, before a VM is started. The answer is kept in the
    manifest, which a later ``vm-start`` reuses."""
    accel, warning = qemu.choose_accel(spec.accel, spec.qemu)
    if warning:
        print(f"warning: host {spec.host}: {warning}", file=sys.stderr, flush=True)
    m["accel"] = accel
    return accel


def _install(spec: VmSpec, m: dict[str, Any], accel: str, ovmf: qemu.Ovmf | None) -> None:
    from k3scluster.installer import find_iso

    f = qemu.files(spec)
    iso = find_iso(Path(spec.iso_result)).resolve()
    since = f["console"].stat().st_size if f["console"].exists() else 0
    _say(f"host {spec.host}: installing from {iso} (console: {f['console']})")
    pid = _start(spec, qemu.vm_argv(spec, accel, ovmf=ovmf, iso=iso), "the install")
    if not _wait_gone(pid, spec.install_timeout):
        stop(spec)
        raise K3sClusterError(
            f"host {spec.host}: the installer did not finish within {spec.install_timeout} s "
            f"(k3scluster:vmInstallTimeout); the VM was stopped\n"
            + console_tail(f["console"], since=since)
        )
    text = f["console"].read_bytes()[since:].decode(errors="replace")
    if "ERROR in step" in text:
        raise K3sClusterError(
            f"host {spec.host}: the installer failed; `pulumi up` runs it again\n"
            + console_tail(f["console"], since=since)
        )
    m["installed"] = True
    _write_manifest(spec.path, m)
    _say(f"host {spec.host}: installed; the ISO is not attached again")


def _boot(spec: VmSpec, m: dict[str, Any], accel: str, ovmf: qemu.Ovmf | None) -> None:
    f = qemu.files(spec)
    argv = qemu.vm_argv(spec, accel, ovmf=ovmf, iso=None)
    pid = running_pid(spec)
    if pid is not None and _cmdline(pid) == argv:
        _say(f"host {spec.host}: running (pid {pid})")
    else:
        if pid is not None:
            _say(f"host {spec.host}: restarting with its new settings")
            stop(spec, graceful=60)
        pid = _start(spec, argv, "the boot from disk")
        _say(f"host {spec.host}: booted from its disk (pid {pid})")
    since = 0
    end = time.monotonic() + spec.boot_timeout
    while not _ping(spec.ip):
        if not _pid_alive(pid):
            raise K3sClusterError(
                f"host {spec.host}: the VM stopped before it answered at {spec.ip}\n"
                + console_tail(f["console"], since=since)
            )
        if time.monotonic() > end:
            raise K3sClusterError(
                f"host {spec.host}: no answer at {spec.ip} within {spec.boot_timeout} s "
                f"(k3scluster:vmBootTimeout); the VM keeps running\n"
                + console_tail(f["console"])
            )
        time.sleep(1)
    _say(f"host {spec.host}: answers at {spec.ip}")


def vm_up(spec: VmSpec) -> None:
    m = _claim(spec)
    f = qemu.files(spec)
    ovmf = qemu.find_ovmf() if spec.boot == "efi" else None
    if not f["disk"].exists():
        _run(qemu.disk_create_argv(spec.qemu_img, f["disk"], spec.disk_gib))
    if ovmf is not None and not f["efivars"].exists():
        shutil.copyfile(ovmf.vars_template, f["efivars"])
    _ensure_tap(spec)
    accel = _accel(spec, m)
    _write_manifest(spec.path, m)
    if not m.get("installed"):
        if running_pid(spec) is not None:  # an install that an interrupted run left
            stop(spec)
        _install(spec, m, accel, ovmf)
    _boot(spec, m, accel, ovmf)
    print(json.dumps({"host": spec.host, "mac": spec.mac, "accel": accel,
                      "console": str(f["console"])}))


def vm_start(spec: VmSpec) -> None:
    m = read_manifest(spec.path)
    if not _is_ours(m, spec) or not (m or {}).get("installed"):
        raise K3sClusterError(
            f"host {spec.host} has no installed VM in {spec.path}", hint="run pulumi up"
        )
    assert m is not None
    ovmf = qemu.find_ovmf() if spec.boot == "efi" else None
    _ensure_tap(spec)
    _boot(spec, m, str(m.get("accel") or _accel(spec, m)), ovmf)


def vm_stop(spec: VmSpec) -> None:
    if not _is_ours(read_manifest(spec.path), spec):
        raise K3sClusterError(f"no VM of host {spec.host} in {spec.path}")
    _say(f"host {spec.host}: " + ("stopped" if stop(spec, graceful=30) else "was not running"))


def vm_delete(spec: VmSpec) -> None:
    d = spec.path
    m = read_manifest(d)
    if m is None:
        if d.exists() and any(d.iterdir()):
            raise K3sClusterError(
                f"{d} has no {MARKER}: not a VM directory of k3scluster, nothing was deleted"
            )
        _delete_tap(spec)
        _say(f"host {spec.host}: no VM (already gone)")
        return
    if not _is_ours(m, spec):
        raise K3sClusterError(
            f"{d} belongs to VM {m.get('host')!r} of stack {m.get('stack')!r}; nothing was deleted"
        )
    stop(spec)
    _delete_tap(spec)
    names = [n for n in m.get("files", []) if isinstance(n, str) and "/" not in n and n]
    for n in names:
        (d / n).unlink(missing_ok=True)
    manifest_path(d).unlink(missing_ok=True)
    left = sorted(p.name for p in d.iterdir()) if d.exists() else []
    if left:
        _say(f"host {spec.host}: kept files the VM did not make: {', '.join(left)}")
    else:
        d.rmdir()
    _say(f"host {spec.host}: VM stopped, disk and files deleted")


# -- the listing behind `k3scluster vms` ------------------------------------------------------


def list_vms(lab: Path) -> list[dict[str, Any]]:
    """Every VM of a lab directory: host, state, ip, mac, console log, from the manifests."""
    rows = []
    for d in sorted(p for p in lab.iterdir() if p.is_dir()) if lab.is_dir() else []:
        m = read_manifest(d)
        if m is None or "spec" not in m:
            continue
        spec = VmSpec(**m["spec"])
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
    try:
        if args.task in ("net-up", "net-down"):
            net = NetSpec.from_json(args.spec)
            (net_up if args.task == "net-up" else net_down)(net)
        else:
            spec = VmSpec.from_json(args.spec)
            {"vm-up": vm_up, "vm-start": vm_start, "vm-stop": vm_stop, "vm-delete": vm_delete}[
                args.task
            ](spec)
    except K3sClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
