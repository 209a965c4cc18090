"""The benchmark's own arithmetic (bench/run.py), checked against the program it measures: the
ideal of the ``up`` table counts the deploy rounds the update plan really makes of the synthetic
cluster (bench/gen.py), and the peer runs colmena in that same safe order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from k3scluster.membership import Deployed
from k3scluster.plans import load
from k3scluster.update_plan import Action, UpdateSettings, plan_update

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import run  # bench/run.py
from gen import host_name, make_cluster


@pytest.mark.parametrize(("n", "at_once"), [(1, 10), (3, 10), (4, 10), (10, 10), (14, 10),
                                            (50, 10), (10, 1)])
def test_deploy_rounds_are_the_deploy_phases_of_the_update_plan(
    tmp_path: Path, n: int, at_once: int
) -> None:
    loaded = load(make_cluster(tmp_path / "c", n))
    assert loaded.cluster is not None and not loaded.diagnostics, loaded.diagnostics
    cluster = loaded.cluster
    plan = plan_update(cluster, Deployed(), UpdateSettings(max_unavailable=at_once, snapshot=False))
    deploys = [p for p in plan.phases if p.action is Action.DEPLOY]
    assert len(deploys) == run.deploy_rounds(n, at_once)


def test_the_peer_deploys_each_server_host_alone_then_the_rest(tmp_path: Path) -> None:
    hive = tmp_path / "hive.nix"
    calls = run.safe_order_calls(14, hive)
    on = [c[c.index("--on") + 1] for c in calls]
    assert on == ["h0000", "h0001", "h0002", ",".join(host_name(i) for i in range(3, 14))]
    assert all(c[c.index("-p") + 1] == "10" and str(hive) in c for c in calls)
