"""Servers leaving a running cluster through the real engine, against a REAL etcd cluster.

The hosts are test_health's lab: the example cluster's five hosts, each a real ``sshd`` at
its plan address in the engine's loopback-only namespace (its ``/run`` and ``/var/lib`` its
own), the K3s API stand-in for the gates (tests/k3sapi.py), colmena's stand-in. The three K3s
servers' etcd is real (tests/etcdcluster.py): three TLS members named as K3s names them,
at the servers' plan addresses, each in a network namespace of its own. On a server host,
what K3s keeps under ``/var/lib/nixos-containers/k3s-server/var/lib/rancher/k3s`` is that
member's directory (a link), so the project's state script and ``mv`` act on the real
etcd data. Stand-ins on the hosts' PATH (``~/.ssh/environment``), for what belongs to NixOS
and not to etcd, each logging its calls:

- ``nixos-container run k3s-server -- CMD``: CMD (the project's real ``etcdctl`` words) in
  that host's member's network namespace, with the member's K3s directory mounted at
  ``/var/lib/rancher/k3s`` (a private mount namespace): what the real one does inside the
  container;
- ``systemctl is-active|stop container@k3s-server.service``: whether the member answers on
  127.0.0.1:2379; ``stop`` waits until it does not (a removed member stops by itself);
  ``systemctl stop podman-k3s-agent.service`` succeeds (after the lab's ``on-agent-stop``
  hook, when a test wrote one).

Each test: a first ``up`` (the deploys record what they deployed), a change of the plans,
``pulumi preview`` (the named step per node and the words), ``pulumi up`` (the order of
operations from the logs, the members from the real etcd), and the preview after.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_health import HOSTS, ROOT, SERVERS, STACK, Lab, Project, _text

from k3scluster.records import DEPLOYED_PREFIX

pytestmark = [pytest.mark.integration, pytest.mark.root]

MEMBERS = {name: ip for name, ip in SERVERS.values()}  # K3s node name -> server address
HOST_OF = {name: host for host, (name, _ip) in SERVERS.items()}
BIN = ROOT / ".tools" / "bin"

NIXOS_CONTAINER = """#!/bin/sh
# stand-in for `nixos-container run k3s-server -- CMD...` on a test host (see the test's docstring)
[ "$1" = run ] && [ "$2" = k3s-server ] && [ "$3" = -- ] || { echo "usage: $*" >&2; exit 2; }
shift 3
d=$K3SCLUSTER_TEST_LAB/$K3SCLUSTER_TEST_HOST
echo "$(date +%s.%N) $K3SCLUSTER_TEST_HOST $*" >> "$K3SCLUSTER_TEST_LAB/container.log"
exec nsenter --net="$d/member-netns" -- unshare --mount --propagation private sh -c \
  'mkdir -p /var/lib/rancher/k3s && mount --bind "$0" /var/lib/rancher/k3s && exec "$@"' \
  "$(readlink -f "$d/member-root")" "$@"
"""

SYSTEMCTL = """#!/bin/bash
# stand-in for systemctl on a test host: container@k3s-server is the host's etcd member
d=$K3SCLUSTER_TEST_LAB/$K3SCLUSTER_TEST_HOST
echo "$(date +%s.%N) $K3SCLUSTER_TEST_HOST systemctl $*" >> "$K3SCLUSTER_TEST_LAB/container.log"
up() { nsenter --net="$d/member-netns" -- timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/2379' 2>/dev/null; }
case "$1 $2" in
  "is-active container@k3s-server.service") if up; then echo active; else echo inactive; fi ;;
  "stop container@k3s-server.service")
    for _ in $(seq 100); do up || exit 0; sleep 0.2; done
    echo "stand-in: the member still answers" >&2; exit 1 ;;
  "stop podman-k3s-agent.service")  # a test's hook sees the cluster at that moment
    if [ -x "$K3SCLUSTER_TEST_LAB/on-agent-stop" ]; then "$K3SCLUSTER_TEST_LAB/on-agent-stop" "$K3SCLUSTER_TEST_HOST"; fi
    exit 0 ;;
  "--no-block reboot") echo "$(date +%s.%N) $K3SCLUSTER_TEST_HOST reboot via ${SSH_CONNECTION}" \
      >> "$K3SCLUSTER_TEST_LAB/container.log" ;;
  *) echo "stand-in systemctl: $*" >&2; exit 3 ;;
