"""The update's order in the Pulumi program's resource graph (Pulumi's mocks, both runners),
with what the stack deployed before read from a stand-in of the engine's state.

The engine's ``pulumi:pulumi:readStackResourceOutputs`` is answered by the mocks with deploy
steps in the shape each runner records them (``components/deployed.py`` reads them back).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pulumi
import pytest
from conftest import EXAMPLE
from test_components import (
    POISON_HASH,
    POISON_TOKEN,
    STEP_TYPES,
    Mocks,
    RecordingMonitor,
    Registration,
    run_program,
)

from k3scluster import records
from k3scluster.components.steps import digest_environment
from k3scluster.membership import host_record
from k3scluster.plans.loader import load_or_raise

RUNNERS = ["command", "python"]
HOSTS = ("olaf", "ulf", "rolf", "karl", "ulrich")


def recorded_step(
    runner: str, host: str, inputs: dict[str, str], stdout: str = ""
) -> tuple[str, dict[str, Any]]:
    """A deploy step as the state of ``runner`` records it: urn -> {type, outputs}."""
    typ = STEP_TYPES[RUNNERS.index(runner)]
    urn = f"urn:pulumi:mock::k3scluster::k3scluster:index:Cluster$k3scluster:index:Host${typ}::{host}-deploy"
    if runner == "python":
        outputs: dict[str, Any] = {
            "host": host, "create": ["colmena"], "inputs": inputs, "stdout": stdout}
    else:
        outputs = {"create": "colmena", "environment": digest_environment(inputs),
                   "stdout": stdout}
    return urn, {"type": typ, "outputs": outputs}


def deploy_stdout(host: str) -> str:
    """The last line a deploy of the example's ``host`` prints: what the stack knows the host
    as (its K3s nodes; membership reads it back)."""
    example, _ = load_or_raise(EXAMPLE)
    return records.DEPLOYED_PREFIX + json.dumps({"host": host_record(example, host)}) + "\n"


class StateMocks(Mocks):
    """Mocks whose engine answers readStackResourceOutputs with ``resources``."""

    def __init__(self, resources: dict[str, Any]) -> None:
        self.resources = resources
        self.asked: list[dict[str, Any]] = []

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list]:
        if args.token == "pulumi:pulumi:readStackResourceOutputs":
            self.asked.append(dict(args.args))
            return {"name": args.args.get("stackName"), "outputs": self.resources}, []
        return {}, []


def run_with_state(
    cluster_dir: Path, runner: str, resources: dict[str, Any], **config: str
) -> tuple[RecordingMonitor, StateMocks]:
    mocks = StateMocks(resources)
    return run_program(cluster_dir, runner, mocks=mocks, **config), mocks


@pytest.fixture
def poisoned(example_dir: Path) -> Path:
    (example_dir / "secrets" / "token").write_text(POISON_TOKEN + "\n")
    (example_dir / "secrets" / "passwd").write_text(POISON_HASH + "\n")
    return example_dir


def _argv(reg: Registration, runner: str) -> list[str]:
    value = reg.inputs["create"]
    # one shell line with either runner (a list in states of older versions)
    return shlex.split(value) if isinstance(value, str) else list(value)


def _inputs(reg: Registration, runner: str) -> dict[str, str]:
    return records.recorded_inputs(reg.type, reg.inputs)


def _deployed_at(runner: str, minor: str) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for host in HOSTS:
        versions = {}
        if host in ("olaf", "ulf", "rolf"):
            versions["k3s:server"] = minor
        if host in ("olaf", "ulf", "karl"):
            versions["k3s:agent"] = minor
        urn, rec = recorded_step(
            runner, host, {"file:hosts/x.nix": "ab", **versions}, deploy_stdout(host))
        state[urn] = rec
    return state


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_state_is_read_from_the_stack_itself(poisoned: Path, runner: str) -> None:
    _, mocks = run_with_state(poisoned, runner, {})
    assert mocks.asked == [{"stackName": "organization/k3scluster/mock"}]


@pytest.mark.parametrize("runner", RUNNERS)
def test_deploys_carry_their_k3s_releases(poisoned: Path, runner: str) -> None:
    m, _ = run_with_state(poisoned, runner, _deployed_at(runner, "1.35"))
    got = {h: _inputs(m.named(f"{h}-deploy"), runner) for h in HOSTS}
    assert (got["olaf"]["k3s:server"], got["olaf"]["k3s:agent"]) == ("1.35", "1.35")
    assert got["rolf"]["k3s:server"] == "1.35" and "k3s:agent" not in got["rolf"]
    assert got["karl"]["k3s:agent"] == "1.35" and "k3s:server" not in got["karl"]
    assert "k3s:server" not in got["ulrich"] and "k3s:agent" not in got["ulrich"]
    # nothing to hold back: no servers-first step, and the render is the plain one
    names = {r.name for r in m.registered}
    assert not {n for n in names if n.endswith("-servers-first")}
    assert "--hold-agent" not in _argv(m.named("cluster-render"), runner)


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_minor_upgrade_moves_every_server_before_any_agent(
    poisoned: Path, runner: str
) -> None:
    # the stack ran K3s 1.34 everywhere; the plans say 1.35
    m, _ = run_with_state(poisoned, runner, _deployed_at(runner, "1.34"))
    render = m.named("cluster-render")
    argv = _argv(render, runner)
    holds = [argv[i + 1] for i, a in enumerate(argv) if a == "--hold-agent"]
    assert holds == ["olaf=1.34", "ulf=1.34"]  # the server hosts that carry an agent
    first = {h: m.named(f"{h}-servers-first") for h in ("olaf", "ulf")}
    deploy = {h: m.named(f"{h}-deploy") for h in HOSTS}
    render_dir = poisoned / ".k3scluster" / "mock"
    for h, reg in first.items():
        a = _argv(reg, runner)
        colmena = a[a.index("--") + 1 :]
        assert colmena[colmena.index("-f") + 1] == str(render_dir / "servers-first" / f"{h}.nix")
        assert colmena[colmena.index("--on") + 1] == h
        ins = _inputs(reg, runner)
        assert (ins["k3s:server"], ins["k3s:agent"]) == ("1.35", "1.34")
        assert f"file:servers-first/{h}.nix" in ins
        # a render again before colmena (another clone, or a render without the held agents,
        # e.g. k3scluster build's) holds back the same agents: the hive is there again
        task = a[: a.index("--")]
        assert task[task.index("--render-out") + 1] == str(render_dir)
        assert [task[i + 1] for i, x in enumerate(task) if x == "--hold-agent"] == holds
        # its gates are a deploy's: the server's /readyz and the (old) agent's Ready
        assert f"{h}-k3s-agent" in a and "--server" in a
        assert render.urn in reg.dependencies
    # the chain: olaf's first pass, ulf's first pass, rolf (no agent: its one deploy)
    assert deploy["olaf"].urn not in first["ulf"].dependencies
    assert first["olaf"].urn in first["ulf"].dependencies
    assert first["ulf"].urn in deploy["rolf"].dependencies
    # then the agents, one host at a time (maxUnavailable 1): olaf and ulf again (from
    # hive.nix), then karl; the first strictly after the last server host (a failed server
    # stops them); ulrich (no K3s) after the server hosts
    assert deploy["rolf"].urn in deploy["olaf"].dependencies
    assert deploy["olaf"].urn in deploy["ulf"].dependencies
    assert deploy["ulf"].urn in deploy["karl"].dependencies
    assert deploy["rolf"].urn in deploy["ulrich"].dependencies
    for h in ("olaf", "ulf", "karl"):
        assert _inputs(deploy[h], runner)["k3s:agent"] == "1.35"
    # the plain deploys plan no servers-first hive: their argv (an input of the step) holds
    # no agent back, so it is the same as before the upgrade and ulrich (no K3s, nothing
    # else changed) is not deployed by it
    for h in HOSTS:
        assert "--hold-agent" not in _argv(deploy[h], runner), h


def test_host_versions_take_the_newer_of_a_hosts_two_steps() -> None:
    steps = {
        # the servers-first pass ran, the deploy after it failed (it keeps its old inputs)
        "olaf-servers-first": {"k3s:server": "1.35", "k3s:agent": "1.34"},
        "olaf-deploy": {"k3s:server": "1.34", "k3s:agent": "1.34"},
        "karl-deploy": {"k3s:agent": "1.9"},
        "ulrich-deploy": {"modules": "base.nix cluster.nix @ ab"},  # no K3s
        "rolf-deploy": {"k3s:server": "1.10"},
    }
    got = records.host_versions(steps, ["olaf", "karl", "ulrich", "rolf", "new"])
    assert got == {
        "olaf": records.HostVersions("1.35", "1.34"),
        "karl": records.HostVersions(None, "1.9"),
        "rolf": records.HostVersions("1.10", None),  # 1.10 is newer than 1.9: numbers
        "ulrich": records.HostVersions(None, None),  # deployed, no K3s release recorded
    }


def test_host_versions_of_a_state_that_did_not_record_them() -> None:
    import hashlib

    from k3scluster.membership import deployed_from_records

    def sha(minor: str) -> str:
        return hashlib.sha256(minor.encode()).hexdigest()

    steps = {
        # k3scluster before k3s:server/k3s:agent: the digest of the plan's release (whole or
        # short), here on the host of a server and an agent, and an agent's own host
        "olaf-deploy": {"version:k3s": sha("1.33"), "file:modules/k3s-common.nix": "ab"},
        "karl-deploy": {"version:k3s": sha("1.32")[:12]},
        # older still: the digest of the release tag k3s: named (the default then); its minor
        "berta-deploy": {"version:k3s": sha("v1.31.12+k3s1"), "file:modules/k3s-common.nix": "ab"},
        # nothing that tells: the K3s module in its modules (or no record of them at all)
        "ulf-deploy": {"modules": "base.nix cluster.nix k3s-common.nix @ 0a1b2c3d4e5f"},
        "rolf-deploy": {},
        # no K3s module: no K3s on it
        "ulrich-deploy": {"modules": "base.nix cluster.nix @ 0a1b2c3d4e5f"},
        "anton-deploy": {},  # its record says it ran no K3s node
    }
    deployed = deployed_from_records([
        {"name": "karl", "ip": "10.0.100.5", "nodes": [
            {"name": "karl-k3s-agent", "type": "agent", "ip": "10.0.100.50"}]},
        {"name": "anton", "ip": "10.0.100.9", "nodes": []},
    ])
    got = records.host_versions(steps, [s.removesuffix("-deploy") for s in steps], deployed)
    assert got == {
        "olaf": records.HostVersions("1.33", "1.33"),
        "karl": records.HostVersions(None, "1.32"),  # its record: an agent only
        "berta": records.HostVersions("1.31", "1.31"),
        "ulf": records.HostVersions(unknown=True),
        "rolf": records.HostVersions(unknown=True),
        "ulrich": records.HostVersions(),
        "anton": records.HostVersions(),
    }
    assert records.minor_of_digest("deadbeef") is None and records.minor_of_digest("") is None
    assert records.minor_of_digest(sha("v1.28.3+k3s2")[:12]) == "1.28"


def test_step_inputs_are_read_from_either_runners_state() -> None:
    inputs = {"k3s:agent": "1.34", "file:hosts/olaf.nix": "ab"}
    for runner in RUNNERS:
        urn, rec = recorded_step(runner, "olaf", inputs)
        assert records.step_inputs([(urn, rec["type"], rec["outputs"])]) == {"olaf-deploy": inputs}
    # other resources are left out
    assert records.step_inputs([("urn:x::cluster", "k3scluster:index:Host", {})]) == {}


def add_agent_hosts(cluster_dir: Path, names: list[str]) -> None:
    """More agent-only hosts in the example (hosts.csv, k3s.csv, a hardware file each)."""
    hosts = cluster_dir / "plans" / "hosts.csv"
    k3s = cluster_dir / "plans" / "k3s.csv"
    for i, name in enumerate(names):
        with hosts.open("a") as f:
            f.write(f"{name},eno1,10.0.100.{30 + i},manfred,,efi,shelf\n")
        with k3s.open("a") as f:
            f.write(f"{name},{name}-k3s-agent,agent,10.0.100.{60 + i}\n")
        (cluster_dir / "nixConfigs" / f"{name}.hardware.nix").write_text("{ ... }: { }\n")


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(("max_unavailable", "batches"), [
    (None, [["karl"], ["anton"], ["bruno"], ["carl"]]),
    ("2", [["karl", "anton"], ["bruno", "carl"]]),
    ("4", [["karl", "anton", "bruno", "carl"]]),
])
def test_agent_hosts_move_at_most_max_unavailable_at_a_time(
    poisoned: Path, runner: str, max_unavailable: str | None, batches: list[list[str]]
) -> None:
    add_agent_hosts(poisoned, ["anton", "bruno", "carl"])
    config = {"maxUnavailable": max_unavailable} if max_unavailable else {}
    m, _ = run_with_state(poisoned, runner, {}, **config)
    urn = {h: m.named(f"{h}-deploy").urn for h in [*HOSTS, "anton", "bruno", "carl"]}
    deps = {h: set(m.named(f"{h}-deploy").dependencies) for h in urn}
    chain = {urn["olaf"], urn["ulf"], urn["rolf"]}
    agents = [h for b in batches for h in b]
    for k, batch in enumerate(batches):
        for h in batch:
            others = {urn[a] for a in agents if a != h}
            if k == 0:  # the first batch waits for the server hosts (all of them, settled)
                assert chain <= deps[h] and not (deps[h] & others), h
            else:  # each later batch waits for the whole batch before it, and nothing else
                assert deps[h] & (others | chain) == {urn[a] for a in batches[k - 1]}, h
    assert chain <= deps["ulrich"] and not ({urn[a] for a in agents} & deps["ulrich"])


@pytest.mark.parametrize("runner", RUNNERS)
def test_reboot_auto_moves_agent_hosts_one_at_a_time_and_passes_the_reboot_timeout(
    poisoned: Path, runner: str
) -> None:
    add_agent_hosts(poisoned, ["anton", "bruno"])
    m, _ = run_with_state(poisoned, runner, {}, maxUnavailable="2", reboot="auto",
                          rebootTimeout="10m")
    urn = {h: m.named(f"{h}-deploy").urn for h in [*HOSTS, "anton", "bruno"]}
    deps = {h: set(m.named(f"{h}-deploy").dependencies) for h in urn}
    # karl, anton, bruno: each after the one before, never two together
    assert urn["karl"] in deps["anton"] and urn["anton"] in deps["bruno"]
    assert urn["karl"] not in deps["bruno"]
    for h in urn:
        argv = _argv(m.named(f"{h}-deploy"), runner)
        assert argv[argv.index("--reboot-timeout") + 1] == "600", h
    # never (the default): the argv of today, no reboot
    m, _ = run_with_state(poisoned, runner, {}, maxUnavailable="2")
    assert all("--reboot-timeout" not in _argv(m.named(f"{h}-deploy"), runner) for h in urn)
    assert urn["karl"] not in set(m.named("anton-deploy").dependencies)


@pytest.mark.parametrize(("config", "words"), [
    ({"reboot": "always"}, "k3scluster:reboot is 'always'; it must be one of never, auto"),
    ({"reboot": "auto", "rebootTimeout": "soon"}, "k3scluster:rebootTimeout is 'soon'"),
    ({"reboot": "auto", "waitReady": "false"},
     "k3scluster:reboot is 'auto' but k3scluster:waitReady is false"),
])
def test_bad_reboot_settings_are_refused(
    poisoned: Path, config: dict[str, str], words: str
) -> None:
    with pytest.raises(Exception, match=re.escape(words)):
        run_with_state(poisoned, "python", {}, **config)


def test_max_unavailable_below_one_is_refused(poisoned: Path) -> None:
    with pytest.raises(Exception, match="maxUnavailable is 0; it must be at least 1"):
        run_with_state(poisoned, "python", {}, maxUnavailable="0")


@pytest.mark.parametrize("runner", RUNNERS)
def test_an_etcd_snapshot_comes_before_the_first_server_host(poisoned: Path, runner: str) -> None:
    m, _ = run_with_state(poisoned, runner, _deployed_at(runner, "1.35"))
    snap = m.named("cluster-etcd-snapshot")
    argv = _argv(snap, runner)
    assert argv[1:4] == ["-m", "k3scluster.components.tasks", "snapshot"]
    assert argv[argv.index("--stack") + 1] == "mock"
    servers = [argv[i + 1] for i, a in enumerate(argv) if a == "--server"]
    assert servers == ["olaf=10.0.100.2", "ulf=10.0.100.3", "rolf=10.0.100.4"]  # deploy order
    # the first server host's deploy waits for it; the snapshot waits for no host
    assert snap.urn in m.named("olaf-deploy").dependencies
    assert not any(m.named(f"{h}-deploy").urn in snap.dependencies for h in HOSTS)
    # its inputs are the server hosts' deploys: it runs when one of them will
    ins = _inputs(snap, runner)
    assert set(ins) == {"deploy:olaf", "deploy:ulf", "deploy:rolf", "k3s:server:olaf",
                        "k3s:agent:olaf", "k3s:server:ulf", "k3s:agent:ulf", "k3s:server:rolf"}


@pytest.mark.parametrize("runner", RUNNERS)
def test_no_snapshot_for_a_new_cluster_or_when_turned_off(poisoned: Path, runner: str) -> None:
    m, _ = run_with_state(poisoned, runner, {})
    assert not [r for r in m.registered if r.name == "cluster-etcd-snapshot"]
    m, _ = run_with_state(poisoned, runner, _deployed_at(runner, "1.35"),
                          snapshotBeforeServers="false")
    assert not [r for r in m.registered if r.name == "cluster-etcd-snapshot"]


def test_a_server_hosts_change_changes_the_snapshots_inputs(poisoned: Path) -> None:
    state = _deployed_at("python", "1.35")
    before = _inputs(run_with_state(poisoned, "python", state)[0].named("cluster-etcd-snapshot"),
                     "python")
    conf = poisoned / "nixConfigs" / "ulf.nix"
    conf.write_text((conf.read_text() if conf.exists() else "{ ... }: { }\n") + "# changed\n")
    after = _inputs(run_with_state(poisoned, "python", state)[0].named("cluster-etcd-snapshot"),
                    "python")
    assert [k for k in after if after[k] != before.get(k)] == ["deploy:ulf"]


class RacingStateMocks(StateMocks):
    """The engine as the file backend answers while it writes a checkpoint: gocloud.dev's
    fileblob writes the checkpoint's sidecar ``<stack>.json.attrs`` in place (truncate, then
    the JSON), so a read in between decodes an empty file; the first ``failing`` reads fail
    with the engine's own message."""

    def __init__(self, resources: dict[str, Any], failing: int) -> None:
        super().__init__(resources)
        self.failing = failing

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list]:
        if args.token == "pulumi:pulumi:readStackResourceOutputs" and self.failing:
            self.failing -= 1
            self.asked.append(dict(args.args))
            return {}, [("stackName", "failed to load checkpoint: EOF")]
        return super().call(args)


