"""Who joins and who leaves (k3scluster/membership.py): table-driven, no network.

Each case is a deployed cluster (what the stack recorded) and the plans of the next change;
the test checks which servers leave etcd (in order), which join, which agents leave, which
hosts are re-addressed or leave, and the refusals. The quorum cases check the rule every
removal is made under at ``up``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from k3scluster.errors import K3sClusterError
from k3scluster.membership import (
    Deployed,
    DeployedHost,
    DeployedNode,
    Member,
    QuorumError,
    deployed_from_records,
    host_record,
    parse_record,
    plan_membership,
    quorum,
    removal_order,
)
from k3scluster.model import Cluster, Host, K3sNode, K3sType, Network, Secrets

A = ipaddress.IPv4Address
T = {"i": K3sType.INIT_SERVER, "s": K3sType.SERVER, "a": K3sType.AGENT}


def cluster(hosts: dict[str, str], nodes: list[tuple[str, str, str, str]],
            disks: dict[str, str] | None = None) -> Cluster:
    """hosts: name -> ip; nodes: (host, name, i|s|a, ip)."""
    disks = disks or {}
    return Cluster(
        root=Path("/nonexistent"),
        hosts=tuple(Host(n, "eno1", A(ip), "admin", disk=disks.get(n)) for n, ip in hosts.items()),
        k3s=tuple(K3sNode(h, n, T[t], A(ip)) for h, n, t, ip in nodes),
        network=Network(gateway=A("10.0.0.1"), network=ipaddress.IPv4Network("10.0.0.0/24")),
        secrets=Secrets(token=None, passwd=None),
    )


def deployed_of(c: Cluster) -> Deployed:
    """What the stack records after deploying ``c`` (through the record it writes)."""
    return deployed_from_records(host_record(c, h.name) for h in c.hosts)


HOSTS3 = {"anna": "10.0.0.2", "bert": "10.0.0.3", "carla": "10.0.0.4", "dora": "10.0.0.5"}
THREE = [
    ("anna", "anna-srv", "i", "10.0.0.10"),
    ("bert", "bert-srv", "s", "10.0.0.11"),
    ("carla", "carla-srv", "s", "10.0.0.12"),
    ("anna", "anna-agent", "a", "10.0.0.20"),
    ("dora", "dora-agent", "a", "10.0.0.21"),
]


def without(rows: list[tuple[str, str, str, str]], *names: str) -> list[tuple[str, str, str, str]]:
    return [r for r in rows if r[1] not in names]


@dataclass
class Case:
    id: str
    before: Cluster
    after: Cluster
    servers_leaving: list[str] = field(default_factory=list)
    agents_leaving: list[str] = field(default_factory=list)
    joining: list[str] = field(default_factory=list)
    readdressed: dict[str, tuple[str, str]] = field(default_factory=dict)
    hosts_leaving: list[str] = field(default_factory=list)
    reinstalled: list[str] = field(default_factory=list)
    init_moved: tuple[str, str] | None = None
    refused: str | None = None  # a phrase of the error


CASES = [
    Case("nothing changes", cluster(HOSTS3, THREE), cluster(HOSTS3, THREE)),
    Case("a server row goes", cluster(HOSTS3, THREE),
         cluster(HOSTS3, without(THREE, "carla-srv")), servers_leaving=["carla-srv"]),
    Case("two server rows go (3 -> 1)", cluster(HOSTS3, THREE),
         cluster(HOSTS3, without(THREE, "bert-srv", "carla-srv")),
         servers_leaving=["bert-srv", "carla-srv"]),
    Case("a server's host goes",
         cluster(HOSTS3, THREE),
         cluster({k: v for k, v in HOSTS3.items() if k != "carla"}, without(THREE, "carla-srv")),
         servers_leaving=["carla-srv"], hosts_leaving=["carla"]),
    Case("an agent row goes", cluster(HOSTS3, THREE),
         cluster(HOSTS3, without(THREE, "dora-agent")), agents_leaving=["dora-agent"]),
    Case("an agent's host goes", cluster(HOSTS3, THREE),
         cluster({k: v for k, v in HOSTS3.items() if k != "dora"}, without(THREE, "dora-agent")),
         agents_leaving=["dora-agent"], hosts_leaving=["dora"]),
    Case("a new server joins a running cluster", cluster(HOSTS3, without(THREE, "carla-srv")),
         cluster(HOSTS3, THREE), joining=["carla-srv"]),
    Case("a first deploy: nobody joins a running cluster", cluster(HOSTS3, []),
         cluster(HOSTS3, THREE)),
    Case("a host is re-addressed", cluster(HOSTS3, THREE),
         cluster({**HOSTS3, "dora": "10.0.0.50"}, THREE),
         readdressed={"dora": ("10.0.0.5", "10.0.0.50")}),
    Case("a server is re-addressed: it leaves and joins again", cluster(HOSTS3, THREE),
         cluster(HOSTS3, [*without(THREE, "carla-srv"), ("carla", "carla-srv", "s", "10.0.0.40")]),
         servers_leaving=["carla-srv"], joining=["carla-srv"]),
    Case("an agent's address changes: nothing to do", cluster(HOSTS3, THREE),
         cluster(HOSTS3, [*without(THREE, "dora-agent"), ("dora", "dora-agent", "a", "10.0.0.41")])),
    Case("a server becomes an agent", cluster(HOSTS3, THREE),
         cluster(HOSTS3, [*without(THREE, "carla-srv"), ("carla", "carla-srv", "a", "10.0.0.12")]),
         servers_leaving=["carla-srv"]),
    Case("an agent moves to another host", cluster(HOSTS3, THREE),
         cluster(HOSTS3, [*without(THREE, "dora-agent"), ("carla", "dora-agent", "a", "10.0.0.21")]),
         agents_leaving=["dora-agent"]),
    Case("the init-server's row goes, another server becomes init-server",
         cluster(HOSTS3, THREE),
         cluster(HOSTS3, [("bert", "bert-srv", "i", "10.0.0.11"),
                          ("carla", "carla-srv", "s", "10.0.0.12"),
                          *without(THREE, "anna-srv", "bert-srv", "carla-srv")]),
         servers_leaving=["anna-srv"], init_moved=("anna-srv", "bert-srv")),
    Case("every server removed: refused", cluster(HOSTS3, THREE),
         cluster(HOSTS3, [("dora", "dora-srv", "i", "10.0.0.30"),
                          *without(THREE, "anna-srv", "bert-srv", "carla-srv")]),
         refused="removes every K3s server of the running cluster (anna-srv, bert-srv, carla-srv)"),
    Case("every server host removed: refused", cluster(HOSTS3, THREE),
         cluster({"dora": "10.0.0.5"}, [("dora", "dora-agent", "a", "10.0.0.21")]),
         refused="(anna-srv, bert-srv, carla-srv)"),
    Case("a new install disk: reinstalled", cluster(HOSTS3, THREE, {"dora": "s1"}),
         cluster(HOSTS3, THREE, {"dora": "s2"}), reinstalled=["dora"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_membership_plan(case: Case) -> None:
    deployed = deployed_of(case.before)
    if case.refused:
        with pytest.raises(K3sClusterError) as err:
            plan_membership(case.after, deployed)
        assert case.refused in err.value.message
        assert "keep at least one" in err.value.hint
        return
    plan = plan_membership(case.after, deployed)
    assert [s.node for s in plan.servers_leaving] == case.servers_leaving
    assert [a.node for a in plan.agents_leaving] == case.agents_leaving
    assert [j.node for j in plan.servers_joining] == case.joining
    assert {r.host: (str(r.old), str(r.new)) for r in plan.readdressed} == case.readdressed
    assert {h: str(ip) for h, ip in plan.deploy_via.items()} == {
        h: old for h, (old, _new) in case.readdressed.items()
    }
    assert [h.host for h in plan.hosts_leaving] == case.hosts_leaving
    assert list(plan.reinstalled) == case.reinstalled
    assert plan.init_moved == case.init_moved
    changes = [ln for ln in plan.describe() if not ln.startswith("init-server: ")]
    assert plan.empty == (not changes)


def test_leaving_nodes_keep_the_address_their_host_was_deployed_at() -> None:
    before = cluster(HOSTS3, THREE)
    after = cluster({k: v for k, v in HOSTS3.items() if k != "carla"}, without(THREE, "carla-srv"))
    (leaving,) = plan_membership(after, deployed_of(before)).servers_leaving
    assert (leaving.host, str(leaving.host_ip), str(leaving.ip)) == ("carla", "10.0.0.4",
                                                                       "10.0.0.12")
    assert leaving.host_leaves and "left the plans" in leaving.why


def test_describe_says_each_change_in_words() -> None:
    before = cluster(HOSTS3, THREE)
    after = cluster({"anna": "10.0.0.2", "bert": "10.0.0.33", "dora": "10.0.0.5"},
                    without(THREE, "carla-srv", "dora-agent"))
    lines = plan_membership(after, deployed_of(before)).describe()
    assert lines == [
        ("dora-agent (agent on dora) leaves: its row left plans/k3s.csv; it is cordoned, "
        "drained, stopped, and its Node and node-password secret are deleted"),
        ("carla-srv (server on carla) leaves etcd: its host carla left the plans; its member "
        "is removed from a healthy remaining server, then it is stopped"),
        ("bert moves from 10.0.0.3 to 10.0.0.33: deployed through 10.0.0.3, then checked at "
        "10.0.0.33"),
        "carla (10.0.0.4) leaves the plans (carla-srv): the machine is NOT wiped",
    ]


def test_a_new_stack_has_nothing_to_do() -> None:
    plan = plan_membership(cluster(HOSTS3, THREE), Deployed())
    assert plan.empty and not plan.running


def test_record_round_trip_and_damaged_records() -> None:
    c = cluster(HOSTS3, THREE, {"anna": "wd-123"})
    rec = host_record(c, "anna")
    back = parse_record(rec)
    assert back == DeployedHost(
        "anna", A("10.0.0.2"),
        (DeployedNode("anna-srv", K3sType.INIT_SERVER, A("10.0.0.10")),
         DeployedNode("anna-agent", K3sType.AGENT, A("10.0.0.20"))),
        disk="wd-123", boot="efi",
    )
    import json

    assert parse_record(json.dumps(rec)) == back
    for bad in (None, "", "{", [], {"name": "x"}, {"name": "x", "ip": "300.1.1.1"},
                {"name": "x", "ip": "10.0.0.1", "nodes": [{"name": "n", "type": "boss",
                                                            "ip": "10.0.0.2"}]}):
        assert parse_record(bad) is None
    assert deployed_from_records([rec, None, "junk"]).hosts == (back,)


# -- the quorum rule ------------------------------------------------------------------


def members(spec: str) -> list[Member]:
    """'a+ b+ c-': the members of nodes a-srv, b-srv (healthy) and c-srv (not), with ids
    1, 2, 3 and K3s's member names '<node>-<8 hex digits>'."""
    out = []
    for i, word in enumerate(spec.split(), start=1):
        out.append(Member(i, f"{word[:-1]}-srv-{i:08x}", word.endswith("+")))
    return out


