"""tests/nsforward.py forwards only between namespaces a test made (root only).

It is started as the engine tests start it, and refused where it could carry a connection
off the machine: into a namespace that is not one of tests/netns.py's (here the machine's
own, ``/proc/1/ns/net``), or from a namespace with an interface besides ``lo`` (here the
machine's own). No connection is made to it in either case; a refused run never listens.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import NetNS, available

pytestmark = pytest.mark.root
FORWARD = Path(__file__).resolve().parent / "nsforward.py"


@pytest.fixture
def test_ns() -> Iterator[NetNS]:
    why = available()
    if why:
        pytest.skip(why)
    ns = NetNS.create(["10.0.100.10"])
    yield ns
    ns.delete()


def _run(prefix: list[str], into: str, ready: Path) -> subprocess.CompletedProcess[str]:
    port = str(random.randint(20000, 40000))
    argv = [*prefix, sys.executable, str(FORWARD), "--into", into, "--port", port,
            "--listen", "127.0.0.1", "--ready-file", str(ready)]
    try:
        return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=8)
    except subprocess.TimeoutExpired:  # it ran, listening: it was not refused
        return subprocess.CompletedProcess(argv, -1, "", "still running after 8 s")


def test_it_forwards_into_no_namespace_but_a_tests(test_ns: NetNS, tmp_path: Path) -> None:
    # started in the test's own loopback-only namespace, told to forward into the machine's
    ready = tmp_path / "ready"
    r = _run(["ip", "netns", "exec", test_ns.name], "/proc/1/ns/net", ready)
    assert r.returncode == 1 and not ready.exists(), r.stderr
    assert "is not a namespace of tests/netns.py" in r.stderr


def test_it_does_not_start_in_a_namespace_with_interfaces_besides_lo(
    test_ns: NetNS, tmp_path: Path
) -> None:
    # started in the machine's namespace (eth0 and others), into the test's namespace
    if not [n for _, n in socket.if_nameindex() if n != "lo"]:
        pytest.skip("this machine's namespace has nothing but lo")
    ready = tmp_path / "ready"
    r = _run([], str(test_ns.path), ready)
    assert r.returncode == 1 and not ready.exists(), r.stderr
    assert "has interfaces besides lo" in r.stderr
