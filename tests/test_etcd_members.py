"""The project's etcd member commands (k3scluster/etcdmembers.py) against a REAL etcd cluster.

Three real etcd members with TLS in network namespaces of their own, laid out as K3s lays
out its embedded etcd (tests/etcdcluster.py). Each namespace stands for a K3s server's
host. What ``pulumi up`` runs on a host over ssh is run here by ``HostRunner`` inside that
member's namespace, with the member's K3s directory bind-mounted where K3s keeps it (both
as the container sees it, ``/var/lib/rancher/k3s``, and as the host sees it,
``/var/lib/nixos-containers/k3s-server/var/lib/rancher/k3s``) in a private mount namespace
(a tmpfs over ``/var/lib`` there, so nothing outside is touched). The words are the
project's own: ``nixos-container run k3s-server -- etcdctl …`` with K3s's certificate paths
(the real ``etcdctl``), ``sh -c`` of the state script, ``mv``. Stand-ins, for what is the
host's and not etcd's: ``nixos-container run`` (execs the command, as the real one does
inside the container) and ``systemctl`` (``is-active`` says whether the member runs;
``stop container@k3s-server.service`` stops the member).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from k3scluster import etcdmembers
from k3scluster.membership import QuorumError

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".tools" / "bin"
K3S_DIR = "/var/lib/rancher/k3s"

NIXOS_CONTAINER = """#!/bin/sh
# stand-in for `nixos-container run <name> -- CMD…` (nixos-container.pl: su -l -c "exec CMD")
[ "$1" = run ] && [ "$2" = k3s-server ] && [ "$3" = -- ] || { echo "usage: $*" >&2; exit 2; }
shift 3
exec "$@"
"""
SYSTEMCTL = """#!/bin/sh
# stand-in for `systemctl is-active container@k3s-server.service` (the test says the state)
[ "$1" = is-active ] && [ "$2" = container@k3s-server.service ] || exit 3
echo "$K3SCLUSTER_TEST_UNIT"
"""


class HostRunner:
    """``etcdmembers.Runner`` for the test's etcd members: the words a host would run over
    ssh, run in the member's namespace (see the module docstring). Records every call."""

    def __init__(self, cluster: Any, base: Path) -> None:
        self.c = cluster
        self.calls: list[tuple[str, list[str]]] = []
        self.standins = base / "standins"
        self.standins.mkdir()
        for name, text in (("nixos-container", NIXOS_CONTAINER), ("systemctl", SYSTEMCTL)):
            (self.standins / name).write_text(text)
            (self.standins / name).chmod(0o755)

    def host_of(self, ip: str) -> Any:
        return next(m for m in self.c.hosts.values() if m.ip == ip)

    def __call__(self, ip: str, words: Sequence[str]) -> subprocess.CompletedProcess[str]:
        words = list(words)
        m = self.host_of(ip)
        self.calls.append((m.host, words))
        if words == ["systemctl", "stop", etcdmembers.SERVER_UNIT]:
            self.c.stop(m.host)
            return subprocess.CompletedProcess(words, 0, "", "")
        q = shlex.quote
        on_host = etcdmembers.CONTAINER_ROOT + K3S_DIR
        prep = (
            "mount -t tmpfs none /var/lib && "
            f"mkdir -p {K3S_DIR} {on_host} && "
            f"mount --bind {q(str(m.root))} {K3S_DIR} && "
            f"mount --bind {q(str(m.root))} {on_host} && "
            f"export PATH={q(str(self.standins))}:{q(str(BIN))}:$PATH && "
            'exec "$@"'
        )
        running = m.proc is not None and m.proc.poll() is None
        return subprocess.run(
            m.ns.argv("unshare", "--mount", "--propagation", "private",
                      "sh", "-c", prep, "sh", *words),
            capture_output=True, text=True, check=False, timeout=60,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                 "K3SCLUSTER_TEST_UNIT": "active" if running else "inactive"},
        )

    def etcdctl_verbs(self) -> list[str]:
        """``member list``, ``endpoint health``, ``member remove <id>`` … in call order (a
        remove that etcd answered "unhealthy cluster" and that was tried again counts once)."""
        out: list[str] = []
        for _host, w in self.calls:
            if w[:5] == ["nixos-container", "run", "k3s-server", "--", "etcdctl"]:
                args = [a for a in w[5:] if not a.startswith("--")]
                verb = " ".join(args[:3] if args[:2] == ["member", "remove"] else args[:2])
                if not (out and verb.startswith("member remove") and out[-1] == verb):
                    out.append(verb)
        return out