esac
"""


def host_standins(lab: Lab, base: Path, extra_setup: str = "") -> None:
    """The stand-ins on every host's PATH, each host's name in a UTS namespace of its own
    (what ``/proc/sys/kernel/hostname`` says: NixOS sets it from the plan), a K3s token."""
    standins = base / "standins"
    standins.mkdir()
    for name, text in (("nixos-container", NIXOS_CONTAINER), ("systemctl", SYSTEMCTL)):
        (standins / name).write_text(text)
        (standins / name).chmod(0o755)
    ssh = lab.home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "environment").write_text(
        f"PATH={standins}:{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    for host, h in lab.hosts.items():
        with (h / "sshd_config").open("a") as f:
            f.write("PermitUserEnvironment yes\n"
                    f"SetEnv K3SCLUSTER_TEST_LAB={lab.dir} K3SCLUSTER_TEST_HOST={host}\n")
        secrets = h / "var-lib" / "k3scluster" / "secrets"
        secrets.mkdir(parents=True)
        (secrets / "k3s-token").write_text("stand-in token\n")
    setup = lab.setup

    def named_setup(down: tuple[str, ...] = ()) -> str:
        text = setup(down)
        for host, h in lab.hosts.items():
            text = text.replace(
                f"unshare --mount --propagation private sh -c 'mount --bind {h / 'run'} ",
                f"unshare --mount --uts --propagation private sh -c 'hostname {host} && "
                f"mount --bind {h / 'run'} ",
            )
        return extra_setup + text

    lab.setup = named_setup  # type: ignore[method-assign]


class MemberLab:
    """test_health's lab with the real etcd members behind the server hosts."""

    def __init__(self, lab: Lab, etcd: Any, base: Path) -> None:
        self.lab, self.etcd = lab, etcd
        self.mounts: list[Path] = []
        host_standins(lab, base)
        for node, host in HOST_OF.items():
            m = etcd.hosts[node]
            h = lab.hosts[host]
            # the K3s directory as the host sees it inside the container's root
            k3s = h / "var-lib" / "nixos-containers" / "k3s-server" / "var" / "lib" / "rancher"
            shutil.rmtree(k3s, ignore_errors=True)  # the lab's stand-in etcd data: the member's
            k3s.mkdir(parents=True)
            (k3s / "k3s").symlink_to(m.root)
            (h / "member-root").symlink_to(m.root)
            # the member's network namespace, where the host's sshd (its own /run) sees it
            target = h / "member-netns"
            target.touch()
            subprocess.run(["mount", "--bind", str(m.ns.path), str(target)], check=True)
            self.mounts.append(target)
            # K3s keeps the member's name beside its data
            (m.data / "name").write_text(m.name)

    def close(self) -> None:
        for t in self.mounts:
            subprocess.run(["umount", str(t)], check=False)

    def calls(self) -> list[tuple[float, str, str]]:
        log = self.lab.dir / "container.log"
        out = []
        for line in log.read_text().splitlines() if log.exists() else []:
            t, host, rest = line.split(" ", 2)
            out.append((float(t), host, rest))
        return out

    def removals(self) -> list[tuple[float, str, str]]:
        """(time, host asked, member id) of each `etcdctl member remove` that succeeded…
        or was tried (etcd's answer is in the step's output)."""
        return [(t, h, rest.split()[-1]) for t, h, rest in self.calls()
                if " member remove " in rest]

    def member_names(self) -> list[str]:
        return sorted(m["name"] for m in self.etcd.members(via="olaf-k3s-server"))


@pytest.fixture
def members(tmp_path: Path) -> Any:
    from etcdcluster import EtcdCluster

    lab = Lab(tmp_path)
    etcd = EtcdCluster.launch(tmp_path / "etcd", MEMBERS)
    ml = MemberLab(lab, etcd, tmp_path)
    try:
        yield ml
    finally:
        ml.close()
        etcd.shutdown()


def _drop_rows(p: Project, *nodes: str, hosts: tuple[str, ...] = ()) -> None:
    k3s = p.cluster / "plans" / "k3s.csv"
    k3s.write_text("".join(ln + "\n" for ln in k3s.read_text().splitlines()
                           if ln.split(",")[1:2] not in ([n] for n in nodes)
                           and ln.split(",")[0] not in hosts))
    if hosts:
        hcsv = p.cluster / "plans" / "hosts.csv"
        hcsv.write_text("".join(ln + "\n" for ln in hcsv.read_text().splitlines()
                                if ln.split(",")[0] not in hosts))


