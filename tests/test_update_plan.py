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
from k3scluster.update_plan import Action, UpdateSettings, Wait, plan_update, server_chain

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
                A(f"10.0.0.{100 + n}"),
            )
            for n, (h, t) in enumerate(nodes)
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
    waits: list[Wait]
    deployed: Deployed = field(default_factory=Deployed)
    settings: UpdateSettings = field(default_factory=UpdateSettings)


CASES = [
    Case(
        "new-cluster: init-server's host first, then each server host in hosts.csv order",
        cluster(BIG_HOSTS, BIG),
        [
            "deploy anna (server host anna)",
            "deploy bert (server host bert)",
            "deploy carla (server host carla)",
            "deploy dora, emil, nokube (the other hosts)",
        ],
        [Wait.OK, Wait.OK, Wait.OK, Wait.SETTLED],
    ),
    Case(
        "running cluster, nothing changes in the order",
        cluster(BIG_HOSTS, BIG),
        [
            "deploy anna (server host anna)",
            "deploy bert (server host bert)",
            "deploy carla (server host carla)",
            "deploy dora, emil, nokube (the other hosts)",
        ],
        [Wait.OK, Wait.OK, Wait.OK, Wait.SETTLED],
        deployed=deployed_of(cluster(BIG_HOSTS, BIG)),
    ),
    Case(
        "no K3s at all: one phase",
        cluster(["a", "b"], []),
        ["deploy a, b (the other hosts)"],
        [Wait.SETTLED],
    ),
    Case(
        "servers only",
        cluster(["a", "b"], [("b", "i"), ("a", "s")]),
        ["deploy b (server host b)", "deploy a (server host a)"],
        [Wait.OK, Wait.OK],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_update_plan(case: Case) -> None:
    plan = plan_update(case.plans, case.deployed, case.settings)
    assert plan.describe() == case.want
    assert [p.wait for p in plan.phases] == case.waits


def test_every_host_is_deployed_exactly_once_and_servers_before_the_rest() -> None:
    c = cluster(BIG_HOSTS, BIG)
    plan = plan_update(c, Deployed())
    deployed = plan.hosts_of(Action.DEPLOY)
    assert sorted(deployed) == sorted(BIG_HOSTS)
    assert deployed[:3] == server_chain(c) == ["anna", "bert", "carla"]
