"""A VM stack's resource graph with Pulumi's mocks (no engine), and that nothing of it
reaches a stack without ``k3scluster:vms``."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest
from test_components import RUNNERS, STEP_TYPES, _argv, _digests, run_program
from test_update_components import StateMocks

from k3scluster.components.steps import digest_environment
from k3scluster.lab import netcheck
from k3scluster.lab.spec import VmSpec, bridge_name, guest_name, link_alias, tap_name

pytestmark = pytest.mark.vm
HOSTS = ("olaf", "ulf", "rolf", "karl", "ulrich")


@pytest.fixture
def example_dir(short_example_dir: Path) -> Path:
    """The example cluster where its VMs' QMP sockets fit (conftest.short_example_dir)."""
    return short_example_dir


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
    assert {"cluster-lab-network", *(f"{h}-vm-machine" for h in HOSTS)} <= steps
    # vm-up builds the ISO when it installs, and only then: no step of its own (a changed
    # configuration rebuilds nothing), and the host's InstallerIso does not build it either
    assert not any(n.endswith(("-vm-iso", "-installer-build")) for n in steps)
    net = m.named("cluster-lab-network")
    assert _argv(net, runner)[2:4] == ["k3scluster.lab.ctl", "net-up"]
    lab_id = _digests(net, runner)["lab"]  # a new lab: a new id, recorded in the state
    assert json.loads(_argv(net, runner)[-1])["bridge"] == bridge_name("mock", lab_id)
    assert _argv(net, runner, "delete")[3] == "net-down"
    render = m.named("cluster-render")
    for h in HOSTS:
        machine = m.named(f"{h}-vm-machine")
        assert machine.parent == m.named(f"{h}-vm").urn
        assert net.urn in machine.dependencies and render.urn in machine.dependencies
        spec = VmSpec.from_json(_argv(machine, runner)[-1])
        assert (spec.host, spec.accel, spec.memory_mib) == (h, "tcg", 1024)
        assert spec.iso_build[spec.iso_build.index("--file") + 1].endswith(f"installers/{h}")
        assert spec.iso_build[spec.iso_build.index("--out-link") + 1] == spec.iso_result
        assert _argv(machine, runner, "delete")[3] == "vm-delete"
        # the normal path waits for the installed VM
        assert machine.urn in m.named(f"{h}-deploy").dependencies
    for h in ("olaf", "rolf", "karl", "ulrich"):  # the hosts without a hardware file
        assert m.named(f"{h}-vm-machine").urn in m.named(f"cluster-{h}-hardware").dependencies
    assert _argv(render, runner)[-2:] == ["--vm-stack", "mock"]


def lab_state(
    runner: str, inputs: dict[str, str], step: str = "cluster-lab-network"
) -> dict[str, Any]:
    """A stack's state holding its lab's network step (or ``step``) with these recorded
    inputs."""
    typ = STEP_TYPES[RUNNERS.index(runner)]
    urn = ("urn:pulumi:mock::k3scluster::k3scluster:index:Cluster$k3scluster:index:Lab$"
           f"{typ}::{step}")
    if runner == "python":
        outputs: dict[str, Any] = {"create": "net-up", "inputs": inputs, "stdout": ""}
    else:
        outputs = {"create": "net-up", "environment": digest_environment(inputs), "stdout": ""}
    return {urn: {"type": typ, "outputs": outputs}}