def _first_up(p: Project) -> None:
    r = p.up()
    assert r.returncode == 0, _text(r)[-6000:] + p.lab.sshd_logs()[-2000:]
    assert p.preview() == {}  # the records read back: nothing to do


def _preview_text(p: Project) -> str:
    r = p.pulumi("preview", "--diff")
    assert r.returncode == 0, _text(r)[-4000:]
    return _text(r)


def _colmena_starts_after(p: Project, t0: float) -> list[float]:
    return [c["start"] for c in p.colmena_calls() if c["start"] > t0]


def test_a_server_row_leaves_etcd_before_anything_deploys(members: MemberLab,
                                                         tmp_path: Path) -> None:
    p = Project(tmp_path, members.lab)
    _first_up(p)
    olaf, ulf, rolf = (members.etcd.hosts[n].name for n in MEMBERS)
    assert members.member_names() == sorted([olaf, ulf, rolf])

    _drop_rows(p, "rolf-k3s-server")
    ops = p.preview()
    assert ops["rolf-k3s-server-leaves-etcd"] == "create"
    assert "rolf-deploy" in ops  # its container goes with the next deploy of rolf
    text = _preview_text(p)
    assert ("rolf-k3s-server (server on rolf) leaves etcd: its row left plans/k3s.csv; its "
            "member is removed from a healthy remaining server, then it is stopped") in text

    t0 = time.time()
    r = p.up()
    assert r.returncode == 0, _text(r)[-6000:]
    assert members.member_names() == sorted([olaf, ulf])
    (removal,) = members.removals()
    assert removal[1] == "olaf"  # asked through the init-server's host, which stays
    # the member was removed before any host of this run deployed
    assert all(start > removal[0] for start in _colmena_starts_after(p, t0))
    # ... after its list and health check, then the server was stopped, its data set aside
    verbs = [rest for _t, _h, rest in members.calls()]
    i = next(k for k, v in enumerate(verbs) if " member remove " in v)
    assert "member list" in verbs[i - 2] and "endpoint health" in verbs[i - 1]
    assert any(v == "systemctl stop container@k3s-server.service" for v in verbs[i:])
    aside = list((members.etcd.hosts["rolf-k3s-server"].root / "server").glob("db.left-*"))
    assert len(aside) == 1 and (aside[0] / "etcd" / "member" / "wal").is_dir()
    # the next run forgets the step (nothing runs again)
    assert p.preview() == {"rolf-k3s-server-leaves-etcd": "delete"}


def test_two_server_rows_leave_one_at_a_time(members: MemberLab, tmp_path: Path) -> None:
    p = Project(tmp_path, members.lab)
    _first_up(p)
    olaf = members.etcd.hosts["olaf-k3s-server"].name
    ids = {m["name"]: m["ID"] for m in members.etcd.members(via="olaf-k3s-server")}
    _drop_rows(p, "ulf-k3s-server", "rolf-k3s-server")
    ops = p.preview()
    assert ops["rolf-k3s-server-leaves-etcd"] == ops["ulf-k3s-server-leaves-etcd"] == "create"
    t0 = time.time()
    r = p.up()
    assert r.returncode == 0, _text(r)[-6000:]
    assert members.member_names() == [olaf]  # 3 -> 2 -> 1
    removed = [mid for _t, _h, mid in members.removals()]
    want = [ids[members.etcd.hosts[n].name] for n in ("rolf-k3s-server", "ulf-k3s-server")]
    assert list(dict.fromkeys(removed)) == want  # one after the other (retries count once)
    assert all(start > members.removals()[-1][0] for start in _colmena_starts_after(p, t0))


def test_a_server_host_leaves_the_plans(members: MemberLab, tmp_path: Path) -> None:
    p = Project(tmp_path, members.lab)
    _first_up(p)
    _drop_rows(p, hosts=("rolf",))
    ops = p.preview()
    assert ops["rolf-k3s-server-leaves-etcd"] == "create"
    assert ops["rolf-leaves-plans"] == "create"
    assert ops["rolf-deploy"] == "delete"
    r = p.up()
    assert r.returncode == 0, _text(r)[-6000:]
    assert members.etcd.hosts["rolf-k3s-server"].name not in members.member_names()
    secrets = members.lab.hosts["rolf"] / "var-lib" / "k3scluster" / "secrets"
    assert not (secrets / "k3s-token").exists()
    assert len(list(secrets.glob("k3s-token.left-*"))) == 1
    assert ("rolf (10.0.100.4) left the plans: its K3s nodes (rolf-k3s-server) left the cluster "
            "first, its K3s token is set aside so they stay stopped; the machine was NOT wiped "
            "and keeps running its last configuration") in _text(r)


