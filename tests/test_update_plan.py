"""The order of an update (k3scluster/update_plan.py): table-driven, no pulumi, no network.

Each case is the plans, what the stack deployed before and the settings; the test checks the
phases ``plan_update`` returns, in words (``UpdatePlan.describe``) and in how each waits.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from k3scluster.membership import Deployed, deployed_from_records, host_record
from k3scluster.model import Cluster, Host, K3sNode, K3sType, Network, Secrets
from k3scluster.update_plan import (
    Action,
    HostVersions,
    UpdateSettings,
    Wait,
    plan_update,
    server_chain,
)

A = ipaddress.IPv4Address
T = {"i": K3sType.INIT_SERVER, "s": K3sType.SERVER, "a": K3sType.AGENT}


def cluster(hosts: list[str], nodes: list[tuple[str, str]], k3s: str | None = None) -> Cluster:
    """hosts in hosts.csv order; nodes: (host, i|s|a), named <host>-srv / <host>-agent."""
    ip = {h: A(f"10.0.0.{2 + i}") for i, h in enumerate(hosts)}
    return Cluster(
        root=Path("/nonexistent"),
        hosts=tuple(Host(h, "eno1", ip[h], "admin") for h in hosts),
        k3s=tuple(
            K3sNode(
                h,
                f"{h}-{'agent' if t == 'a' else 'srv'}",
                T[t],
                # by host and role, not by row: a row that goes moves no other node
                A(f"10.0.0.{100 + 2 * hosts.index(h) + (t == 'a')}"),
            )
            for h, t in nodes
        ),
        network=Network(
            gateway=A("10.0.0.1"), network=ipaddress.IPv4Network("10.0.0.0/24"), k3s_minor=k3s
        ),
        secrets=Secrets(token=None, passwd=None),
    )


def deployed_of(c: Cluster) -> Deployed:
    return deployed_from_records(host_record(c, h.name) for h in c.hosts)


# three servers, agents on two server hosts and on hosts of their own, a host without K3s
BIG_HOSTS = ["anna", "bert", "carla", "dora", "emil", "nokube"]
BIG = [
    ("bert", "s"), ("anna", "i"), ("carla", "s"),
    ("anna", "a"), ("bert", "a"), ("dora", "a"), ("emil", "a"),
]


@dataclass
class Case:
    id: str
    plans: Cluster
    want: list[str]  # UpdatePlan.describe()
    waits: list[tuple[Wait, tuple[int, ...]]]  # each phase: how, and for which phases
    deployed: Deployed = field(default_factory=Deployed)
    # the snapshot has cases of its own (SNAPSHOT_CASES)
    settings: UpdateSettings = field(default_factory=lambda: UpdateSettings(snapshot=False))
    versions: dict[str, HostVersions] = field(default_factory=dict)


def ran(c: Cluster, server: str | None, agent: str | None = None) -> dict[str, HostVersions]:
    """Every K3s host of ``c`` as deployed with these releases (agent: like the server)."""
    agent = agent or server
    return {
        h.name: HostVersions(
            server if c.server_on(h.name) else None, agent if c.agent_on(h.name) else None
        )
        for h in c.hosts
        if c.k3s_on(h.name)
    }


OK, SETTLED = Wait.OK, Wait.SETTLED
BIG_134 = cluster(BIG_HOSTS, BIG, k3s="1.34")
BIG_135 = cluster(BIG_HOSTS, BIG, k3s="1.35")
CHAIN = [
    "deploy anna (server host anna)",
    "deploy bert (server host bert)",
    "deploy carla (server host carla)",
]
CHAIN_WAITS = [(OK, ()), (OK, (0,)), (OK, (1,))]
# BIG, nothing special: nokube with the first batch, dora and emil one at a time
PLAIN = [
    *CHAIN,
    "deploy dora (agent hosts 1 of 2, at most 1 at a time)",
    "deploy emil (agent hosts 2 of 2, at most 1 at a time)",
    "deploy nokube (the hosts without an agent)",
]
PLAIN_WAITS = [*CHAIN_WAITS, (SETTLED, (0, 1, 2)), (OK, (3,)), (SETTLED, (0, 1, 2))]
AFTER = ", after every server runs K3s 1.35"
UPGRADE = [
    ("deploy-server-first anna (server host anna: its server to K3s 1.35, its agent kept at "
    "1.34 until every server runs 1.35)"),
    ("deploy-server-first bert (server host bert: its server to K3s 1.35, its agent kept at "
    "1.34 until every server runs 1.35)"),
    "deploy carla (server host carla)",
    f"deploy anna (agent hosts 1 of 4, at most 1 at a time{AFTER})",
    f"deploy bert (agent hosts 2 of 4, at most 1 at a time{AFTER})",
    f"deploy dora (agent hosts 3 of 4, at most 1 at a time{AFTER})",
    f"deploy emil (agent hosts 4 of 4, at most 1 at a time{AFTER})",
    "deploy nokube (the hosts without an agent)",
]
# the first agent batch waits strictly for the last server host: a failed server stops it
UPGRADE_WAITS = [*CHAIN_WAITS, (OK, (2,)), (OK, (3,)), (OK, (4,)), (OK, (5,)),
                 (SETTLED, (0, 1, 2))]


CASES = [
    Case(
        "new cluster: init-server's host first, each server host in hosts.csv order, then "
        "the agent hosts one at a time",
        cluster(BIG_HOSTS, BIG),
        PLAIN,
        PLAIN_WAITS,
    ),
    Case(
        "running cluster, nothing changes in the order",
        cluster(BIG_HOSTS, BIG),
        PLAIN,
        PLAIN_WAITS,
        deployed=deployed_of(cluster(BIG_HOSTS, BIG)),
    ),
    Case(
        "maxUnavailable 2: the agent hosts two at a time",
        cluster(BIG_HOSTS + ["fritz", "gerd"], [*BIG, ("fritz", "a"), ("gerd", "a")]),
        [
            *CHAIN,
            "deploy dora, emil (agent hosts 1 of 2, at most 2 at a time)",
            "deploy fritz, gerd (agent hosts 2 of 2, at most 2 at a time)",
            "deploy nokube (the hosts without an agent)",
        ],
        PLAIN_WAITS,
        settings=UpdateSettings(max_unavailable=2, snapshot=False),
    ),
    Case(
        "reboot auto: the agent hosts one at a time whatever maxUnavailable says",
        cluster(BIG_HOSTS + ["fritz", "gerd"], [*BIG, ("fritz", "a"), ("gerd", "a")]),
        [
            *CHAIN,
            *(f"deploy {h} (agent hosts {k} of 4, at most 1 at a time (k3scluster:reboot auto))"
              for k, h in enumerate(["dora", "emil", "fritz", "gerd"], 1)),
            "deploy nokube (the hosts without an agent)",
        ],
        [*CHAIN_WAITS, (SETTLED, (0, 1, 2)), (OK, (3,)), (OK, (4,)), (OK, (5,)),
         (SETTLED, (0, 1, 2))],
        settings=UpdateSettings(max_unavailable=2, snapshot=False, reboot_auto=True),
    ),
    Case(
        "maxUnavailable larger than the agent hosts: one batch",
        cluster(BIG_HOSTS, BIG),
        [*CHAIN, "deploy dora, emil (agent hosts 1 of 1, at most 5 at a time)",
         "deploy nokube (the hosts without an agent)"],
        [*CHAIN_WAITS, (SETTLED, (0, 1, 2)), (SETTLED, (0, 1, 2))],
        settings=UpdateSettings(max_unavailable=5, snapshot=False),
    ),
    Case(
        "no K3s at all: one phase",
        cluster(["a", "b"], []),
        ["deploy a, b (the hosts without an agent)"],
        [(SETTLED, ())],
    ),
    Case(
        "servers only",
        cluster(["a", "b"], [("b", "i"), ("a", "s")]),
        ["deploy b (server host b)", "deploy a (server host a)"],
        [(OK, ()), (OK, (0,))],
    ),
    Case(
        "K3s minor upgrade: server hosts first with their agents kept back, then the agents",
        BIG_135,
        UPGRADE,
        UPGRADE_WAITS,
        deployed=deployed_of(BIG_134),
        versions=ran(BIG_134, "1.34"),
    ),
    Case(
        "the upgrade failed after anna's first pass: anna's agent is still held back",
        BIG_135,
        UPGRADE,
        UPGRADE_WAITS,
        versions={**ran(BIG_134, "1.34"), "anna": HostVersions("1.35", "1.34")},
    ),
    Case(
        "the servers all moved, the agents did not: the agents move, nothing is held back",
        BIG_135,
        PLAIN,
        PLAIN_WAITS,
        versions={
            **ran(BIG_134, "1.35", "1.34"),
            "anna": HostVersions("1.35", "1.35"),
            "bert": HostVersions("1.35", "1.35"),
        },
    ),
    Case(
        "every host already runs the plans' release",
        BIG_135,
        PLAIN,
        PLAIN_WAITS,
        versions=ran(BIG_135, "1.35"),
    ),
    Case(
        "a state from before the releases were recorded: nothing known, nothing held",
        BIG_135,
        PLAIN,
        PLAIN_WAITS,
        deployed=deployed_of(BIG_134),
    ),
    Case(
        "upgrade without agents on server hosts: the agents still wait for every server",
        cluster(["a", "b", "c"], [("a", "i"), ("b", "s"), ("c", "a")], k3s="1.35"),
        [
            "deploy a (server host a)",
            "deploy b (server host b)",
            f"deploy c (agent hosts 1 of 1, at most 1 at a time{AFTER})",
        ],
        [(OK, ()), (OK, (0,)), (OK, (1,))],
        versions={
            "a": HostVersions("1.34"), "b": HostVersions("1.34"), "c": HostVersions(None, "1.34")
        },
    ),
]


def without(nodes: list[tuple[str, str]], *gone: tuple[str, str]) -> list[tuple[str, str]]:
    return [n for n in nodes if n not in gone]


RUNNING = deployed_of(cluster(BIG_HOSTS, BIG))
CASES += [
    Case(
        "a server row goes: it leaves etcd before anything deploys",
        cluster(BIG_HOSTS, without(BIG, ("carla", "s"))),
        [
            "server-leaves carla (carla-srv leaves etcd)",
            "deploy anna (server host anna)",
            "deploy bert (server host bert)",
            "deploy dora (agent hosts 1 of 2, at most 1 at a time)",
            "deploy emil (agent hosts 2 of 2, at most 1 at a time)",
            "deploy carla, nokube (the hosts without an agent)",
        ],
        [(OK, ()), (OK, (0,)), (OK, (1,)), (SETTLED, (0, 1, 2)), (OK, (3,)),
         (SETTLED, (0, 1, 2))],
        deployed=RUNNING,
    ),
    Case(
        "an agent host and a server host leave the plans: agents, servers, then the hosts",
        cluster(["anna", "bert", "emil", "nokube"], without(BIG, ("carla", "s"), ("dora", "a"))),
        [
            "agent-leaves dora (dora-agent leaves the cluster)",
            "server-leaves carla (carla-srv leaves etcd)",
            "host-leaves carla (carla leaves the plans)",
            "host-leaves dora (dora leaves the plans)",
            "deploy anna (server host anna)",
            "deploy bert (server host bert)",
            "deploy emil (agent hosts 1 of 1, at most 1 at a time)",
            "deploy nokube (the hosts without an agent)",
        ],
        [(OK, ()), (OK, (0,)), (OK, (1,)), (OK, (2,)), (OK, (3,)), (OK, (4,)),
         (SETTLED, (0, 1, 2, 3, 4, 5)), (SETTLED, (0, 1, 2, 3, 4, 5))],
        deployed=RUNNING,
    ),
    Case(
        "a new server joins the running cluster right before its host deploys",
        cluster(BIG_HOSTS, BIG),
        [
            "deploy anna (server host anna)",
            "deploy bert (server host bert)",
            "server-joins carla (carla-srv joins etcd)",
            "deploy carla (server host carla)",
            "deploy dora (agent hosts 1 of 2, at most 1 at a time)",
            "deploy emil (agent hosts 2 of 2, at most 1 at a time)",
            "deploy nokube (the hosts without an agent)",
        ],
        [(OK, ()), (OK, (0,)), (OK, (1,)), (OK, (2,)), (SETTLED, (0, 1, 2, 3)), (OK, (4,)),
         (SETTLED, (0, 1, 2, 3))],
        deployed=deployed_of(cluster(BIG_HOSTS, without(BIG, ("carla", "s")))),
    ),
]


SNAP = "snapshot anna, bert, carla (etcd snapshot before the servers change)"
SNAPPED_WAITS = [(OK, ()), (OK, (0,)), (OK, (1,)), (OK, (2,)), (SETTLED, (0, 1, 2, 3)),
                 (OK, (4,)), (SETTLED, (0, 1, 2, 3))]
CASES += [
    Case(
        "a running cluster: the snapshot first, on the server hosts in the deploy order",
        BIG_135,
        [SNAP, *PLAIN],
        SNAPPED_WAITS,
        settings=UpdateSettings(),
        versions=ran(BIG_135, "1.35"),
    ),
    Case(
        "a running cluster deployed before the releases were recorded: the snapshot too",
        BIG_135,
        [SNAP, *PLAIN],
        SNAPPED_WAITS,
        settings=UpdateSettings(),
        versions={h: HostVersions() for h in BIG_HOSTS},
    ),
    Case(
        "a new cluster: nothing to snapshot",
        BIG_135,
        PLAIN,
        PLAIN_WAITS,
        settings=UpdateSettings(),
    ),
    Case(
        "snapshotBeforeServers false",
        BIG_135,
        PLAIN,
        PLAIN_WAITS,
        settings=UpdateSettings(snapshot=False),
        versions=ran(BIG_135, "1.35"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_update_plan(case: Case) -> None:
    plan = plan_update(case.plans, case.deployed, case.settings, case.versions)
    assert plan.describe() == case.want
    assert [(p.wait, p.waits_for(i)) for i, p in enumerate(plan.phases)] == case.waits


def test_every_host_is_deployed_exactly_once_and_servers_before_the_rest() -> None:
    c = cluster(BIG_HOSTS, BIG)
    plan = plan_update(c, Deployed())
    deployed = plan.hosts_of(Action.DEPLOY)
    assert sorted(deployed) == sorted(BIG_HOSTS)
    assert deployed[:3] == server_chain(c) == ["anna", "bert", "carla"]


def test_at_no_moment_an_agent_runs_a_newer_minor_than_a_server() -> None:
    """Walk the phases of an upgrade in order: after each, every agent's release is at most
    every server's (the servers-first pass keeps a host's agent back)."""
    plan = plan_update(BIG_135, Deployed(), UpdateSettings(snapshot=False), ran(BIG_134, "1.34"))
    servers = {h: "1.34" for h in ("anna", "bert", "carla")}
    agents = {h: "1.34" for h in ("anna", "bert", "dora", "emil")}
    held = plan.held_agents()
    assert held == {"anna": "1.34", "bert": "1.34"}
    for phase in plan.phases:
        for h in phase.hosts:
            if h in servers:
                servers[h] = "1.35"
            if h in agents:
                agents[h] = held[h] if phase.action is Action.DEPLOY_SERVER_FIRST else "1.35"
        assert max(agents.values()) <= min(servers.values()), phase
    assert set(servers.values()) == set(agents.values()) == {"1.35"}


def _net(c: Cluster, k3s: str | None, nixos: str = "26.05") -> Cluster:
    import dataclasses

    return dataclasses.replace(
        c, network=dataclasses.replace(c.network, k3s_minor=k3s, nixos_release=nixos)
    )


STEP_CASES = [
    # (id, plans' k3s, nixos, deployed server, deployed agent, error words or None)
    ("one minor up", "1.35", "26.05", "1.34", "1.34", None),
    ("nothing changes", "1.35", "26.05", "1.35", "1.35", None),
    ("nothing recorded", "1.35", "26.05", None, None, None),
    ("two minors up", "1.35", "26.05", "1.33", "1.33", ["from 1.33 to 1.35", "past 1.34",
                                                         "1.33 -> 1.34 -> 1.35", 'k3s: "1.34"']),
    ("three minors up", "1.36", "26.05", "1.33", "1.33", ["past 1.34, 1.35",
                                                           "1.33 -> 1.34 -> 1.35 -> 1.36"]),
    ("agents left behind by a failed upgrade", "1.35", "26.05", "1.34", "1.33",
     ["from 1.33 to 1.35"]),
    ("a NixOS change without k3s: takes its default", None, "26.05", "1.33", "1.33",
     ["no k3s:, so NixOS 26.05's default K3s 1.35", "from 1.33 to 1.35", "write k3s:"]),
    ("a downgrade", "1.34", "26.05", "1.35", "1.35", ["back from 1.35 to 1.34", "no downgrade"]),
]


@pytest.mark.parametrize(
    ("k3s", "nixos", "server", "agent", "words"),
    [c[1:] for c in STEP_CASES],
    ids=[c[0] for c in STEP_CASES],
)
def test_k3s_moves_one_minor_release_at_a_time(
    k3s: str | None, nixos: str, server: str | None, agent: str | None,
    words: list[str] | None,
) -> None:
    from k3scluster.errors import K3sClusterError

    plans = _net(cluster(BIG_HOSTS, BIG), k3s, nixos)
    versions = {
        h: HostVersions(server if plans.server_on(h) else None, agent if plans.agent_on(h) else None)
        for h in BIG_HOSTS
        if plans.k3s_on(h) and (server or agent)
    }
    if words is None:
        plan_update(plans, Deployed(), None, versions)
        return
    with pytest.raises(K3sClusterError) as err:
        plan_update(plans, Deployed(), None, versions)
    text = str(err.value)
    assert text.startswith("plans/network.yaml: ")
    for w in words:
        assert w in text, (w, text)


@pytest.mark.parametrize(
    ("k3s", "unknown", "refused"),
    [
        (None, ["anna", "dora"], True),  # the NixOS default would decide, unchecked
        ("1.35", ["anna", "dora"], False),  # the user names the release
        (None, [], False),  # a new stack: nothing deployed
    ],
    ids=["no k3s: over unrecorded hosts", "k3s: written", "a new stack"],
)
def test_a_k3s_release_that_the_state_does_not_tell_needs_k3s_written(
    k3s: str | None, unknown: list[str], refused: bool
) -> None:
    from k3scluster.errors import K3sClusterError
    from k3scluster.update_plan import unrecorded_warning

    plans = _net(cluster(BIG_HOSTS, BIG), k3s, "26.05")
    versions = {h: HostVersions(unknown=True) for h in unknown}
    if not refused:
        plan_update(plans, deployed_of(plans) if unknown else Deployed(), None, versions)
        warned = unrecorded_warning(plans, versions)
        assert (warned is not None) is bool(unknown)
        assert warned is None or warned.startswith(
            'plans/network.yaml: k3s: "1.35" is taken as given for anna, dora: ')
        return
    with pytest.raises(K3sClusterError) as err:
        plan_update(plans, deployed_of(plans), None, versions)
    text, hint = str(err.value), err.value.hint or ""
    assert text.startswith("plans/network.yaml: no k3s:, so NixOS 26.05's default K3s 1.35")
    assert "records no K3s release for anna, dora" in text
    assert "cannot be checked" in text
    assert 'k3s: "1.N"' in hint and "kubectl get nodes" in hint


def test_membership_phases_carry_what_their_steps_need() -> None:
    before = cluster(BIG_HOSTS, BIG)
    # two servers leave (3 -> 1); anna (the init-server) stays and is asked
    plan = plan_update(cluster(BIG_HOSTS, without(BIG, ("bert", "s"), ("carla", "s"))),
                       deployed_of(before))
    leaves = [dict(p.detail) for p in plan.phases if p.action is Action.SERVER_LEAVES]
    assert [d["node"] for d in leaves] == ["bert-srv", "carla-srv"]
    for d in leaves:
        assert d["leaving"] == "bert-srv,carla-srv"
        assert d["via"] == "10.0.0.2"  # anna, where the init-server stays
    assert leaves[0]["host_ip"] == "10.0.0.3"


def test_refused_change_is_an_error_of_the_plan() -> None:
    from k3scluster.errors import K3sClusterError

    before = cluster(BIG_HOSTS, BIG)
    with pytest.raises(K3sClusterError, match="removes every K3s server"):
        plan_update(cluster(BIG_HOSTS, [("dora", "i"), ("emil", "a")]), deployed_of(before))


def test_dry_activation_output_says_whether_the_agent_restarts() -> None:
    from k3scluster import drain

    out = (
        "karl | would stop the following units: nscd.service, podman-k3s-agent.service\n"
        "karl | would activate the configuration...\n"
        "karl | would start the following units: nscd.service, podman-k3s-agent.service\n"
    )
    assert drain.units_changed(out)["stop"] == {"nscd.service", "podman-k3s-agent.service"}
    assert drain.agent_restarts(out)
    mark = "would activate the configuration...\n"
    assert drain.agent_restarts(mark + "would restart the following units: podman-k3s-agent.service")
    # started only (it was not running) or another unit: nothing to drain
    assert not drain.agent_restarts(mark + "would start the following units: podman-k3s-agent.service")
    assert not drain.agent_restarts(mark + "would restart the following units: sshd.service")
    assert not drain.agent_restarts("karl | " + mark)  # nothing changes at all
    assert drain.dry_activate_argv(["colmena", "apply", "switch", "--on", "karl", "-f", "h"]) == [
        "colmena", "apply", "dry-activate", "--on", "karl", "-f", "h"]


# What switch-to-configuration dry-activate prints (stderr), in its order, as the pinned
# nixpkgs' sources print it: nixos/modules/system/activation/switch-to-configuration.pl and
# pkgs/by-name/sw/switch-to-configuration-ng/src/src/main.rs; each list line only when it is
# not empty, "would activate the configuration..." always (so also when nothing changes).
DRY_ACTIVATE_LINES = [
    "would stop the following units: podman-k3s-agent.service",
    "would NOT stop the following changed units: nix-daemon.service",
    "would activate the configuration...",
    "would restart systemd",
    "would reload the following units: dbus.service",
    "would restart the following units: sshd.service",
    "would start the following units: podman-k3s-agent.service",
]


@pytest.mark.parametrize(
    ("lines", "restarts"),
    [
        (["would activate the configuration..."], False),  # nothing changes
        (DRY_ACTIVATE_LINES, True),
        ([ln for ln in DRY_ACTIVATE_LINES if "stop the following" not in ln], False),
        (["would activate the configuration...",
          "would restart the following units: podman-k3s-agent.service, sshd.service"], True),
        # not a dry activation k3scluster knows: a restart may hide in it
        ([], True),
        (["karl | Activating system profile", "karl | Succeeded"], True),
        (["would start the following units: podman-k3s-agent.service"], True),
        (["would activate this configuration (new wording)"], True),
    ],
    ids=["nothing changes", "every line", "no stop", "restart", "no output",
         "colmena without the activation's lines", "no activation line", "another wording"],
)
def test_dry_activation_lines_as_switch_to_configuration_prints_them(
    lines: list[str], restarts: bool
) -> None:
    from k3scluster import drain

    for prefix in ("", "      karl | "):  # as printed, and through colmena's plain output
        out = "".join(f"{prefix}{ln}\n" for ln in lines)
        assert drain.agent_restarts(out) is restarts, (prefix, lines)
    assert drain.recognised("karl | would activate the configuration...\n")
    assert not drain.recognised("")


def test_snapshot_name_and_what_runs_on_the_host() -> None:
    import datetime

    from k3scluster import snapshot

    when = datetime.datetime(2026, 12, 6, 7, 30, 5, tzinfo=datetime.UTC)
    assert snapshot.snapshot_name("Hardware_1", when) == "hardware-1-20261206-073005"
    assert snapshot.save_argv("hw-20261206-073005") == [
        "nixos-container", "run", "k3s-server", "--", "k3s", "etcd-snapshot", "save",
        "--name", "hw-20261206-073005"]
    tried: list[str] = []

    def run(ip: str, words: list[str]) -> tuple[int, str]:
        tried.append(ip)
        if ip == "10.0.0.2":
            return 1, 'level=fatal msg="etcd not ready"'
        return 0, "level=info msg=\"Snapshot hw-olaf-ulf-1765006205 saved.\""

    names = {"10.0.0.2": "olaf", "10.0.0.3": "ulf", "10.0.0.4": "ulrich"}
    servers = [("olaf", "10.0.0.2"), ("ulf", "10.0.0.3")]
    taken = snapshot.take(servers, "hw", run, lambda _: None, names.get)
    assert (taken.host, taken.file, tried) == ("ulf", "hw-olaf-ulf-1765006205",
                                               ["10.0.0.2", "10.0.0.3"])


def test_the_snapshot_runs_only_on_a_machine_that_answers_as_the_server_host() -> None:
    from k3scluster import snapshot
    from k3scluster.errors import K3sClusterError

    tried: list[str] = []
    said: list[str] = []

    def run(ip: str, words: list[str]) -> tuple[int, str]:
        tried.append(ip)
        return 0, "Snapshot hw-x-1 saved."

    # rolf's address is another machine's now; karl's does not answer: ulf takes it
    names = {"10.0.0.4": "ulrich", "10.0.0.3": "ulf"}
    servers = [("rolf", "10.0.0.4"), ("karl", "10.0.0.5"), ("ulf", "10.0.0.3")]
    taken = snapshot.take(servers, "hw", run, said.append, names.get)
    assert taken.host == "ulf" and tried == ["10.0.0.3"]
    assert said[0] == ("etcd snapshot: the machine at 10.0.0.4 answers as ulrich, not as rolf: "
                       "nothing runs there; trying the next server")
    assert "karl does not answer at 10.0.0.5" in said[1]
    with pytest.raises(K3sClusterError, match="answers as ulrich, not as rolf"):
        snapshot.take(servers[:1], "hw", run, said.append, names.get)
    with pytest.raises(K3sClusterError, match="records no server it deployed"):
        snapshot.take([], "hw", run, said.append, names.get)
    assert tried == ["10.0.0.3"]


def test_the_snapshot_is_taken_on_deployed_servers_at_their_deployed_addresses() -> None:
    import dataclasses

    before = cluster(BIG_HOSTS, BIG)
    # carla moves to a new address, dora's host gets a server that joins
    now = cluster(BIG_HOSTS, [*BIG, ("dora", "s")])
    now = dataclasses.replace(now, hosts=tuple(
        dataclasses.replace(h, ip=A("10.0.0.99")) if h.name == "carla" else h for h in now.hosts
    ))
    plan = plan_update(now, deployed_of(before), UpdateSettings(), ran(before, "1.31"))
    snap = plan.phases[0]
    assert snap.action is Action.SNAPSHOT and "dora" in snap.hosts
    assert dict(snap.detail)["servers"] == "anna=10.0.0.2,bert=10.0.0.3,carla=10.0.0.4"


def test_what_the_preview_says_a_deploy_may_do() -> None:
    import dataclasses

    from k3scluster.update_plan import what_may_happen

    before = cluster(BIG_HOSTS, BIG)
    # dora moves to a new address; fritz is new (never deployed: no node to drain); nokube
    # has no agent
    now = cluster([*BIG_HOSTS, "fritz"], [*BIG, ("fritz", "a")])
    now = dataclasses.replace(now, hosts=tuple(
        dataclasses.replace(h, ip=A("10.0.0.99")) if h.name == "dora" else h for h in now.hosts
    ))
    plan = plan_update(now, deployed_of(before), UpdateSettings(), ran(before, "1.31"))
    deployed = BIG_HOSTS
    got = what_may_happen(now, plan, ["bert", "dora", "fritz", "nokube"], deployed, gates=True)
    assert got == [
        ("etcd snapshot first, on the first of anna, bert, carla that takes it, before any "
        "server host changes"),
        "bert: drain possible (bert-agent is drained first if the switch restarts its agent)",
        "dora: drain possible (dora-agent is drained first: it reboots into its new address)",
    ]
    # no server host changes: no snapshot; gates off: nothing is drained
    assert what_may_happen(now, plan, ["emil"], deployed, gates=True) == [
        "emil: drain possible (emil-agent is drained first if the switch restarts its agent)"]
    assert what_may_happen(now, plan, ["emil", "bert"], deployed, gates=False) == [
        ("etcd snapshot first, on the first of anna, bert, carla that takes it, before any "
        "server host changes")]


def test_with_reboot_auto_the_preview_says_a_changing_host_may_reboot() -> None:
    import dataclasses

    from k3scluster.update_plan import what_may_happen

    before = cluster(BIG_HOSTS, BIG)
    now = dataclasses.replace(before, hosts=tuple(
        dataclasses.replace(h, ip=A("10.0.0.99")) if h.name == "dora" else h for h in before.hosts
    ))
    plan = plan_update(now, deployed_of(before), UpdateSettings(snapshot=False))
    changing = ["carla", "dora", "emil", "nokube"]
    got = what_may_happen(now, plan, changing, BIG_HOSTS, gates=True, reboot_auto=True)
    may = "reboot possible (k3scluster:reboot auto: when its kernel, initrd or kernel parameters "
    assert got == [
        f"carla: {may}change, it is rebooted and checked by its gates again)",
        # dora moves to a new address: it reboots anyway, into its new system
        "dora: drain possible (dora-agent is drained first: it reboots into its new address)",
        ("emil: drain possible (emil-agent is drained first if the switch restarts its agent); "
        f"{may}change, it is drained, rebooted and checked by its gates again)"),
        f"nokube: {may}change, it is rebooted and checked by its gates again)",
    ]
    # never (the default), or gates off: no reboot
    assert what_may_happen(now, plan, ["carla", "nokube"], BIG_HOSTS, gates=True) == []
    assert what_may_happen(now, plan, changing, BIG_HOSTS, gates=False, reboot_auto=True) == []


def test_reboot_auto_notes_say_the_agent_hosts_move_one_at_a_time() -> None:
    c = cluster(BIG_HOSTS, BIG)
    assert plan_update(c, Deployed(), UpdateSettings(max_unavailable=2)).notes == ()
    (note,) = plan_update(
        c, Deployed(), UpdateSettings(max_unavailable=2, reboot_auto=True)
    ).notes
    assert note.startswith("k3scluster:reboot auto: the hosts with an agent move one at a time "
                           "(k3scluster:maxUnavailable 2 is not used)")
    assert "drained, rebooted and checked by its gates before the next" in note
    # no agent host: nothing to say
    assert plan_update(cluster(["a"], [("a", "i")]), Deployed(),
                       UpdateSettings(reboot_auto=True)).notes == ()


def test_without_gates_the_changing_deployed_servers_are_named_as_without_snapshot() -> None:
    from k3scluster.update_plan import no_snapshot_warning

    now = cluster(BIG_HOSTS, BIG)
    got = no_snapshot_warning(now, ["emil", "carla", "anna"], ["anna", "carla", "emil"])
    assert got is not None and got.startswith("no etcd snapshot is taken before anna, carla ")
    # only agent hosts change, or the changing server host was never deployed: nothing to say
    assert no_snapshot_warning(now, ["emil", "nokube"], BIG_HOSTS) is None
    assert no_snapshot_warning(now, ["bert"], ["anna"]) is None


def test_the_snapshot_is_taken_again_for_a_server_change_that_did_not_land() -> None:
    from k3scluster.snapshot import again

    now = {"deploy:anna": "ab12", "k3s:server:anna": "1.31"}
    # the last snapshot was for this very change, and anna's deploy has not installed it
    assert again(now, now, "T1", pending=True) == "T1"
    assert again(now, {**now, "again": "T1"}, "T2", pending=True) == "T2"
    # it landed (nothing pending), or another change (its inputs differ anyway): kept
    assert again(now, {**now, "again": "T1"}, "T2", pending=False) == "T1"
    assert again({**now, "deploy:anna": "cd34"}, {**now, "again": "T1"}, "T2", True) == "T1"
    assert again(now, now, "T1", pending=False) is None
    # no snapshot yet, or inputs not known before the run (a hardware fetch): as recorded
    assert again(now, {}, None, pending=True) is None
    assert again(None, now, "T1", pending=True) is None


def test_with_two_servers_the_preview_says_the_api_stops_while_one_restarts() -> None:
    """etcd's quorum of 2 members is both: a deploy that restarts either server stops the
    API, whatever the order; the preview says so in words (gates or not), and says nothing
    with 1 or 3 servers or when no deployed server host changes."""
    from k3scluster.update_plan import what_may_happen

    two = cluster(["anna", "bert", "dora"], [("anna", "i"), ("bert", "s"), ("dora", "a")])
    plan = plan_update(two, deployed_of(two), UpdateSettings(snapshot=False))
    deployed = ["anna", "bert", "dora"]
    for gates in (True, False):
        got = what_may_happen(two, plan, ["bert", "anna"], deployed, gates=gates)
        assert got[0].startswith("etcd has 2 members, and its quorum is both: while anna, "
                                 "then bert restart their K3s servers")
        assert "Kubernetes API stops until it is back" in got[0]
    # no server host changes: nothing to say
    assert not any("etcd has 2 members" in x
                   for x in what_may_happen(two, plan, ["dora"], deployed, gates=True))
    assert what_may_happen(two, plan, ["anna"], deployed, gates=False)[0].startswith(
        "etcd has 2 members, and its quorum is both: while anna restarts its K3s server")
    # a server host not deployed before (its first install) restarts nothing that runs
    assert not any("etcd has 2 members" in x
                   for x in what_may_happen(two, plan, ["bert"], ["anna", "dora"], True))
    # 3 planned, carla's server joins in this up: anna and bert deploy while etcd has 2
    # members (carla joins after them)
    three = cluster(["anna", "bert", "carla"], [("anna", "i"), ("bert", "s"), ("carla", "s")])
    two_then = cluster(["anna", "bert", "carla"], [("anna", "i"), ("bert", "s"), ("carla", "a")])
    plan = plan_update(three, deployed_of(two_then), UpdateSettings(snapshot=False))
    assert [j.host for j in plan.membership.servers_joining] == ["carla"]
    got = what_may_happen(three, plan, ["anna", "bert", "carla"], ["anna", "bert", "carla"], True)
    assert got[0].startswith("etcd has 2 members, and its quorum is both: while anna, then bert "
                             "restart their K3s servers")
    # 2 planned, bert's server joins (bert ran an agent only): 1 member, nothing restarts it
    one_then = cluster(["anna", "bert"], [("anna", "i"), ("bert", "a")])
    two2 = cluster(["anna", "bert"], [("anna", "i"), ("bert", "s")])
    plan = plan_update(two2, deployed_of(one_then), UpdateSettings(snapshot=False))
    assert not any("etcd has 2 members" in x
                   for x in what_may_happen(two2, plan, ["anna", "bert"], ["anna", "bert"], True))
    three = cluster(BIG_HOSTS, BIG)
    plan3 = plan_update(three, deployed_of(three), UpdateSettings(snapshot=False))
    assert not any("etcd has 2 members" in x
                   for x in what_may_happen(three, plan3, ["anna", "bert"], BIG_HOSTS, True))
