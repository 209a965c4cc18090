"""VM stacks under the real Pulumi engine, offline, each run in a network namespace of the
test's own (nothing reaches this machine's network): the preview of the example cluster as a
VM stack, and the refusal of a plan subnet the machine already uses."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from engine import netns_available, require_engine, run_pulumi
from test_pulumi_integration import HOSTS, STACK, Project

from k3scluster.lab.spec import bridge_name

pytestmark = [pytest.mark.vm, pytest.mark.integration, pytest.mark.root]


@pytest.fixture
def vm_project(tmp_path: Path) -> Project:
    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a network namespace")
    p = Project(tmp_path)
    for key, value in (("vms", "true"), ("vmAccel", "tcg")):
        r = p.pulumi("config", "set", f"k3scluster:{key}", value, "--stack", STACK)
        assert r.returncode == 0, r.stderr
    return p


def _types(plan: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in plan["steps"]:
        name = s["urn"].split("::")[-1]
        out.setdefault(s["urn"].split("::")[-2].split("$")[-1], []).append(name)
    return out


def test_preview_of_a_vm_stack_shows_the_lab_network_and_one_vm_per_host(
    vm_project: Project,
) -> None:
    plan = vm_project.preview()
    assert {s["op"] for s in plan["steps"]} == {"create"}
    types = _types(plan)
    assert types["k3scluster:index:Lab"] == ["cluster-lab"]
    assert sorted(types["k3scluster:index:Vm"]) == sorted(f"{h}-vm" for h in HOSTS)
    steps = set(types["pulumi-python:dynamic/k3scluster:Step"])
    assert "cluster-lab-network" in steps
    assert {f"{h}-vm-machine" for h in HOSTS} <= steps
    assert not [n for n in steps if n.endswith("-vm-iso")]  # vm-up builds it, to install
    net = next(s for s in plan["steps"] if s["urn"].endswith("::cluster-lab-network"))
    create = net["newState"]["inputs"]["create"]  # one shell line (readable preview)
    spec = json.loads(shlex.split(create)[-1] if isinstance(create, str) else create[-1])
    assert spec["bridge"] == bridge_name(STACK, spec["lab_id"]) != bridge_name(STACK)
    assert spec["gateway"] == "10.0.100.1/24"
    # a preview creates nothing: no render, no lab directory
    assert not vm_project.render_dir.exists()
    assert not (vm_project.render_dir.parent / f"{STACK}-lab").exists()


def test_a_plan_subnet_this_machine_uses_is_refused_before_anything_is_made(
    vm_project: Project,
) -> None:
    # the namespace's "LAN": a veth with an address in the plan's 10.0.100.0/24
    setup = (
        "ip link add lan0 type veth peer name lan1; ip addr add 10.0.100.77/24 dev lan0; "
        "ip link set lan0 up; ip link set lan1 up"
    )
    r = run_pulumi(
        ["up", "--yes", "--skip-preview", "--stack", STACK, "--non-interactive"],
        cwd=vm_project.dir,
        setup=setup + f"; ip -j link > {vm_project.dir}/links-before.json",
        teardown=f"ip -j link > {vm_project.dir}/links-after.json",
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "plans/network.yaml" in out and "overlaps" in out
    assert "address 10.0.100.77/24 on lan0" in out
    assert "route 10.0.100.0/24 dev lan0" in out
    before = {link["ifname"] for link in json.loads((vm_project.dir / "links-before.json").read_text())}
    after = {link["ifname"] for link in json.loads((vm_project.dir / "links-after.json").read_text())}
    assert before == after  # no bridge, no tap
    assert not (vm_project.render_dir.parent / f"{STACK}-lab").exists()
