"""A VM stack's resource graph with Pulumi's mocks (no engine), and that nothing of it
reaches a stack without ``k3scluster:vms``."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from test_components import RUNNERS, STEP_TYPES, _argv, _digests, run_program

from k3scluster.lab import netcheck
from k3scluster.lab.spec import VmSpec, bridge_name

pytestmark = pytest.mark.vm
HOSTS = ("olaf", "ulf", "rolf", "karl", "ulrich")


@pytest.fixture(autouse=True)
def _no_machine_check(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The program checks this machine's routes (``ip -j``); the mocks must not depend on
    them (the overlap check itself: test_vm_lab.py and the engine tests)."""
    calls: list[str] = []
    monkeypatch.setattr(netcheck, "check_machine", lambda *a: calls.append(str(a[0])))
    return calls


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_vm_stack_has_a_network_and_one_vm_per_host(
    example_dir: Path, runner: str, _no_machine_check: list[str]
) -> None:
    m = run_program(example_dir, runner, vms="true", vmAccel="tcg", vmMemory="1024")
    assert _no_machine_check == ["10.0.100.0/24"]
    counts = collections.Counter(r.type for r in m.registered)
    assert counts["k3scluster:index:Lab"] == 1
    assert counts["k3scluster:index:Vm"] == 5
    step = STEP_TYPES[RUNNERS.index(runner)]
    steps = {r.name for r in m.by_type(step)}
    assert {"cluster-lab-network", *(f"{h}-vm-iso" for h in HOSTS),
            *(f"{h}-vm-machine" for h in HOSTS)} <= steps
    # the Vm builds the ISO: the host's InstallerIso does not build it a second time
    assert not any(n.endswith("-installer-build") for n in steps)
    net = m.named("cluster-lab-network")
    assert _argv(net, runner)[2:4] == ["k3scluster.lab.ctl", "net-up"]
    assert json.loads(_argv(net, runner)[-1])["bridge"] == bridge_name("mock")
    assert _argv(net, runner, "delete")[3] == "net-down"
    render = m.named("cluster-render")
    for h in HOSTS:
        machine = m.named(f"{h}-vm-machine")
        iso = m.named(f"{h}-vm-iso")
        assert machine.parent == m.named(f"{h}-vm").urn
        assert net.urn in machine.dependencies and iso.urn in machine.dependencies
        assert render.urn in iso.dependencies
        assert f"file:installers/{h}/default.nix" in _digests(iso, runner)
        spec = VmSpec.from_json(_argv(machine, runner)[-1])
        assert (spec.host, spec.accel, spec.memory_mib) == (h, "tcg", 1024)
        assert _argv(machine, runner, "delete")[3] == "vm-delete"
        # the normal path waits for the installed VM
        assert machine.urn in m.named(f"{h}-deploy").dependencies
    for h in ("olaf", "rolf", "karl", "ulrich"):  # the hosts without a hardware file
        assert m.named(f"{h}-vm-machine").urn in m.named(f"cluster-{h}-hardware").dependencies
    assert _argv(render, runner)[-2:] == ["--vm-stack", "mock"]


@pytest.mark.parametrize("runner", RUNNERS)
def test_nothing_vm_specific_reaches_a_stack_without_vms(
    example_dir: Path, runner: str, _no_machine_check: list[str]
) -> None:
    plain = run_program(example_dir, runner)
    off = run_program(example_dir, runner, vms="false", vmMemory="1024", vmAccel="kvm")
    assert _no_machine_check == []

    def graph(m):  # type: ignore[no-untyped-def]
        return [(r.type, r.name, r.parent, sorted(r.dependencies), r.raw) for r in m.registered]

    assert sorted(graph(plain)) == sorted(graph(off))  # (registration order varies)
    for r in plain.registered:
        assert r.type not in ("k3scluster:index:Lab", "k3scluster:index:Vm")
        assert "-vm" not in r.name
        for needle in ("k3scluster.lab", "--vm-stack", "systemd.network.links", "vm-up"):
            assert needle not in r.raw, (r.name, needle)