def test_removing_every_server_is_refused_at_preview(members: MemberLab, tmp_path: Path) -> None:
    p = Project(tmp_path, members.lab)
    _first_up(p)
    k3s = p.cluster / "plans" / "k3s.csv"
    k3s.write_text("host,name,type,ip\nkarl,karl-k3s-server,init-server,10.0.100.20\n"
                   "karl,karl-k3s-agent,agent,10.0.100.15\n")
    r = p.pulumi("preview")
    assert r.returncode != 0
    assert ("removes every K3s server of the running cluster (olaf-k3s-server, "
            "rolf-k3s-server, ulf-k3s-server)") in _text(r)
    assert len(members.member_names()) == 3


def test_a_removal_that_would_lose_the_quorum_fails_before_anything(
    members: MemberLab, tmp_path: Path
) -> None:
    p = Project(tmp_path, members.lab)
    _first_up(p)
    members.etcd.stop("ulf-k3s-server")  # a remaining member is down
    _drop_rows(p, "rolf-k3s-server")
    before = len(p.colmena_calls())
    r = p.up()
    assert r.returncode != 0
    ulf = members.etcd.hosts["ulf-k3s-server"].name
    assert f"unhealthy: {ulf}" in _text(r)
    assert members.removals() == []
    assert len(members.etcd.members(via="olaf-k3s-server")) == 3
    assert len(p.colmena_calls()) == before  # no host deployed


def test_a_re_addressed_host_is_deployed_through_its_old_address(
    tmp_path: Path,
) -> None:
    lab = Lab(tmp_path)
    new = "10.0.100.25"
    with (lab.hosts["karl"] / "sshd_config").open("a") as f:
        f.write(f"ListenAddress {new}\n")  # where it answers once it rebooted
    host_standins(lab, tmp_path, extra_setup=f"ip addr add {new}/32 dev lo\n")
    p = Project(tmp_path, lab)
    _first_up(p)
    hcsv = p.cluster / "plans" / "hosts.csv"
    hcsv.write_text(hcsv.read_text().replace("karl,eni1,10.0.100.5,", f"karl,eni1,{new},"))
    text = _preview_text(p)
    assert (f"karl moves from 10.0.100.5 to {new}: deployed through 10.0.100.5, then checked "
            f"at {new}") in text
    n = len(p.colmena_calls())
    # its reboot restarts the agent, so its node is drained first (test_drain_deploy.py, with
    # the real API); this API stand-in cannot cordon: the node is not registered at that
    # moment (nothing to drain), and Ready for the gates after
    lab.set_api(readyz={ip: ["200"] for _, ip in SERVERS.values()},
                nodes={"olaf-k3s-agent": ["True"], "ulf-k3s-agent": ["True"],
                       "karl-k3s-agent": ["absent", "True"]})
    r = p.up()
    assert r.returncode == 0, _text(r)[-6000:]
    assert "karl: node karl-k3s-agent is not registered yet: nothing to drain" in _text(r)
    (call,) = p.colmena_calls()[n:]
    assert call["hosts"] == ["karl"]
    assert call["targets"] == {"karl": "10.0.100.5"}  # colmena went to the old address
    assert call["goal"] == "boot"  # no switch under its own ssh connection
    log = (lab.dir / "container.log").read_text()
    assert "karl reboot via " in log and log.split("karl reboot via ")[1].split()[2] == "10.0.100.5"
    assert f"karl: rebooting into its new address {new}" in _text(r)
    assert p.outputs()["hosts"]["karl"]["ip"] == new
    # the record follows: the next run deploys karl once more, now at the plan's address
    # (its argv no longer names the old one), then nothing
    assert p.preview() == {"karl-deploy": "update"}
    r = p.up()
    assert r.returncode == 0, _text(r)[-6000:]
    last = p.colmena_calls()[-1]
    assert last["targets"] == {"karl": new} and last["goal"] == "switch"
    assert p.preview() == {}


