"""An etcd snapshot before the first server of a run changes (issue 17 item 4). No pulumi.

``take(...)`` runs ``k3s etcd-snapshot save --name <stack>-<UTC time>`` in the K3s server
container of the first server host where it succeeds (``nixos-container run k3s-server --``
over ssh: a login shell in the container, whose PATH has ``k3s``), in the deploy order. K3s
writes ``<name>-<node>-<unix time>`` under ``/var/lib/rancher/k3s/server/db/snapshots`` in
that container (``/var/lib/nixos-containers/k3s-server/var/lib/rancher/k3s/server/db/
snapshots`` on the host). The README says how to restore from it.
"""

from __future__ import annotations

import datetime
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from k3scluster.errors import K3sClusterError

CONTAINER = "k3s-server"
SNAPSHOT_DIR = "/var/lib/rancher/k3s/server/db/snapshots"
ON_HOST = f"/var/lib/nixos-containers/{CONTAINER}{SNAPSHOT_DIR}"
_SAVED = re.compile(r"Snapshot (\S+) saved")


def snapshot_name(stack: str, now: datetime.datetime) -> str:
    """``<stack>-<YYYYmmdd-HHMMSS>`` (UTC), in the letters K3s keeps in a file name."""
    safe = re.sub(r"[^a-z0-9-]+", "-", stack.lower()).strip("-") or "stack"
    return f"{safe}-{now.astimezone(datetime.UTC):%Y%m%d-%H%M%S}"


def save_argv(name: str) -> list[str]:
    """What runs on the server host (its shell joins the words: each is quoted)."""
    words = ["nixos-container", "run", CONTAINER, "--", "k3s", "etcd-snapshot", "save",
             "--name", name]
    return [shlex.quote(w) for w in words]


@dataclass(frozen=True)
class Taken:
    host: str
    name: str  # the --name given
    file: str  # what K3s saved: <name>-<node>-<unix time> (or the name, when not reported)

    @property
    def path_on_host(self) -> str:
        return f"{ON_HOST}/{self.file}"


def take(
    servers: Sequence[tuple[str, str]],
    name: str,
    run: Callable[[str, list[str]], tuple[int, str]],
    progress: Callable[[str], None],
    host_name: Callable[[str], str | None],
) -> Taken:
    """On the first of ``servers`` ((host, ip), in order) where it succeeds. ``run(ip, words)``
    runs the words on the host over ssh: (exit status, output). Proof of target first:
    ``host_name(ip)`` is the host name the machine at ``ip`` answers with (None: it does not
    answer); nothing runs on a machine that is not the server's host."""
    failures: list[str] = []
    if not servers:
        failures.append("the stack's state records no server it deployed")
    for host, ip in servers:
        answered = host_name(ip)
        if answered != host:
            why = (f"the machine at {ip} answers as {answered}, not as {host}"
                   if answered else f"{host} does not answer at {ip}")
            failures.append(f"{host}: {why}")
            progress(f"etcd snapshot: {why}: nothing runs there; trying the next server")
            continue
        progress(f"etcd snapshot {name} on {host} ({ip})")
        code, out = run(ip, save_argv(name))
        if code == 0:
            m = _SAVED.search(out)
            taken = Taken(host, name, m.group(1) if m else name)
            progress(f"etcd snapshot saved on {host}: {taken.path_on_host}")
            return taken
        last = next((ln.strip() for ln in reversed(out.splitlines()) if ln.strip()),
                     f"exit status {code}")
        failures.append(f"{host}: {last}")
        progress(f"etcd snapshot on {host} failed ({last}); trying the next server")
    raise K3sClusterError(
        "no server took the etcd snapshot before the servers change, so none was changed: "
        + "; ".join(failures),
        hint="look at: ssh root@<server host> journalctl -M k3s-server -u k3s; or turn the "
        "snapshot off for this run: pulumi config set k3scluster:snapshotBeforeServers false",
    )


# the snapshot step's input that makes it run again (``again``)
AGAIN_INPUT = "again"


def again(
    inputs: Mapping[str, str] | None,
    recorded: Mapping[str, str],
    taken_at: str | None,
    pending: bool,
) -> str | None:
    """The value of the snapshot step's ``AGAIN_INPUT`` (None: none).

    The step runs when its inputs (the server hosts' systems, ``inputs``, as its state records
    them; None: not all known before the run) change. A run whose snapshot was taken but
    whose server host's deploy then failed leaves both as they were: the next run would change
    that host with the inputs the snapshot already has, so without taking one. When a server
    host's deploy will run (``pending``: its system is not the one its last deploy installed)
    and the last snapshot (``taken_at``) was taken for exactly these inputs, the input becomes
    that snapshot's time, and a new one is taken first. Otherwise the recorded value is kept,
    so a run that changes no server host does not take one."""
    kept = recorded.get(AGAIN_INPUT)
    before = {k: v for k, v in recorded.items() if k != AGAIN_INPUT}
    if pending and taken_at and inputs is not None and dict(inputs) == before:
        return taken_at
    return kept