def _lab_names(m: Any, runner: str) -> tuple[str, set[tuple[str, str, str]]]:
    net = json.loads(_argv(m.named("cluster-lab-network"), runner)[-1])
    vms = [VmSpec.from_json(_argv(m.named(f"{h}-vm-machine"), runner)[-1]) for h in HOSTS]
    return net["bridge"], {(v.tap, v.name, v.tap_alias) for v in vms}


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_lab_id_is_made_once_and_kept_in_the_stacks_state(
    example_dir: Path, runner: str
) -> None:
    """The names of what the lab makes on this machine come from the stack and its lab id,
    which the network step records: the next run takes it from the state (another stack of
    the same name, in another cluster directory or Pulumi backend, has another state and
    another id). A lab made before lab ids (its network step records none) keeps the names
    it has."""
    first = run_program(example_dir, runner, vms="true", vmAccel="tcg")
    made = _digests(first.named("cluster-lab-network"), runner)["lab"]
    again = run_program(example_dir, runner, vms="true", vmAccel="tcg",
                        mocks=StateMocks(lab_state(runner, {"state": "ok", "lab": made})))
    assert _lab_names(again, runner) == _lab_names(first, runner)
    assert _digests(again.named("cluster-lab-network"), runner)["lab"] == made
    bridge, vms = _lab_names(again, runner)
    assert bridge == bridge_name("mock", made) != bridge_name("mock")
    assert vms == {(tap_name("mock", h, made), guest_name("mock", h, made),
                    link_alias("mock", h, made)) for h in HOSTS}
    other = run_program(example_dir, runner, vms="true", vmAccel="tcg")  # another stack's
    assert _lab_names(other, runner)[0] != bridge
    legacy = run_program(example_dir, runner, vms="true", vmAccel="tcg",
                         mocks=StateMocks(lab_state(runner, {"state": "ok"})))
    assert "lab" not in _digests(legacy.named("cluster-lab-network"), runner)
    assert _lab_names(legacy, runner) == (
        bridge_name("mock"),
        {(tap_name("mock", h), guest_name("mock", h), f"k3scluster:mock:{h}") for h in HOSTS},
    )


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_lab_whose_network_step_is_lost_keeps_its_id(example_dir: Path, runner: str) -> None:
    """A network replace (another gateway) deletes the old network step first; when the new
    net-up then fails, the state has the VMs and no network step. The lab id is then read
    from the machine steps, which record it too: a new id would rename every VM, tap and
    bridge, and each VM's vm-up would refuse its own directory (its manifest names the old
    lab) until the stack is destroyed. A lab made before lab ids (machine steps without
    one) keeps its names."""
    first = run_program(example_dir, runner, vms="true", vmAccel="tcg")
    made = _digests(first.named("cluster-lab-network"), runner)["lab"]
    assert _digests(first.named("olaf-vm-machine"), runner)["lab"] == made
    lost = run_program(example_dir, runner, vms="true", vmAccel="tcg", mocks=StateMocks(
        lab_state(runner, {"state": "ok", "lab": made}, step="olaf-vm-machine")))
    assert _lab_names(lost, runner) == _lab_names(first, runner)
    legacy = run_program(example_dir, runner, vms="true", vmAccel="tcg", mocks=StateMocks(
        lab_state(runner, {"state": "ok"}, step="olaf-vm-machine")))
    assert _lab_names(legacy, runner)[0] == bridge_name("mock")
    assert "lab" not in _digests(legacy.named("olaf-vm-machine"), runner)


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


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_vm_stack_reads_every_hardware_file_into_its_lab_and_never_nixconfigs(
    example_dir: Path, runner: str
) -> None:
    """ulf has nixConfigs/ulf.hardware.nix (the real machine's): a VM stack neither imports
    nor writes it; every VM's file is read into the VM's own directory of the lab."""
    lab = example_dir / ".k3scluster" / "mock-lab"
    m = run_program(example_dir, runner, vms="true", vmAccel="tcg")
    for h in HOSTS:
        fetch = m.named(f"cluster-{h}-hardware")
        argv = _argv(fetch, runner)
        assert argv[2:4] == ["k3scluster.components.tasks", "hardware"]
        assert argv[argv.index("--out") + 1] == str(lab / h / "hardware.nix")
        # the stack's own known_hosts, not ~/.ssh/known_hosts
        assert argv[argv.index("--ssh-known-hosts") + 1] == str(
            example_dir / ".k3scluster" / "mock-vm-known_hosts"
        )
        spec = VmSpec.from_json(_argv(m.named(f"{h}-vm-machine"), runner)[-1])
        assert spec.known_hosts == str(example_dir / ".k3scluster" / "mock-vm-known_hosts")
        # a new VM (another disk) is read again
        triggers = fetch.inputs["triggers"]
        assert spec.replace_keys()[0] in triggers
        digests = _digests(m.named(f"{h}-deploy"), runner)
        assert f"vmHardware:{h}" in digests
        assert not [k for k in digests if k.endswith(".hardware.nix")], digests
    assert all("nixConfigs/" not in a for r in m.registered for a in r.raw.split('"')
               if a.endswith(".hardware.nix"))


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_hardware_stack_fetches_only_missing_files_into_nixconfigs(
    example_dir: Path, runner: str
) -> None:
    m = run_program(example_dir, runner)
    fetches = {r.name for r in m.registered if r.name.endswith("-hardware")}
    assert fetches == {f"cluster-{h}-hardware" for h in HOSTS if h != "ulf"}
    argv = _argv(m.named("cluster-karl-hardware"), runner)
    assert argv[argv.index("--out") + 1] == str(example_dir / "nixConfigs" / "karl.hardware.nix")
    assert ".k3scluster/mock-lab" not in m.named("cluster-karl-hardware").raw


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_changed_configuration_changes_no_vm_step(example_dir: Path, runner: str) -> None:
    """colmena deploys a changed configuration; the VM (and the ISO it will never boot
    again) stay as they are. vmAccel auto is not probed into the spec either: a user who
    cannot open /dev/kvm previews the same VM as one who can."""
    def vm_steps(m):  # type: ignore[no-untyped-def]
        return {r.name: r.raw for r in m.registered if "-vm" in r.name or "lab" in r.name}

    state = lab_state(runner, {"state": "ok", "lab": "0123abcd"})  # the lab made before
    before = vm_steps(run_program(example_dir, runner, vms="true", vmAccel="auto",
                                  mocks=StateMocks(state)))
    with open(example_dir / "nixConfigs" / "olaf.nix", "a") as f:
        f.write("# a change colmena deploys\n")
    after = run_program(example_dir, runner, vms="true", vmAccel="auto", mocks=StateMocks(state))
    assert vm_steps(after) == before
    assert "olaf-deploy" in {r.name for r in after.registered}
    spec = VmSpec.from_json(_argv(after.named("olaf-vm-machine"), runner)[-1])
    assert spec.accel == "auto"  # resolved by vm-up on this machine, not in the spec
