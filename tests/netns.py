"""Named network namespaces for tests (root only): servers live in them, never on the host.

A :class:`NetNS` is ``ip netns add k3sct-<pid>-<n>`` with loopback up, holding the addresses
the test chose on ``lo`` (this kernel has no dummy interfaces): a plan's addresses are reached
only there. :meth:`NetNS.link` joins namespaces on a LAN (a bridge and veth pairs).
Processes start inside it with :meth:`NetNS.popen` (``nsenter --net``); the test's own Python
code reaches it with :meth:`NetNS.entered`, which moves only the calling thread into the
namespace (``setns(2)`` on a network namespace is per thread) and back out. Threads and
subprocesses started while entered begin in the namespace too.

    ns = NetNS.create(["10.0.100.10"])
    with ns.entered():
        ...  # sockets made here live in the namespace
    ns.delete()  # after its processes are gone

A namespace is its creator's while that process lives: it holds a shared ``flock`` on the
namespace file until :meth:`NetNS.delete`. Namespaces a killed test run left behind are cleaned
up when the next one is made, and only those: named ``k3sct-<pid>-<n>``, that pid gone (or
this process's own: a killed run that had the same pid), AND nobody holding the lock (a live
run in another pid namespace, whose pid is not seen here, still holds it).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
_COUNTER = itertools.count()
_OURS = re.compile(r"k3sct-(\d+)-(\d+)")
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """None when namespaces can be made here, else why not (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces); CI runs as root"
    for tool in ("ip", "nsenter", "openssl"):
        if not shutil.which(tool):
            return f"needs {tool} on PATH"
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class NetNS:
    name: str
    addresses: list[str] = field(default_factory=list)
    _held: int | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    @classmethod
    def create(cls, addresses: Sequence[str] = ()) -> NetNS:
        _remove_stale()
        ns = cls(f"k3sct-{os.getpid()}-{next(_COUNTER)}")
        _ip("netns", "add", ns.name)
        try:
            ns._held = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(ns._held, fcntl.LOCK_SH)  # this run's, as long as it lives
            ns.run("ip", "link", "set", "lo", "up")
            for a in addresses:
                ns.add_address(a)
        except BaseException:
            ns.delete()
            raise
        return ns

    def add_address(self, ip: str) -> None:
        """``ip``/32 on the namespace's loopback (this kernel has no dummy interfaces)."""
        self.run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        self.addresses.append(ip)

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(self, *argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            self.argv(*argv), check=check, capture_output=True, text=True, **kw
        )

    def popen(self, argv: Sequence[str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
        """``argv`` inside the namespace, in a session (process group) of its own, its
        stdout and stderr appended to ``log``."""
        with open(log, "ab") as out:
            return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
                self.argv(*argv), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, **kw,
            )

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in this namespace for the ``with`` block."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def link(self, other: NetNS, ip: str, ifname: str = "eth0", prefix: int = 24) -> None:
        """A veth pair from this namespace's bridge ``br0`` (made on first use) to ``other``,
        where its end is ``ifname`` holding ``ip``/``prefix``: namespaces on one LAN."""
        if self.run("ip", "-o", "link", "show", "br0", check=False).returncode != 0:
            self.run("ip", "link", "add", "br0", "type", "bridge")
            self.run("ip", "link", "set", "br0", "up")
        port = f"p{next(_COUNTER)}"
        self.run("ip", "link", "add", port, "type", "veth", "peer", "name", ifname,
                 "netns", other.name)
        self.run("ip", "link", "set", port, "master", "br0", "up")
        other.run("ip", "addr", "add", f"{ip}/{prefix}", "dev", ifname)
        other.run("ip", "link", "set", ifname, "up")
        other.addresses.append(ip)

    def delete(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def _remove_stale() -> None:
    """Namespaces of an earlier test run that was killed: the servers in them killed, the
    namespaces removed. Proof of target: a name this harness gives (``k3sct-<pid>-<n>``),
    that pid gone, and the lock its creator held free (taken here while it is removed)."""
    import signal

    for p in Path("/run/netns").glob("k3sct-*"):
        m = _OURS.fullmatch(p.name)
        # this process's own pid: its own namespaces hold their lock (checked below); any
        # other of that name is an earlier process's that had the same pid and was killed
        if not m or (int(m[1]) != os.getpid() and _alive(int(m[1]))):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its run lives (in a pid namespace of its own, its pid unseen here)
            pids = subprocess.run(["ip", "netns", "pids", p.name], capture_output=True,
                                  text=True, check=False)
            for left in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(left), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", p.name], capture_output=True, check=False)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(proc: subprocess.Popen[bytes], grace: float = 5) -> None:
    """Ends ``proc``'s process group (SIGTERM, then SIGKILL) and reaps ``proc``."""
    import signal

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