@pytest.mark.parametrize("runner", ["python"])
def test_a_read_of_the_state_while_the_engine_writes_it_is_asked_again(
    poisoned: Path, runner: str
) -> None:
    mocks = RacingStateMocks(_deployed_at(runner, "1.35"), failing=2)
    m = run_program(poisoned, runner, mocks=mocks)
    assert len(mocks.asked) == 3
    # what the third read returned is what the plan used
    assert _inputs(m.named("olaf-deploy"), runner)["k3s:server"] == "1.35"


def test_a_state_that_cannot_be_read_stops_the_program_and_says_so(poisoned: Path) -> None:
    mocks = RacingStateMocks(_deployed_at("python", "1.35"), failing=100)
    with pytest.raises(Exception, match="cannot read this stack's state"):
        run_program(poisoned, "python", mocks=mocks)
    assert 2 <= len(mocks.asked) < 100


def _host_digest(host: str, digest: str) -> tuple[str, dict[str, Any]]:
    """The Host component's record of the system its last deploy installed (its digest)."""
    urn = f"urn:pulumi:mock::k3scluster::k3scluster:index:Cluster${records.HOST_TYPE}::{host}"
    return urn, {"type": records.HOST_TYPE, "outputs": {"digest": digest}}


@pytest.mark.parametrize("runner", ["python"])
def test_without_gates_a_server_change_says_no_snapshot_is_taken(
    poisoned: Path, runner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # waitReady false: no snapshot step (it goes over ssh as the gates do), and the server
    # hosts that change are named in a warning instead of passing silently
    state = _deployed_at(runner, "1.35")
    state.update(dict(_host_digest(h, "0" * 64) for h in HOSTS))  # every system changes
    warned: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda msg, *a, **k: warned.append(msg))
    m, _ = run_with_state(poisoned, runner, state, waitReady="false")
    assert not [r for r in m.registered if r.name == "cluster-etcd-snapshot"]
    said = [w for w in warned if "no etcd snapshot" in w]
    assert len(said) == 1 and "before olaf, ulf, rolf change" in said[0], warned
    assert "k3scluster:snapshotBeforeServers false" in said[0]
    # turned off knowingly, or gates on (the snapshot step is there): no such warning
    warned.clear()
    run_with_state(poisoned, runner, state, waitReady="false", snapshotBeforeServers="false")
    assert not [w for w in warned if "no etcd snapshot" in w]
    m, _ = run_with_state(poisoned, runner, state)
    assert m.named("cluster-etcd-snapshot") is not None
    assert not [w for w in warned if "no etcd snapshot" in w]