@pytest.fixture(autouse=True)
def _short_member_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's etcd elects a leader within its default 1 s (K3s's takes up to 5 s, hence
    the 15 s of etcdmembers): a `member list` of a down server is given up after 4 s here
    (etcdctl waits its whole --command-timeout for a down etcd), the rest as in production."""
    monkeypatch.setattr(etcdmembers, "MEMBER_LIST_TIMEOUT", "4s")


@pytest.fixture
def hosts(etcd_cluster: Any, tmp_path: Path) -> HostRunner:
    # K3s writes the member's name beside its data (pkg/etcd: db/etcd/name)
    for m in etcd_cluster.hosts.values():
        (m.data / "name").write_text(m.name)
    return HostRunner(etcd_cluster, tmp_path)


def ip(c: Any, host: str) -> str:
    return str(c.hosts[host].ip)


def names(c: Any, via: str = "olaf") -> list[str]:
    return sorted(m["name"] for m in c.members(via))


def test_etcdctl_words_use_k3s_certificates() -> None:
    words = etcdmembers.etcdctl("member", "list", "-w", "json")
    assert words[:5] == ["nixos-container", "run", "k3s-server", "--", "etcdctl"]
    tls = "/var/lib/rancher/k3s/server/tls/etcd"
    for flag in (f"--cacert={tls}/server-ca.crt", f"--cert={tls}/client.crt",
                 f"--key={tls}/client.key", "--endpoints=https://127.0.0.1:2379"):
        assert flag in words
    assert words[-4:] == ["member", "list", "-w", "json"]


def test_members_and_health_read_through_a_staying_server(etcd_cluster: Any,
                                                          hosts: HostRunner) -> None:
    c = etcd_cluster
    view = etcdmembers.read_members(hosts, [ip(c, "olaf")])
    assert sorted(m.name for m in view.members) == names(c)
    assert all(m.healthy for m in view.members)
    assert {m.node for m in view.members} == {"olaf", "sven", "erik"}
    c.stop("erik")
    # the first server asked is down: the next one answers
    view = etcdmembers.read_members(hosts, [ip(c, "erik"), ip(c, "olaf")])
    assert view.via == ip(c, "olaf")
    assert {m.node: m.healthy for m in view.members} == {"olaf": True, "sven": True,
                                                          "erik": False}


def test_two_servers_leave_one_at_a_time(etcd_cluster: Any, hosts: HostRunner) -> None:
    c = etcd_cluster
    ids = {m["name"]: m["ID"] for m in c.members()}
    seen: list[str] = []
    leaving = ["erik", "sven"]
    removed = etcdmembers.remove_leaving(hosts, [ip(c, "olaf")], "erik", leaving, seen.append)
    assert removed == [c.hosts["erik"].name]
    assert names(c) == sorted([c.hosts["olaf"].name, c.hosts["sven"].name])
    # the leave step then stops the server and sets its database aside
    etcdmembers.stop_and_set_aside(hosts, ip(c, "erik"), "erik", "20261206T070000Z", seen.append)
    assert not (c.hosts["erik"].root / "server" / "db").exists()
    assert (c.hosts["erik"].root / "server" / "db.left-20261206T070000Z" / "etcd" / "member").is_dir()
    removed = etcdmembers.remove_leaving(hosts, [ip(c, "olaf")], "sven", leaving, seen.append)
    assert removed == [c.hosts["sven"].name]
    assert names(c) == [c.hosts["olaf"].name]
    assert c.healthy("olaf")
    # each removal after its own list and health check: never two at once
    assert hosts.etcdctl_verbs() == [
        "member list", "endpoint health",
        f"member remove {ids[c.hosts['erik'].name]}",
        "member list", "endpoint health",
        f"member remove {ids[c.hosts['sven'].name]}",
    ]
    # a step that runs again finds nothing left to do
    assert etcdmembers.remove_leaving(hosts, [ip(c, "olaf")], "sven", leaving, seen.append) == []
    assert any("no etcd member any more" in s for s in seen)


def test_a_removal_that_would_lose_the_quorum_is_refused_before_anything(
    etcd_cluster: Any, hosts: HostRunner
) -> None:
    c = etcd_cluster
    before = names(c)
    c.stop("erik")  # stopped, still listed: counts against the quorum
    with pytest.raises(QuorumError) as err:
        etcdmembers.remove_leaving(hosts, [ip(c, "olaf")], "sven", ["sven"], lambda _: None)
    assert c.hosts["erik"].name in err.value.message
    assert list(err.value.unhealthy) == [c.hosts["erik"].name]
    assert names(c) == before  # nothing removed
    assert "member remove" not in " ".join(hosts.etcdctl_verbs())
    # two leaving, one of them dead: the dead one goes first, then the other, from one step
    removed = etcdmembers.remove_leaving(hosts, [ip(c, "olaf")], "sven", ["sven", "erik"],
                                         lambda _: None)
    assert removed == [c.hosts["erik"].name, c.hosts["sven"].name]
    assert names(c) == [c.hosts["olaf"].name]


def test_stale_member_removed_before_a_server_rejoins_with_no_data(
    etcd_cluster: Any, hosts: HostRunner
) -> None:
    c = etcd_cluster
    old = c.hosts["erik"].name
    c.wipe("erik")  # reinstalled: no data, but its member is still listed
    seen: list[str] = []
    did = etcdmembers.prepare_join(hosts, [ip(c, "olaf")], "erik", ip(c, "erik"),
                                   "20261206T070000Z", seen.append)
    assert did == f"removed {old}"
    assert old not in names(c)
    # now a member of the same node name joins again (what K3s does on an empty data dir)
    c.join("erik", via="olaf")
    assert c.hosts["erik"].name != old
    assert [n for n in names(c) if n.startswith("erik-")] == [c.hosts["erik"].name]
    assert c.healthy("erik")
    # a server with its data and its member listed is left alone
    (c.hosts["erik"].data / "name").write_text(c.hosts["erik"].name)
    before = names(c)
    assert etcdmembers.prepare_join(hosts, [ip(c, "olaf")], "erik", ip(c, "erik"), "x",
                                    seen.append) == "member kept"
    assert names(c) == before


def test_data_of_a_removed_member_is_set_aside_before_it_joins(
    etcd_cluster: Any, hosts: HostRunner
) -> None:
    c = etcd_cluster
    etcdmembers.remove_leaving(hosts, [ip(c, "olaf")], "erik", ["erik"], lambda _: None)
    c.stop("erik")  # removed from the cluster, its data still on its host
    did = etcdmembers.prepare_join(hosts, [ip(c, "olaf")], "erik", ip(c, "erik"), "stamp",
                                   lambda _: None)
    assert did == "nothing stale"
    assert (c.hosts["erik"].root / "server" / "db.left-stamp" / "etcd" / "name").is_file()
    assert not (c.hosts["erik"].root / "server" / "db").exists()


def test_set_aside_refuses_a_database_of_another_member(
    etcd_cluster: Any, hosts: HostRunner
) -> None:
    from k3scluster.errors import K3sClusterError

    c = etcd_cluster
    with pytest.raises(K3sClusterError) as err:
        etcdmembers.stop_and_set_aside(hosts, ip(c, "erik"), "sven", "x", lambda _: None)
    assert "belongs to etcd member " + c.hosts["erik"].name in err.value.message
    assert c.healthy("erik")
    assert (c.hosts["erik"].root / "server" / "db").is_dir()


def test_parse_members_keeps_64_bit_ids() -> None:
    out = json.dumps({"members": [{"ID": 17045747262218232381, "name": "a-1",
                                   "peerURLs": ["https://10.0.0.1:2380"],
                                   "clientURLs": ["https://10.0.0.1:2379"]}]})
    (m,) = etcdmembers.with_health(etcdmembers.parse_members(out),
                                   {"https://10.0.0.1:2379": True})
    assert m.hex_id == "ec8ea8d29f9ae23d" and m.healthy


@pytest.mark.parametrize("name_file", ["erik-2-0a1b2c3d", None])
def test_set_aside_refuses_a_database_it_cannot_prove_is_the_nodes(
    etcd_cluster: Any, hosts: HostRunner, name_file: str | None
) -> None:
    # the host holds the database of node erik-2 (its name starts with "erik-"), or etcd
    # data without K3s's name file: neither is node erik's, and neither is moved
    from k3scluster.errors import K3sClusterError

    c = etcd_cluster
    name = c.hosts["erik"].data / "name"
    if name_file is None:
        name.unlink()
    else:
        name.write_text(name_file)
    with pytest.raises(K3sClusterError, match="not to erik; left as it is"):
        etcdmembers.stop_and_set_aside(hosts, ip(c, "erik"), "erik", "x", lambda _: None)
    assert c.healthy("erik")
    assert (c.hosts["erik"].root / "server" / "db").is_dir()


def test_a_healthy_member_is_never_removed_as_stale(etcd_cluster: Any, hosts: HostRunner) -> None:
    # the host looked at shows no etcd data of erik (the wrong machine answered, or erik
    # moved between hosts without the stack's records showing it), but erik's member runs
    from k3scluster.errors import K3sClusterError

    c = etcd_cluster
    before = names(c)
    with pytest.raises(K3sClusterError, match="answers healthy"):
        etcdmembers.remove_stale(hosts, [ip(c, "olaf")], "erik", lambda _: None)
    assert names(c) == before and c.healthy("erik")


def test_a_stale_member_that_comes_back_before_its_removal_is_kept(
    etcd_cluster: Any, hosts: HostRunner
) -> None:
    # erik's member is down when remove_stale looks (stale), and its etcd runs again before
    # the removal reads the members once more (another machine of that name came back): the
    # removal's own read sees it healthy, and it is refused, never removed
    from k3scluster.errors import K3sClusterError

    c = etcd_cluster
    c.stop("erik")
    before = names(c)
    health_reads = []

    def comes_back(ip: str, words: Sequence[str]) -> subprocess.CompletedProcess[str]:
        proc = hosts(ip, words)
        if "health" in words:
            health_reads.append(ip)
            if len(health_reads) == 1:  # remove_stale's look: erik is down; now it runs
                c.start("erik")
                c.wait_healthy("erik")
        return proc

    with pytest.raises(K3sClusterError, match="answers healthy"):
        etcdmembers.remove_stale(comes_back, [ip(c, "olaf")], "erik", lambda _: None)
    assert len(health_reads) == 2
    assert names(c) == before and c.healthy("erik")


def _before_deploy(c: Any, hosts: HostRunner, monkeypatch: pytest.MonkeyPatch, render: Path,
                   host: str, planned_peers: bool = True) -> list[str]:
    """The deploy task's look before colmena (tasks._before_deploy) for ``host``'s server,
    its ssh being the test's ``HostRunner``; the progress lines it said."""
    import argparse
    import time

    from k3scluster import commands
    from k3scluster.components import tasks

    monkeypatch.setattr(etcdmembers, "ssh_runner", lambda *_a, **_k: hosts)
    said: list[str] = []
    monkeypatch.setattr(tasks, "_progress", said.append)
    others = [ip(c, h) for h in c.hosts if h != host] if planned_peers else []
    args = argparse.Namespace(host=host, ip=ip(c, host), via=None, join_via=others,
                              render_out=str(render), check_agent_state=False)
    tasks._before_deploy(args, commands.SshSettings(), [[host, ip(c, host)]], [],
                         time.monotonic() + 60)
    return said


