"""etcd members of the K3s servers: read them, remove the ones that leave, clean up stale ones.

Everything goes through ``etcdctl`` inside a server's NixOS container, the way an operator
on that server would run it: ``nixos-container run k3s-server -- etcdctl`` against
``https://127.0.0.1:2379`` with K3s's own etcd client certificate (``ETCD_TLS``). The
rendered container has ``etcdctl`` on its PATH (modules/k3s-server.nix, nixpkgs' ``etcd``);
the K3s package has none. The words are run on a host by a ``Runner`` (over ssh in
``pulumi up``: ``ssh_runner``), so the certificates never leave the server.

Before every removal: ``member list`` and ``endpoint health --cluster`` through a server
that stays, then the quorum rule (``membership.removal_order``) over every member; a
removal that would not keep a quorum is refused naming the unhealthy members, before
anything is removed. Members go one at a time, and the list is read again after each.

Plain library code: no pulumi.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from k3scluster import commands
from k3scluster.errors import K3sClusterError
from k3scluster.membership import (
    Member,
    check_removals,
    members_of,
    node_of_member,
    removal_order,
)

# K3s's etcd client certificates and the local endpoint, inside the server container
# (K3s pkg/etcd: endpoint, runtime.ETCDServerCA / ClientETCDCert / ClientETCDKey)
ETCD_TLS = "/var/lib/rancher/k3s/server/tls/etcd"
ETCD_ENDPOINT = "https://127.0.0.1:2379"
CONTAINER = "k3s-server"
# the K3s server's data, seen from the host (the container's root is under
# /var/lib/nixos-containers/<name>)
CONTAINER_ROOT = f"/var/lib/nixos-containers/{CONTAINER}"
K3S_DB = "/var/lib/rancher/k3s/server/db"
SERVER_UNIT = f"container@{CONTAINER}.service"

# Runs shell words on the host at an address; returns the finished process.
Runner = Callable[[str, Sequence[str]], "subprocess.CompletedProcess[str]"]


# How long one etcdctl call may take (etcdctl's --command-timeout). Against a server whose etcd
# is down etcdctl waits all of it (its gRPC dial does not give up at --dial-timeout). It must
# outlast a leader election: since etcd 3.5 `member list` waits for a leader, and K3s runs
# etcd with a 5 s election timeout (pkg/etcd), so an election after a member's removal can
# take 5-10 s, during which every server would seem not to answer.
COMMAND_TIMEOUT = "15s"
# ``member list`` (read_members: finding a server that answers); the same, so that an
# election is waited out; the tests' etcd (1 s elections) sets it lower to pass over a down
# server sooner
MEMBER_LIST_TIMEOUT = COMMAND_TIMEOUT


def etcdctl(*args: str, command_timeout: str = COMMAND_TIMEOUT) -> list[str]:
    """The words that run ``etcdctl ARGS`` in the host's K3s server container."""
    return [
        "nixos-container", "run", CONTAINER, "--",
        "etcdctl",
        f"--endpoints={ETCD_ENDPOINT}",
        f"--cacert={ETCD_TLS}/server-ca.crt",
        f"--cert={ETCD_TLS}/client.crt",
        f"--key={ETCD_TLS}/client.key",
        "--dial-timeout=3s",
        f"--command-timeout={command_timeout}",
        *args,
    ]


