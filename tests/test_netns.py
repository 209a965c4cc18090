"""tests/netns.py removes only what a killed test run of its own left behind: never the
namespaces (and the servers in them) of a run that lives, nor a namespace it did not name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest

pytestmark = pytest.mark.root
TESTS = Path(__file__).resolve().parent

# A test run in a pid namespace of its own: its pid is not one this process can see. The
# child names its namespace after a pid above pid_max, which no process here can have.
CHILD = """
import os, sys
sys.path.insert(0, {tests!r})
import netns
os.getpid = lambda: {unseen}
ns = netns.NetNS.create()
server = ns.popen(["sleep", "600"], {log!r})
print(ns.name, server.pid, flush=True)
sys.stdin.read()  # lives until the test lets it end, then ends without cleaning up
"""


@pytest.fixture(autouse=True)
def _root() -> None:
    why = netns.available()
    if why:
        pytest.skip(why)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _until(what: str, cond: object, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_a_live_run_whose_pid_is_not_seen_here_keeps_its_namespace_and_servers(
    tmp_path: Path,
) -> None:
    unseen = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    code = CHILD.format(tests=str(TESTS), unseen=unseen, log=str(tmp_path / "sleep.log"))
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    name, server = "", 0
    try:
        assert child.stdout is not None
        name, pid = child.stdout.readline().split()
        server = int(pid)
        path = Path("/run/netns") / name
        assert name == f"k3sct-{unseen}-0" and path.exists() and _alive(server)
        _until("its server in the namespace", lambda: pid in subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True,
            check=False).stdout.split())
        netns._remove_stale()  # as the next NetNS.create of any test run does
        assert path.exists(), "a live run's namespace was removed"
        assert _alive(server), "a live run's server was killed"
        # the run ends without cleaning up (killed): now its leftovers go
        assert child.stdin is not None
        child.stdin.close()
        child.wait(20)
        netns._remove_stale()
        assert not path.exists()
        _until("the left server killed", lambda: not _alive(server))
    finally:
        child.kill()
        if server and _alive(server):
            os.kill(server, signal.SIGKILL)
        if name:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def test_a_namespace_named_otherwise_is_left_alone() -> None:
    name = f"k3sct-notours-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        netns._remove_stale()
        assert (Path("/run/netns") / name).exists()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def test_a_namespace_left_by_an_earlier_run_with_this_pid_does_not_block_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import itertools

    n = 1000 + next(netns._COUNTER)
    name = f"k3sct-{os.getpid()}-{n}"  # what a killed run that had this pid left behind
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    left = netns.NetNS(name).popen(["sleep", "600"], tmp_path / "sleep.log")
    _until("the left server in its namespace", lambda: str(left.pid) in subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout.split())
    mine = netns.NetNS.create()  # this run's own: kept
    monkeypatch.setattr(netns, "_COUNTER", itertools.count(n))
    ns = None
    try:
        ns = netns.NetNS.create()
        assert ns.name == name
        left.wait(20)  # the left server was killed
        assert mine.path.exists()
    finally:
        left.kill()
        for x in (ns, mine):
            if x is not None:
                x.delete()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