def nodes(letters: list[str]) -> list[str]:
    return [f"{x}-srv" for x in letters]


@pytest.mark.parametrize(
    ("spec", "leaving", "order"),
    [
        ("a+ b+ c+", ["c"], ["c"]),  # 3 -> 2
        ("a+ b+ c+", ["b", "c"], ["b", "c"]),  # 3 -> 2 -> 1, one at a time
        ("a+ b+ c-", ["c"], ["c"]),  # the dead member itself may go
        ("a+ b+ c- d+ e+", ["c", "d"], ["c", "d"]),  # the dead one first
        ("a+ b+ c+ d- e+", ["b", "d"], ["d", "b"]),  # unhealthy first, whatever the list says
        ("a+ b+ c+", [], []),
    ],
)
def test_removals_that_keep_a_quorum(spec: str, leaving: list[str], order: list[str]) -> None:
    assert [m.node for m in removal_order(members(spec), nodes(leaving))] == nodes(order)


@pytest.mark.parametrize(
    ("spec", "leaving", "unhealthy"),
    [
        # a remaining member is down: removing a healthy one leaves 1 of 2
        ("a+ b+ c-", ["b"], ["c-srv-00000003"]),
        # two of three down: no quorum to commit anything
        ("a+ b- c-", ["b"], ["b-srv-00000002", "c-srv-00000003"]),
        # 2 -> 1 with the other one down: the change cannot commit
        ("a+ b-", ["b"], ["b-srv-00000002"]),
        # the last member
        ("a+", ["a"], []),
    ],
)
def test_removals_that_would_lose_the_quorum_are_refused(
    spec: str, leaving: list[str], unhealthy: list[str]
) -> None:
    with pytest.raises(QuorumError) as err:
        removal_order(members(spec), nodes(leaving))
    assert list(err.value.unhealthy) == unhealthy
    for name in unhealthy:
        assert name in err.value.message


