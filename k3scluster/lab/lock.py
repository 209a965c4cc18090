"""One ``ctl`` action at a time per VM: an exclusive ``flock`` on ``<lab>/.<host>.lock``;
one ``net-up``/``net-down`` at a time per lab: ``<lab>/.network.lock`` (``network_lock``).

A second process that wants the same VM (another ``pulumi up``, ``k3scluster vms --start``
while an install runs) fails at once with the holder's pid instead of starting a second QEMU
on the same disk. The lock file lies beside the VM's directory, not in it (``vm-delete``
removes the directory while holding the lock, then the lock file). The kernel drops the
lock when its holder dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from k3scluster.errors import K3sClusterError
from k3scluster.lab.spec import VmSpec


def lock_path(spec: VmSpec) -> Path:
    return spec.path.parent / f".{spec.host}.lock"


def make_lab_dir(lab: Path) -> None:
    """The lab directory, 0700: it holds the VMs' disks, which hold the cluster's secrets
    after the first deploy."""
    lab.mkdir(mode=0o700, parents=True, exist_ok=True)
    lab.chmod(0o700)


@contextlib.contextmanager
def vm_lock(spec: VmSpec, *, remove: bool = False) -> Iterator[None]:
    """Hold the VM's lock for the block; ``remove`` deletes the lock file at the end (the
    VM is gone)."""
    path = lock_path(spec)
    make_lab_dir(path.parent)
    fd = _locked(path, spec)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        if remove:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


NETWORK_LOCK = ".network.lock"
NETWORK_LOCK_WAIT = 120.0  # seconds: a net-up takes seconds


@contextlib.contextmanager
def network_lock(lab: Path | None, *, wait: float = NETWORK_LOCK_WAIT) -> Iterator[None]:
    """Hold the lab's network lock for the block, waiting up to ``wait`` seconds for
    another holder (two VMs started at once after this machine restarted both make the
    bridge again: the second finds it made). The lock file is deleted at the end (a waiter
    that opened it before takes the lock on a new one: ``_locked_file``), so a lab leaves
    none behind. No lab directory yet (its first net-up, which one ``pulumi up`` runs under
    the stack's lock) or none at all: no lock, and no directory made for one."""
    if lab is None or not lab.is_dir():
        yield
        return
    path = lab / NETWORK_LOCK
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = _locked_file(path)
            break
        except BlockingIOError as busy:
            if time.monotonic() >= deadline:
                raise K3sClusterError(
                    f"another k3scluster process (pid {busy.args[0]}) has been changing "
                    f"this lab's network ({lab}) for {wait:.0f} s; nothing was done",
                    hint="wait for it to finish (pulumi up, or k3scluster vms --start)",
                ) from None
            time.sleep(0.2)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _locked_file(path: Path) -> int:
    """An fd of ``path`` with its exclusive lock; raises BlockingIOError(holder's pid) while
    another process holds it. A lock taken on a file that was unlinked meanwhile (opened
    before, locked after its holder deleted it: ``vm-delete``, the end of a network lock)
    guards nothing: a third process makes a new file and locks that. So the lock counts
    only on the file that is at ``path`` now; otherwise it is taken again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BlockingIOError(holder) from None
        held = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def _locked(path: Path, spec: VmSpec) -> int:
    """An fd of ``path`` with its exclusive lock (``_locked_file``); a VM another process
    works on is refused at once, naming it."""
    try:
        return _locked_file(path)
    except BlockingIOError as busy:
        raise K3sClusterError(
            f"host {spec.host}: another k3scluster process (pid {busy.args[0]}) is working on "
            "this VM; nothing was done",
            hint="wait for it to finish (pulumi up, or k3scluster vms --start/--stop)",
        ) from None