def test_another_machine_at_a_leaving_hosts_address_is_left_alone(
    members: MemberLab, tmp_path: Path
) -> None:
    # rolf leaves the plans, but the machine now at its last address says it is ulrich: its
    # K3s token is not moved aside, nothing is stopped there, and the up says why
    p = Project(tmp_path, members.lab)
    _first_up(p)
    _drop_rows(p, hosts=("rolf",))
    named = members.lab.setup
    members.lab.setup = (  # type: ignore[method-assign]
        lambda down=(): named(down).replace("hostname rolf ", "hostname ulrich "))
    r = p.up()
    assert r.returncode != 0
    assert "answers as ulrich, not as rolf: nothing is changed on it" in _text(r)
    secrets = members.lab.hosts["rolf"] / "var-lib" / "k3scluster" / "secrets"
    assert (secrets / "k3s-token").exists()
    assert not [c for c in members.calls() if c[1] == "rolf" and "stop" in c[2]]
    assert members.etcd.hosts["rolf-k3s-server"].name in members.member_names()


def test_a_deploy_address_left_in_the_environment_is_not_used(tmp_path: Path) -> None:
    # K3SCLUSTER_VIA_<host> is the hive's way to deploy a moving host through its old address;
    # one in the environment of `pulumi up` (a shell, a script) must not send karl elsewhere
    lab = Lab(tmp_path)
    host_standins(lab, tmp_path)
    p = Project(tmp_path, lab)
    r = p.up(env={"K3SCLUSTER_VIA_karl": "10.0.100.99"})
    assert r.returncode == 0, _text(r)[-6000:]
    karl = [c for c in p.colmena_calls() if "karl" in c.get("targets", {})]
    assert karl and all(c["targets"]["karl"] == "10.0.100.5" for c in karl)


def test_a_reinstalled_server_host_has_its_stale_member_removed_before_its_deploy(
    members: MemberLab, tmp_path: Path
) -> None:
    # rolf comes back from its stick on a new disk: no etcd data, while the cluster still
    # lists its member (down). Its deploy removes that member through a server that stays
    # before colmena runs, so that K3s's join is not refused ("duplicate node name found").
    p = Project(tmp_path, members.lab)
    _first_up(p)
    rolf = members.etcd.hosts["rolf-k3s-server"].name
    rolf_id = members.etcd.member_id("rolf-k3s-server")
    members.etcd.wipe("rolf-k3s-server")
    hcsv = p.cluster / "plans" / "hosts.csv"
    hcsv.write_text(hcsv.read_text().replace("WD-WCC4N1234567", "WD-WCC4N7654321"))
    assert p.preview() == {"cluster-render": "update", "rolf-deploy": "update"}
    assert ("rolf has a new install disk: its K3s nodes come back empty; what the cluster "
            "still holds of them is removed before its deploy") in _preview_text(p)
    t0 = time.time()
    r = p.up()
    assert r.returncode == 0, _text(r)[-6000:]
    assert rolf not in members.member_names() and len(members.member_names()) == 2
    (removal,) = members.removals()
    assert removal[1:] == ("olaf", rolf_id)  # through the first other server host
    (deploy,) = [c for c in p.colmena_calls() if c["start"] > t0]
    assert deploy["hosts"] == ["rolf"] and deploy["start"] > removal[0]
    assert f"removing etcd member {rolf} ({rolf_id}) of rolf-k3s-server through " \
           "10.0.100.2" in _text(r)
    assert p.preview() == {}