def test_member_node_names_follow_k3s() -> None:
    assert Member(1, "carla-srv-1a2b3c4d", True).node == "carla-srv"
    assert Member(1, "x", True).node == "x"
    assert Member(255, "n-1", True).hex_id == "ff"
    assert [quorum(n) for n in range(1, 6)] == [1, 2, 2, 3, 3]


def test_without_gates_a_change_of_k3s_members_is_refused_naming_it() -> None:
    from k3scluster.membership import (
        HostLeaving,
        Joining,
        Leaving,
        MembershipPlan,
        Readdressed,
        refuse_without_gates,
    )

    refuse_without_gates(MembershipPlan())  # nothing changes: nothing to refuse
    # a server that joins a running cluster (its host's deploy not recorded, as after a
    # killed `up`): its stale etcd member is cleaned up only with the gates
    with pytest.raises(K3sClusterError) as err:
        refuse_without_gates(MembershipPlan(servers_joining=(
            Joining("ulf-k3s-server", "ulf", "its host's deploy was not recorded"),)))
    assert "ulf-k3s-server (server on ulf) joins etcd" in err.value.message
    # a host without K3s nodes leaves the plans: no change of the cluster's members
    refuse_without_gates(MembershipPlan(
        hosts_leaving=(HostLeaving("ulrich", ipaddress.IPv4Address("10.0.100.6"), ()),)))
    plan = MembershipPlan(
        agents_leaving=(Leaving("karl-k3s-agent", "karl", ipaddress.IPv4Address("10.0.100.5"),
                                ipaddress.IPv4Address("10.0.100.15"), "its row left plans/k3s.csv"),),
        readdressed=(Readdressed("ulrich", ipaddress.IPv4Address("10.0.100.6"),
                                 ipaddress.IPv4Address("10.0.100.26")),),
    )
    with pytest.raises(K3sClusterError) as err:
        refuse_without_gates(plan)
    assert err.value.message.startswith("waitReady false: membership changes need the gates, "
                                        "and this change has 1: karl-k3s-agent (agent on karl)")
    assert "ulrich moves" not in err.value.message
    assert "k3scluster:waitReady true" in err.value.hint
    # a host without K3s nodes that moves: rebooted through its old address over ssh, no gate
    refuse_without_gates(MembershipPlan(readdressed=plan.readdressed))
    # a host with K3s nodes that moves stays refused (an undrained, unchecked reboot; in a VM
    # stack a new install nothing cleans up after)
    karl = Readdressed("karl", ipaddress.IPv4Address("10.0.100.5"),
                       ipaddress.IPv4Address("10.0.100.25"), ("karl-k3s-agent",))
    with pytest.raises(K3sClusterError) as err:
        refuse_without_gates(MembershipPlan(readdressed=(karl,)))
    assert "karl moves from 10.0.100.5 to 10.0.100.25" in err.value.message