def _recorded(c: Any, *names_: str) -> Any:
    """What the stack deployed: a server of each host's name on it, at its address."""
    import ipaddress

    from k3scluster.membership import Deployed, DeployedHost, DeployedNode
    from k3scluster.model import K3sType

    return Deployed(tuple(
        DeployedHost(h, ipaddress.IPv4Address(ip(c, h)),
                     (DeployedNode(h, K3sType.SERVER, ipaddress.IPv4Address(ip(c, h))),))
        for h in names_
    ))


def test_a_reinstalled_server_whose_deployed_peers_are_all_down_is_refused(
    etcd_cluster: Any, hosts: HostRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # olaf (the init-server) reinstalled on an empty disk while sven and erik are down: its
    # start would find nobody and init a second cluster. The stack deployed all three.
    from k3scluster import deployedservers
    from k3scluster.errors import K3sClusterError

    c = etcd_cluster
    c.wipe("olaf")
    c.stop("sven")
    c.stop("erik")
    render = tmp_path / "render"
    deployedservers.write(deployedservers.file_for(render),
                          _recorded(c, "olaf", "sven", "erik"))
    with pytest.raises(K3sClusterError) as refused:
        _before_deploy(c, hosts, monkeypatch, render, "olaf")
    msg = refused.value.message
    assert msg.startswith("olaf: its server olaf has no etcd data")
    assert "sven on sven (10.0.100.11)" in msg and "erik on erik (10.0.100.12)" in msg
    assert "asked at 10.0.100.11, 10.0.100.12" in msg and "nothing was deployed" in msg
    assert "bring those servers back up" in (refused.value.hint or "")
    assert "The etcd snapshot" in (refused.value.hint or "")
    # it asked both (no etcd answered there), and removed nothing
    assert {h for h, _w in hosts.calls} == {"olaf", "sven", "erik"}
    assert not [v for v in hosts.etcdctl_verbs() if v.startswith("member remove")]
    # the same when sven's and erik's rows leave the plans in this run (no --join-via): the
    # servers the stack deployed are asked, and with none answering it is refused too
    with pytest.raises(K3sClusterError, match="has no etcd data"):
        _before_deploy(c, hosts, monkeypatch, render, "olaf", planned_peers=False)


def test_the_first_up_of_a_new_cluster_still_inits(
    etcd_cluster: Any, hosts: HostRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the first `up`: the stack deployed no server, the init-server has no data and finds
    # nobody (the others are not deployed yet): it goes on to init
    from k3scluster import deployedservers
    from k3scluster.membership import Deployed

    c = etcd_cluster
    for h in ("olaf", "sven", "erik"):
        c.wipe(h)
    render = tmp_path / "render"
    deployedservers.write(deployedservers.file_for(render), Deployed())
    said = _before_deploy(c, hosts, monkeypatch, render, "olaf")
    assert said[-1] == ("olaf: no other server answers and the stack deployed no other server "
                        "(a new cluster); no stale member to look for")

    # the stack deployed only olaf itself so far (its first deploy failed after colmena, say):
    # still no other server, still a new cluster
    deployedservers.write(deployedservers.file_for(render), _recorded(c, "olaf"))
    assert "(a new cluster)" in _before_deploy(c, hosts, monkeypatch, render, "olaf")[-1]