def _snapshot_step(runner: str, inputs: dict[str, str], taken_at: str) -> tuple[str, dict[str, Any]]:
    """The snapshot step as the state records it after it took a snapshot at ``taken_at``."""
    typ = STEP_TYPES[RUNNERS.index(runner)]
    urn = f"urn:pulumi:mock::k3scluster::k3scluster:index:Cluster${typ}::cluster-etcd-snapshot"
    stdout = records.SNAPSHOT_PREFIX + json.dumps({"name": "mock-1", "takenAt": taken_at}) + "\n"
    if runner == "python":
        outputs: dict[str, Any] = {"create": "x", "inputs": inputs, "stdout": stdout}
    else:
        outputs = {"create": "x", "environment": digest_environment(inputs), "stdout": stdout}
    return urn, {"type": typ, "outputs": outputs}


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_server_change_whose_deploy_failed_gets_a_snapshot_again(
    poisoned: Path, runner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from k3scluster import render

    systems: dict[str, Any] = {}  # host -> its inputs, as the program computes them
    host_inputs = render.host_inputs

    def recorded(cluster: Any, host: str, *args: Any, **kw: Any) -> Any:
        systems[host] = host_inputs(cluster, host, *args, **kw)
        return systems[host]

    monkeypatch.setattr(render, "host_inputs", recorded)

    for h in HOSTS:  # fetched by an earlier run (a fetch of this run: its digest is unknown)
        hw = poisoned / "nixConfigs" / f"{h}.hardware.nix"
        if not hw.exists():
            hw.write_text("{ ... }: { }\n")
    # run 1 took the snapshot, then a server host's deploy failed: the state keeps the
    # snapshot's new inputs and the hosts' old systems (their Host digests are older)
    state = _deployed_at(runner, "1.35")
    state.update(dict(_host_digest(h, "0" * 64) for h in HOSTS))
    first = _inputs(run_with_state(poisoned, runner, state)[0].named("cluster-etcd-snapshot"),
                    runner)
    assert "again" not in first
    state.update([_snapshot_step(runner, first, "2026-12-06T10:00:00Z")])
    second = _inputs(run_with_state(poisoned, runner, state)[0].named("cluster-etcd-snapshot"),
                     runner)
    # the next run changes that host again: its snapshot step runs again, first
    assert second == {**first, "again": "2026-12-06T10:00:00Z"}

    # the deploys then passed (the Host digests are the systems now): the value is kept, the
    # step's inputs are what it recorded, and no snapshot is taken without a server change
    state.update(dict(_host_digest(h, render.host_digest(systems[h])) for h in HOSTS))
    state.update([_snapshot_step(runner, second, "2026-12-06T10:05:00Z")])
    third = _inputs(run_with_state(poisoned, runner, state)[0].named("cluster-etcd-snapshot"),
                    runner)
    assert third == second


@pytest.mark.parametrize("runner", RUNNERS)
def test_the_servers_the_stack_deployed_change_no_deploy_step(
    poisoned: Path, runner: str
) -> None:
    # the servers the stack deployed reach a reinstalled server's deploy at run time
    # (k3scluster/deployedservers.py), never as an input of a step: a server that joined
    # (ulf, rolf) changes no host's deploy step, so nothing is deployed again for it
    plans_minor = load_or_raise(poisoned)[0].network.k3s
    everyone = _deployed_at(runner, plans_minor)
    only_olaf = {urn: rec for urn, rec in everyone.items() if urn.endswith("::olaf-deploy")}
    written = poisoned / ".k3scluster" / "mock-deployed-servers.json"
    m_one, _ = run_with_state(poisoned, runner, only_olaf)
    assert [s["host"] for s in json.loads(written.read_text())["servers"]] == ["olaf"]
    m_all, _ = run_with_state(poisoned, runner, everyone)
    assert sorted(s["host"] for s in json.loads(written.read_text())["servers"]) == [
        "olaf", "rolf", "ulf"]
    for host in HOSTS:
        one, every = m_one.named(f"{host}-deploy"), m_all.named(f"{host}-deploy")
        assert one.inputs == every.inputs, host