def test_a_server_whose_gate_failed_stops_the_chain_and_joins_again(
    members: MemberLab, tmp_path: Path
) -> None:
    # (was test_health's gate test, which stopped at the preview for lack of etcd) ulf's
    # server never becomes ready: the chain stops there, the rest goes on. The next up: ulf
    # (its gate failed) and rolf (after it in the chain, not deployed) have no deploy record,
    # so both count as joining a running cluster. Their join steps find each host holding the
    # data of a member etcd still lists: it stays (a healthy member is never removed as
    # stale), nothing is removed, then both deploy in order.
    lab = members.lab
    agents = {n: ["True"] for n in ("olaf-k3s-agent", "ulf-k3s-agent", "karl-k3s-agent")}
    lab.set_api(readyz={"10.0.100.10": ["200"], "10.0.100.12": ["503"], "10.0.100.14": ["200"]},
                nodes=agents)
    p = Project(tmp_path, lab, readyTimeout="6s")
    r = p.up("--continue-on-error")
    assert r.returncode != 0
    text = _text(r)
    assert "ulf: K3s server ulf-k3s-server (10.0.100.12) not ready after 6s" in text
    assert "last seen: /readyz 503, etcd not ready" in text
    assert "ssh root@10.0.100.3 journalctl -M k3s-server -u k3s" in text
    # rolf comes after ulf in the chain: not deployed; karl and ulrich went on
    assert sorted(p.deployed()) == sorted(["olaf", "ulf", "karl", "ulrich"])
    assert p.deployed()[:2] == ["olaf", "ulf"]
    assert p.preview() == {
        "ulf-deploy": "create",
        "rolf-deploy": "create",
        "ulf-k3s-server-joins-etcd": "create",
        "rolf-k3s-server-joins-etcd": "create",
    }
    lab.set_api(readyz={ip: ["200"] for ip in MEMBERS.values()}, nodes=agents)
    before = members.member_names()
    t0 = time.time()
    r = p.up()
    assert r.returncode == 0, _text(r)[-6000:]
    assert members.member_names() == before and len(before) == 3
    assert members.removals() == []
    for node in ("ulf-k3s-server", "rolf-k3s-server"):
        name = members.etcd.hosts[node].name
        ip = HOSTS[HOST_OF[node]]
        assert f"{node}: etcd member {name} has its data on {ip}; it stays" in _text(r)
    switched = [c["hosts"][0] for c in p.colmena_calls()
                if c["start"] > t0 and c["argv"][1] == "switch"]
    assert switched == ["ulf", "rolf"]
    # the next run forgets the join steps (nothing runs again)
    assert p.preview() == {"ulf-k3s-server-joins-etcd": "delete",
                           "rolf-k3s-server-joins-etcd": "delete"}


def test_with_wait_ready_false_a_membership_change_is_refused_at_preview(tmp_path: Path) -> None:
    # waitReady false turns off what the membership steps need (credentials, etcd's health):
    # the deploys still record who they deployed, and a server leaving is refused by the
    # preview, never skipped (it would stay a dead etcd voter)
    lab = Lab(tmp_path)
    p = Project(tmp_path, lab, waitReady="false")
    _first_up(p)
    _drop_rows(p, "rolf-k3s-server")
    before = len(p.colmena_calls())
    for cmd in (("preview",), ("up", "--yes", "--skip-preview")):
        r = p.pulumi(*cmd)
        assert r.returncode != 0
        assert ("waitReady false: membership changes need the gates, and this change has 1: "
                "rolf-k3s-server (server on rolf) leaves etcd: its row left plans/k3s.csv") \
            in " ".join(_text(r).split())
        assert "pulumi config set k3scluster:waitReady true" in _text(r)
    assert len(p.colmena_calls()) == before  # nothing deployed
    # a state from before the deploys recorded their hosts with waitReady false (8706c1f):
    # plan_membership sees nothing then, and the outputs of the last run stand in for the
    # records; the row's removal is refused still (it would have gone unseen)
    exported = p.pulumi("stack", "export", "--stack", STACK)
    assert exported.returncode == 0, _text(exported)
    recorded = exported.stdout
    state = json.loads(recorded)
    stripped = 0
    for res in state["deployment"]["resources"]:
        stdout = (res.get("outputs") or {}).get("stdout")
        if res["urn"].endswith("-deploy") and isinstance(stdout, str) and DEPLOYED_PREFIX in stdout:
            res["outputs"]["stdout"] = "".join(
                ln for ln in stdout.splitlines(keepends=True) if DEPLOYED_PREFIX not in ln)
            stripped += 1
    assert stripped == len(HOSTS)

    def imported(text: str) -> None:
        dump = tmp_path / "state.json"
        dump.write_text(text)
        r = p.pulumi("stack", "import", "--stack", STACK, "--file", str(dump))
        assert r.returncode == 0, _text(r)

    imported(json.dumps(state))
    r = p.pulumi("preview")
    assert r.returncode != 0
    words = " ".join(_text(r).split())
    assert ("the state holds no record of who is in the cluster for " + ", ".join(sorted(HOSTS))
            in words), words[-3000:]
    assert "rolf's K3s nodes change from [server] to []" in words
    assert len(p.colmena_calls()) == before
    imported(recorded)
    # with the gates on again the change is planned as usual
    (p.dir / "Pulumi.gates.yaml").write_text(
        (p.dir / "Pulumi.gates.yaml").read_text().replace('waitReady: "false"',
                                                          'waitReady: "true"'))
    assert p.preview()["rolf-k3s-server-leaves-etcd"] == "create"
