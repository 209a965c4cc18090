"""The etcd snapshot before the first server host changes (issue 17 item 4), real engine.

The hosts of tests/test_health.py (a real sshd per host in network and mount namespaces of
the test's own, the K3s API stand-in, the colmena stand-in) with two more stand-ins on the
sshd's PATH (tests/bin/container): ``nixos-container run k3s-server -- …`` and K3s's
``k3s etcd-snapshot save``, which records its argv and time per host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_health import SERVERS, STACK, Lab, Project, _text, new_lab

ROOT = Path(__file__).resolve().parent.parent
CONTAINER_BIN = ROOT / "tests" / "bin" / "container"

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture
def hosts_lab(tmp_path: Path) -> Lab:
    lab = new_lab(tmp_path)
    with_k3s_standin(lab)
    return lab


def with_k3s_standin(lab: Lab) -> None:
    """Each host's sshd gives its sessions the stand-ins' PATH and a log of its own, and runs
    in a UTS namespace of its own with the host's name (what ``/proc/sys/kernel/hostname``
    says: NixOS sets it from the plan; ``lab.names`` may give a machine another one)."""
    for host, d in lab.hosts.items():
        cfg = d / "sshd_config"
        node = SERVERS[host][0] if host in SERVERS else host
        cfg.write_text(cfg.read_text() + (
            f"SetEnv PATH={CONTAINER_BIN}:/usr/bin:/bin K3S_STANDIN_LOG={d / 'k3s.log'} "
            f"K3S_STANDIN_FAIL={d / 'k3s.fail'} K3S_STANDIN_NODE={node}\n"))
    setup = lab.setup
    lab.names = {h: h for h in lab.hosts}  # type: ignore[attr-defined]

    def named_setup(down: tuple[str, ...] = ()) -> str:
        text = setup(down)
        for host, h in lab.hosts.items():
            text = text.replace(
                f"unshare --mount --propagation private sh -c 'mount --bind {h / 'run'} ",
                f"unshare --mount --uts --propagation private sh -c "
                f"'hostname {lab.names[host]} && mount --bind {h / 'run'} ",  # type: ignore[attr-defined]
            )
        return text

    lab.setup = named_setup  # type: ignore[method-assign]


def k3s_calls(lab: Lab, host: str) -> list[dict[str, Any]]:
    log = lab.hosts[host] / "k3s.log"
    return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []


def switches(p: Project) -> list[dict[str, Any]]:
    return [c for c in p.colmena_calls() if c["argv"][1] == "switch"]


def test_a_snapshot_is_taken_before_the_first_server_host_changes(
    hosts_lab: Lab, tmp_path: Path
) -> None:
    lab = hosts_lab
    p = Project(tmp_path, lab, snapshotBeforeServers="true")
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]
    # a new cluster: nothing to snapshot yet
    assert all(k3s_calls(lab, h) == [] for h in SERVERS)
    assert "etcdSnapshot" not in p.outputs()

    # a change of a server host that is not the first: the snapshot still comes first
    conf = p.cluster / "nixConfigs" / "ulf.nix"
    conf.write_text((conf.read_text() if conf.exists() else "{ ... }: { }\n") + "# changed\n")
    plan = p.preview()
    assert plan["ulf-deploy"] == "update" and plan["cluster-etcd-snapshot"] == "create"
    assert not {f"{h}-deploy" for h in ("olaf", "rolf", "karl", "ulrich")} & set(plan)
    before = len(switches(p))
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]
    (call,) = k3s_calls(lab, "olaf")  # on the first server host in the deploy order
    assert call["argv"][:3] == ["etcd-snapshot", "save", "--name"]
    name = call["argv"][3]
    assert name.startswith(f"{STACK}-") and len(call["argv"]) == 4
    (ulf,) = [c for c in switches(p)[before:]]
    assert ulf["hosts"] == ["ulf"] and call["t"] < ulf["start"]
    snap = p.outputs()["etcdSnapshot"]
    assert snap["name"] == name and snap["host"] == "olaf"
    assert snap["file"].startswith(f"{name}-olaf-k3s-server-")
    assert snap["path"] == ("/var/lib/nixos-containers/k3s-server/var/lib/rancher/k3s/server/"
                            f"db/snapshots/{snap['file']}")
    # nothing changed: no snapshot, no deploy
    assert p.preview() == {}

    # olaf's etcd does not answer: the next server takes it; then the change goes on
    (lab.hosts["olaf"] / "k3s.fail").write_text("")
    conf.write_text(conf.read_text() + "# changed again\n")
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]
    assert len(k3s_calls(lab, "olaf")) == 2 and len(k3s_calls(lab, "ulf")) == 1
    assert "etcd snapshot on olaf failed (level=fatal" in _text(r)
    assert p.outputs()["etcdSnapshot"]["host"] == "ulf"

    # no server takes it: no server host changes, and the run names why
    (lab.hosts["ulf"] / "k3s.fail").write_text("")
    (lab.hosts["rolf"] / "k3s.fail").write_text("")
    conf.write_text(conf.read_text() + "# and again\n")
    before = len(switches(p))
    r = p.up()
    assert r.returncode != 0
    assert "no server took the etcd snapshot before the servers change" in _text(r)
    assert [c["hosts"] for c in switches(p)[before:]] == []


def test_the_snapshot_is_taken_only_where_a_deployed_server_answers_with_its_name(
    hosts_lab: Lab, tmp_path: Path
) -> None:
    lab = hosts_lab
    p = Project(tmp_path, lab, snapshotBeforeServers="true")
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]
    # rolf moves to a new address, ulrich's host gets a server that joins, and the machine at
    # olaf's address now says it is otto
    hcsv = p.cluster / "plans" / "hosts.csv"
    hcsv.write_text(hcsv.read_text().replace("rolf,eno2,10.0.100.4,", "rolf,eno2,10.0.100.40,"))
    with (p.cluster / "plans" / "k3s.csv").open("a") as f:
        f.write("ulrich,ulrich-k3s-server,server,10.0.100.16\n")
    lab.names["olaf"] = "otto"  # type: ignore[attr-defined]
    (lab.hosts["ulf"] / "k3s.fail").write_text("")  # ulf's etcd does not answer
    snapshot_urn = p.step_state("cluster-render")["urn"].replace(
        "::cluster-render", "::cluster-etcd-snapshot")
    # the snapshot alone (the deploys of a re-address and a join are other tests')
    r = p.up("--target", snapshot_urn)
    assert r.returncode == 0, _text(r)[-4000:]
    text = _text(r)
    assert k3s_calls(lab, "olaf") == []  # another machine: nothing ran there
    assert ("etcd snapshot: the machine at 10.0.100.2 answers as otto, not as olaf: nothing "
            "runs there") in text
    assert len(k3s_calls(lab, "ulf")) == 1
    # rolf at the address it was deployed at (it is still there), never the joining ulrich
    assert "etcd snapshot " in text and "on rolf (10.0.100.4)" in text
    assert len(k3s_calls(lab, "rolf")) == 1 and k3s_calls(lab, "ulrich") == []
    assert p.outputs()["etcdSnapshot"]["host"] == "rolf"


def test_the_preview_says_per_host_what_its_deploy_may_do(hosts_lab: Lab, tmp_path: Path) -> None:
    lab = hosts_lab
    p = Project(tmp_path, lab, snapshotBeforeServers="true")
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]

    def said() -> list[str]:
        r = p.pulumi("preview")
        assert r.returncode == 0, _text(r)[-4000:]
        # (pulumi prints each diagnostic as it comes and again in its summary)
        return list(dict.fromkeys(
            ln.split("k3scluster: ", 1)[1].strip() for ln in _text(r).splitlines()
            if "k3scluster: " in ln and ("drain" in ln or "snapshot" in ln)))

    assert said() == []  # nothing changes
    # an agent-only host and a server host with an agent change: both may be drained, and
    # the snapshot comes first; olaf and rolf (unchanged) and ulrich (no agent) say nothing
    for h in ("karl", "ulf"):
        conf = p.cluster / "nixConfigs" / f"{h}.nix"
        conf.write_text((conf.read_text() if conf.exists() else "{ ... }: { }\n") + "# changed\n")
    assert said() == [
        ("etcd snapshot first, on the first of olaf, ulf, rolf that takes it, before any server "
        "host changes"),
        "ulf: drain possible (ulf-k3s-agent is drained first if the switch restarts its agent)",
        "karl: drain possible (karl-k3s-agent is drained first if the switch restarts its agent)",
    ]
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]
    # a host without an agent, and no server host: neither
    conf = p.cluster / "nixConfigs" / "ulrich.nix"
    conf.write_text((conf.read_text() if conf.exists() else "{ ... }: { }\n") + "# changed\n")
    assert said() == []
    assert p.preview() == {"ulrich-deploy": "update", "cluster-render": "update"}


def test_a_server_change_whose_deploy_failed_gets_a_snapshot_again(
    hosts_lab: Lab, tmp_path: Path
) -> None:
    lab = hosts_lab
    p = Project(tmp_path, lab, snapshotBeforeServers="true", rollback="false")
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]
    conf = p.cluster / "nixConfigs" / "ulf.nix"
    conf.write_text((conf.read_text() if conf.exists() else "{ ... }: { }\n") + "# changed\n")
    # the snapshot is taken, then ulf's switch fails
    r = p.up(env={"COLMENA_FAIL_HOSTS": "ulf"})
    assert r.returncode != 0
    assert len(k3s_calls(lab, "olaf")) == 1
    # the next run changes ulf again: a snapshot of its own first
    plan = p.preview()
    assert plan["ulf-deploy"] == "update" and plan["cluster-etcd-snapshot"] == "update"
    before = len(switches(p))
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]
    calls = k3s_calls(lab, "olaf")
    assert len(calls) == 2
    (ulf,) = switches(p)[before:]
    assert ulf["hosts"] == ["ulf"] and calls[1]["t"] < ulf["start"]
    assert p.outputs()["etcdSnapshot"]["name"] == calls[1]["argv"][3]
    # it landed: nothing changes, and no snapshot is taken
    assert p.preview() == {}
