#!/usr/bin/env python3
"""Plumbing for tests: TCP from the network namespace it starts in into another one.

Not a stand-in for anything: the bytes pass unchanged both ways (TLS stays end to end between
the client and the real server). It lets a ``pulumi up`` that runs in a namespace of its own
(tests/engine.py) reach a real server that lives in another namespace (tests/kubeapi.py's
kube-apiserver) at the same address:

    python tests/nsforward.py --into /run/netns/NAME --port 6443 \\
        --listen 10.0.100.10 --listen 10.0.100.12 --ready-file F

listens on each ``--listen`` address (which must be on this namespace's ``lo``) and connects
each connection to the same address and port inside ``--into``; writes ``--ready-file``
once it listens. It runs until killed.

It forwards only between namespaces a test made: ``--into`` must be one of tests/netns.py's
(``/run/netns/k3sct-<pid>-<n>``), and both namespaces must hold no interface but ``lo``, so
nothing it carries can leave the machine; otherwise it exits (1, saying why) before it
listens, or before it forwards anything.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000
TEST_NETNS = re.compile(r"/run/netns/k3sct-\d+-\d+")  # tests/netns.py's names


def _loopback_only(where: str) -> None:
    """Exits unless the calling thread's network namespace has no interface but lo."""
    others = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    if others:
        sys.exit(f"nsforward: {where} has interfaces besides lo ({', '.join(others)}): it "
                 "forwards only between a test's loopback-only namespaces")


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(listener: socket.socket, ip: str, port: int) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            # this process moved into --into after it listened: a new socket is made there
            out = socket.create_connection((ip, port), timeout=10)
            out.settimeout(None)
        except OSError:
            conn.close()
            continue
        for a, b in ((conn, out), (out, conn)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--into", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--listen", action="append", required=True)
    p.add_argument("--ready-file", required=True)
    a = p.parse_args(argv)
    if not TEST_NETNS.fullmatch(a.into):
        sys.exit(f"nsforward: --into {a.into} is not a namespace of tests/netns.py "
                 "(/run/netns/k3sct-<pid>-<n>)")
    _loopback_only("the namespace it starts in")
    listeners = []
    for ip in a.listen:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, a.port))
        s.listen(64)
        listeners.append((s, ip))
    # the main thread moves (setns is per thread); the threads it starts begin there too
    _setns(a.into)
    _loopback_only(f"--into {a.into}")
    threads = [threading.Thread(target=_serve, args=(s, ip, a.port), daemon=True)
               for s, ip in listeners]
    for t in threads:
        t.start()
    with open(a.ready_file, "w") as f:
        f.write(str(os.getpid()))
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
