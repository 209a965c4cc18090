"""The QEMU process of a VM: commands, pids proven by QEMU's ``-name``, QMP, start and stop,
the console's tail, and the lab's progress lines.

Progress lines go to stderr with the ``k3scluster: `` prefix, so both runners show them while
a step runs (the python runner forwards such lines to Pulumi's log, pulumi-command shows all
output).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from k3scluster.errors import K3sClusterError
from k3scluster.lab import qemu
from k3scluster.lab.spec import VmSpec

CONSOLE_TAIL_LINES = 40
PROGRESS_PREFIX = "k3scluster: "
PROGRESS_EVERY = 30.0  # seconds between progress lines of a long wait
NEEDS_ROOT_HINT = (
    "the lab's bridge, taps and VM files need root or CAP_NET_ADMIN: run it as the user who "
    "ran `pulumi up` (e.g. sudo -E pulumi destroy)"
)


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except OSError as exn:
        raise K3sClusterError(f"cannot run {argv[0]}: {exn.strerror or exn}") from None
    if check and proc.returncode != 0:
        denied = "Operation not permitted" in proc.stderr or "Permission denied" in proc.stderr
        raise K3sClusterError(
            f"`{' '.join(argv)}` failed with exit code {proc.returncode}: {proc.stderr.strip()}",
            hint=NEEDS_ROOT_HINT if denied else "",
        )
    return proc


def say(text: str) -> None:
    print(PROGRESS_PREFIX + text, file=sys.stderr, flush=True)


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES, since: int = 0) -> str:
    try:
        with path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return f"(no console log at {path})"
    tail = text.replace("\r", "").splitlines()[-lines:]
    return f"--- end of {path} ---\n" + "\n".join(tail)


def console_since(path: Path, since: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace").replace("\r", "")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
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
    if not pid_alive(pid):
        return None
    if f"guest={spec.name},process={spec.name}" not in cmdline(pid):
        return None
    return pid


def qemu_running(name: str) -> bool:
    """Is a QEMU with this ``-name`` running? Read from /proc, which every user may read (a
    preview need not be root: the lab's pidfiles are not readable by others)."""
    want = f"guest={name},process={name}"
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and want in cmdline(int(d.name)) and pid_alive(int(d.name)):
            return True
    return False


def qmp(path: Path, command: str, timeout: float = 5.0) -> dict[str, Any] | None:
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


def wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    return not pid_alive(pid)


def stop(spec: VmSpec, *, graceful: float = 0.0) -> bool:
    """Stop the VM (ACPI power button first when ``graceful`` > 0); False if it was not running."""
    pid = running_pid(spec)
    if pid is None:
        return False
    sock = qemu.files(spec)["qmp"]
    if graceful > 0:
        qmp(sock, "system_powerdown")
        if wait_gone(pid, graceful):
            return True
    qmp(sock, "quit")
    if not wait_gone(pid, 10):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 5)
    return True


def start(spec: VmSpec, argv: list[str], what: str) -> int:
    """Start the daemonized QEMU ``argv``; its pid, proven by its name."""
    f = qemu.files(spec)
    f["pid"].unlink(missing_ok=True)
    # QEMU's -daemonize sets umask 027: the console and its log are made here, 0600 (QEMU
    # appends to them); the console may show what the VM prints of its secrets
    for log in (f["console"], f["qemu-log"]):
        os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        log.chmod(0o600)
    proc = run(argv, check=False)
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