def test_a_moved_host_carries_its_k3s_nodes_into_the_membership_plan() -> None:
    """refuse_without_gates tells a moved K3s host from one without K3s by these."""
    from k3scluster.membership import Readdressed

    before = cluster(HOSTS3, THREE)
    moved = cluster({**HOSTS3, "dora": "10.0.0.25", "bert": "10.0.0.23"}, THREE)
    plan = plan_membership(moved, deployed_of(before))
    assert sorted(plan.readdressed, key=lambda r: r.host) == [
        Readdressed("bert", A("10.0.0.3"), A("10.0.0.23"), ("bert-srv",)),
        Readdressed("dora", A("10.0.0.5"), A("10.0.0.25"), ("dora-agent",)),
    ]


def _outputs_of(c: Cluster) -> dict[str, dict[str, object]]:
    """The stack output ``hosts`` a run of ``c`` leaves (ip and roles of each host)."""
    return {h.name: {"ip": str(h.ip), "roles": [n.type.value for n in c.k3s_on(h.name)]}
            for h in c.hosts}


def test_hosts_deployed_before_records_are_judged_from_the_last_outputs() -> None:
    # waitReady false before 8706c1f: the deploys recorded nothing, so plan_membership sees no
    # change; the last run's outputs (ip, roles) stand in, and a change of members is refused
    from k3scluster.membership import refuse_unrecorded_changes

    before = cluster(HOSTS3, THREE)
    unrecorded = _outputs_of(before)
    assert plan_membership(cluster(HOSTS3, without(THREE, "carla-srv")), Deployed()) \
        == plan_membership(before, Deployed())  # the records' view: nothing at all
    refuse_unrecorded_changes(before, unrecorded, Deployed())  # nothing changes
    # the init-server's row goes while bert becomes init-server: no change of members
    swapped = [("bert", "bert-srv", "i", "10.0.0.11") if r[1] == "bert-srv" else r
               for r in without(THREE, "anna-srv")] + [("anna", "anna-srv", "s", "10.0.0.10")]
    refuse_unrecorded_changes(cluster(HOSTS3, swapped), unrecorded, Deployed())
    for after, phrase in [
        (cluster(HOSTS3, without(THREE, "carla-srv")),
         "carla's K3s nodes change from [server] to []"),
        (cluster(HOSTS3, without(THREE, "dora-agent")),
         "dora's K3s nodes change from [agent] to []"),
        (cluster({k: v for k, v in HOSTS3.items() if k != "dora"}, without(THREE, "dora-agent")),
         "dora (K3s agent) leaves the plans"),
        (cluster(HOSTS3 | {"dora": "10.0.0.9"}, THREE), "dora moves from 10.0.0.5 to 10.0.0.9"),
        (cluster(HOSTS3 | {"emil": "10.0.0.6"}, [*THREE, ("emil", "emil-srv", "s", "10.0.0.13")]),
         "emil-srv (server on emil) joins the running cluster"),
    ]:
        with pytest.raises(K3sClusterError) as err:
            refuse_unrecorded_changes(after, unrecorded, Deployed())
        assert phrase in err.value.message
        assert err.value.message.startswith(
            "the state holds no record of who is in the cluster for anna, bert, carla, dora")
        assert "with the plans as they were last deployed" in err.value.hint
    # a host without K3s nodes may leave; recorded hosts are plan_membership's
    plain = cluster(HOSTS3 | {"emil": "10.0.0.6"}, THREE)
    refuse_unrecorded_changes(cluster(HOSTS3, THREE), {"emil": _outputs_of(plain)["emil"]},
                              deployed_of(before))


def test_member_list_waits_out_a_k3s_etcd_leader_election() -> None:
    """Since etcd 3.5 `member list` waits for a leader, and K3s runs etcd with a 5 s election
    timeout (k3s pkg/etcd): after a member's removal an election may take 5-10 s, and a
    shorter --command-timeout would make every server seem not to answer (a refusal that
    names the wrong cause). At least twice the election timeout, as every etcdctl call."""
    from k3scluster import etcdmembers

    def seconds(timeout: str) -> float:
        assert timeout.endswith("s") and not timeout.endswith("ms"), timeout
        return float(timeout[:-1])

    assert seconds(etcdmembers.MEMBER_LIST_TIMEOUT) >= 10
    assert seconds(etcdmembers.COMMAND_TIMEOUT) >= 10