def ssh_runner(ssh: commands.SshSettings, timeout: int = 15) -> Runner:
    """A ``Runner`` over ssh (the words quoted for the host's shell)."""
    import ipaddress

    def run(ip: str, words: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = commands.ssh_command(
            ssh.user,
            ipaddress.IPv4Address(ip),
            [shlex.quote(w) for w in words],
            identity=ssh.identity,
            known_hosts=ssh.known_hosts,
            connect_timeout=timeout,
        )
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )

    return run


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def parse_members(stdout: str) -> list[dict[str, object]]:
    """``etcdctl member list -w json`` -> its members (``ID`` an int)."""
    try:
        data = json.loads(stdout)
        members = data.get("members") or []
        return [
            {
                "ID": int(m["ID"]),
                "name": str(m.get("name") or ""),
                "peerURLs": [str(u) for u in m.get("peerURLs") or []],
                "clientURLs": [str(u) for u in m.get("clientURLs") or []],
                "isLearner": bool(m.get("isLearner")),
            }
            for m in members
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise K3sClusterError(
            f"etcdctl member list printed no member list: {_last_line(stdout)[:200]!r}"
        ) from None


def parse_health(stdout: str) -> dict[str, bool]:
    """``etcdctl endpoint health --cluster -w json`` -> client URL -> healthy."""
    try:
        data = json.loads(stdout)
        return {str(e["endpoint"]): bool(e.get("health")) for e in data}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def with_health(raw: Sequence[dict[str, object]], health: dict[str, bool]) -> list[Member]:
    """Members with their health: healthy when one of its client URLs answered healthy; a
    member with none (never started, or not answering) counts as unhealthy."""
    out = []
    for m in raw:
        clients = tuple(str(u) for u in m["clientURLs"])  # type: ignore[attr-defined]
        out.append(
            Member(
                id=int(m["ID"]),  # type: ignore[call-overload]
                name=str(m["name"]),
                healthy=bool(m["name"]) and any(health.get(u) for u in clients),
                peer_urls=tuple(str(u) for u in m["peerURLs"]),  # type: ignore[attr-defined]
                client_urls=clients,
                learner=bool(m["isLearner"]),
            )
        )
    return out


@dataclass(frozen=True)
class View:
    """The members as one staying server sees them, and which server that was."""

    via: str  # the host address the etcdctl calls went through
    members: list[Member]


def read_members(run: Runner, via: Sequence[str]) -> View:
    """``member list`` and ``endpoint health --cluster`` through the first of the ``via``
    hosts (servers that stay) whose etcd answers."""
    tried = []
    for ip in via:
        listed = run(ip, etcdctl("member", "list", "-w", "json",
                                 command_timeout=MEMBER_LIST_TIMEOUT))
        if listed.returncode != 0:
            tried.append(f"{ip}: {_last_line(listed.stderr) or f'exit {listed.returncode}'}")
            continue
        raw = parse_members(listed.stdout)
        # exits 1 when an endpoint is unhealthy, and still prints every endpoint's state
        health = run(ip, etcdctl("endpoint", "health", "--cluster", "-w", "json"))
        return View(ip, with_health(raw, parse_health(health.stdout)))
    raise K3sClusterError(
        "no K3s server that stays answered etcdctl member list: " + "; ".join(tried),
        hint="the servers that stay must be up and healthy before members are removed; "
        "look at: ssh root@<host> journalctl -M k3s-server -u k3s",
    )


def describe(members: Sequence[Member]) -> str:
    return ", ".join(
        f"{m.name or '(unstarted)'} {'healthy' if m.healthy else 'UNHEALTHY'}" for m in members
    )


def remove_leaving(
    run: Runner,
    via: Sequence[str],
    node: str,
    leaving: Sequence[str],
    progress: Callable[[str], None],
    stale_only: bool = False,
) -> list[str]:
    """Removes ``node``'s members, and before them any member the quorum rule says must go
    first among the ``leaving`` nodes (the unhealthy ones). Checks the whole sequence of
    ``leaving`` first and refuses (``QuorumError``) before removing anything when a step
    would not keep a quorum. Returns the names removed (none when ``node`` has no member
    any more: an earlier step or run removed it). ``stale_only``: a member of ``node`` that
    answers healthy in any view read here (the last read before each removal) is refused,
    never removed (``remove_stale``: it may have come back since the caller looked)."""
    view = read_members(run, via)
    if stale_only:
        _refuse_running(view, node)
    progress(f"etcd members seen through {view.via}: {describe(view.members)}")
    wanted = [node, *[n for n in leaving if n != node]]
    whole = removal_order(view.members, wanted)  # raises before anything is removed
    if not members_of(view.members, node):
        progress(f"{node}: no etcd member any more (removed earlier); nothing to remove")
        return []
    # this node's members, after the unhealthy members of the other leaving nodes (removing
    # those first only helps the quorum); a healthy one of another node waits for its step
    mine = [m for m in whole if m.node != node and not m.healthy]
    mine += [m for m in whole if m.node == node]
    check_removals(view.members, mine)
    removed: list[str] = []
    for m in mine:
        if removed:  # one at a time: read again, check the rule again
            view = read_members(run, via)
            current = [x for x in view.members if x.id == m.id]
            if not current:
                continue
            if stale_only:
                _refuse_running(view, node)
            check_removals(view.members, current)
        progress(f"removing etcd member {m.name} ({m.hex_id}) of {m.node} through {view.via}")
        proc = _remove(run, view.via, m, progress)
        if proc.returncode != 0:
            raise K3sClusterError(
                f"etcdctl member remove {m.hex_id} ({m.name}) failed through {view.via}: "
                f"{_last_line(proc.stderr) or _last_line(proc.stdout)}",
                hint="run `pulumi up` again once the servers that stay are healthy",
            )
        removed.append(m.name)
    return removed


# etcd refuses a member change with "unhealthy cluster" until the leader has been connected
# to the members for a few seconds (its strict reconfiguration check): wait that out
UNHEALTHY_CLUSTER = "unhealthy cluster"
REMOVE_RETRY_FOR = 60.0
REMOVE_RETRY_EVERY = 2.0


def _remove(
    run: Runner, via: str, m: Member, progress: Callable[[str], None]
) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + REMOVE_RETRY_FOR
    while True:
        proc = run(via, etcdctl("member", "remove", m.hex_id))
        if proc.returncode == 0 or UNHEALTHY_CLUSTER not in proc.stderr:
            return proc
        if time.monotonic() >= deadline:
            return proc
        progress(f"etcd says {UNHEALTHY_CLUSTER} for now; removing {m.name} again shortly")
        time.sleep(REMOVE_RETRY_EVERY)


def stale_members(view: View, node: str) -> list[Member]:
    return members_of(view.members, node)


def remove_stale(
    run: Runner, via: Sequence[str], node: str, progress: Callable[[str], None]
) -> list[str]:
    """Before ``node`` joins with no etcd data: removes the members of that name the cluster
    still lists (K3s refuses the join with "duplicate node name found" otherwise), one at a
    time under the quorum rule. Returns the names removed.

    A member of that name that answers healthy is not stale, whatever the host showed: its
    etcd runs somewhere (another machine with this node's name, a node moved between hosts
    that the stack's records do not show, data where this check did not look); it is
    refused, never removed."""
    view = read_members(run, via)
    stale = stale_members(view, node)
    if not stale:
        progress(f"{node}: no stale etcd member of that name")
        return []
    _refuse_running(view, node)
    return remove_leaving(run, via, node, [node], progress, stale_only=True)


def _refuse_running(view: View, node: str) -> None:
    """``K3sClusterError`` when a member of ``node`` answers healthy in ``view``: a stale
    member is one that does not run."""
    running = [m for m in stale_members(view, node) if m.healthy]
    if running:
        raise K3sClusterError(
            f"{node}: its host holds no etcd data of it, yet etcd member "
            f"{', '.join(m.name for m in running)} of that name answers healthy "
            f"(seen through {view.via}, peer {', '.join(running[0].peer_urls) or '?'}); "
            "not removing a running member",
            hint="find the machine that runs it (its peer address); if it is to leave, "
            "stop it there first, then run `pulumi up` again",
        )


# -- the server host itself ---------------------------------------------------------------

_DB = f"{CONTAINER_ROOT}{K3S_DB}"


def server_state_script() -> str:
    """Shell text for the host: prints ``wal=yes|no``, ``name=<member name>``,
    ``unit=<state>`` of the host's K3s server."""
    return (
        f"if [ -d {_DB}/etcd/member/wal ]; then echo wal=yes; else echo wal=no; fi; "
        f"printf 'name=%s\\n' \"$(cat {_DB}/etcd/name 2>/dev/null)\"; "
        f"printf 'unit=%s\\n' \"$(systemctl is-active {SERVER_UNIT} 2>/dev/null)\""
    )


@dataclass(frozen=True)
class ServerState:
    has_data: bool
    member_name: str
    unit: str


def read_server_state(run: Runner, host_ip: str) -> ServerState:
    """What the host holds of its K3s server (over the runner: proof, never a guess)."""
    proc = run(host_ip, ["sh", "-c", server_state_script()])
    if proc.returncode != 0:
        raise K3sClusterError(
            f"cannot read the K3s server's state on {host_ip}: "
            f"{_last_line(proc.stderr) or f'exit {proc.returncode}'}",
            hint="check that the host is up and accepts your ssh key for root",
        )
    fields = dict(ln.split("=", 1) for ln in proc.stdout.splitlines() if "=" in ln)
    return ServerState(fields.get("wal") == "yes", fields.get("name", ""), fields.get("unit", ""))


def stop_and_set_aside(
    run: Runner, host_ip: str, node: str, stamp: str, progress: Callable[[str], None]
) -> None:
    """Stops the host's K3s server container and moves its K3s database aside
    (``db`` -> ``db.left-<stamp>``; nothing is deleted), so the server can join again later
    with no data. Only when the database there belongs to ``node`` (its etcd name file
    names a member of ``node``: ``membership.node_of_member``), or holds none; etcd data
    without a name file is no proof either way and stays."""
    state = read_server_state(run, host_ip)
    if (state.member_name or state.has_data) and node_of_member(state.member_name) != node:
        raise K3sClusterError(
            f"{host_ip}: its K3s database belongs to etcd member "
            f"{state.member_name or '(no name file)'}, not to {node}; left as it is",
            hint="check plans/k3s.csv: is the server on the right host?",
        )
    stop = run(host_ip, ["systemctl", "stop", SERVER_UNIT])
    if stop.returncode != 0:
        raise K3sClusterError(
            f"{host_ip}: systemctl stop {SERVER_UNIT} failed: {_last_line(stop.stderr)}"
        )
    progress(f"{node}: {SERVER_UNIT} stopped on {host_ip}")
    if not state.has_data and not state.member_name:
        return
    aside = f"{_DB}.left-{stamp}"
    moved = run(host_ip, ["mv", "-T", "--", _DB, aside])
    if moved.returncode != 0:
        raise K3sClusterError(f"{host_ip}: cannot move {_DB} aside: {_last_line(moved.stderr)}")
    progress(f"{node}: its K3s database moved aside to {aside} on {host_ip}")


def prepare_join(
    run: Runner,
    via: Sequence[str],
    node: str,
    host_ip: str,
    stamp: str,
    progress: Callable[[str], None],
) -> str:
    """Before ``node``'s host deploys a server that joins a running cluster: what is on the
    host decides. No etcd data: remove the stale members of ``node`` (``remove_stale``).
    Data of a member the cluster still lists: nothing (it restarts as that member). Data of
    a member the cluster no longer lists (it was removed): stop the container and move the
    data aside, then remove stale members, so it joins anew. Returns what was done."""
    state = read_server_state(run, host_ip)
    view = read_members(run, via)
    listed = {m.name for m in view.members}
    if state.has_data and state.member_name in listed:
        progress(f"{node}: etcd member {state.member_name} has its data on {host_ip}; it stays")
        return "member kept"
    if state.has_data:
        progress(
            f"{node}: {host_ip} holds data of etcd member {state.member_name or '(unnamed)'}, "
            "which the cluster no longer lists"
        )
        stop_and_set_aside(run, host_ip, node, stamp, progress)
    removed = remove_stale(run, via, node, progress)
    return f"removed {', '.join(removed)}" if removed else "nothing stale"


def container_path(path: str) -> Path:
    """A path inside the server container, as the host sees it."""
    return Path(CONTAINER_ROOT + path)
