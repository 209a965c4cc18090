"""The Pulumi program's resource graph, with Pulumi's mocks (no engine), for both runners.

A recording monitor keeps what the program registers — type, name, parent, dependencies,
inputs as sent (secrets still wrapped) and additional secret outputs — so the tests see the
graph the engine would see.
"""

from __future__ import annotations

import collections
import json
import os
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pytest
from pulumi.runtime import mocks as pmocks
from pulumi.runtime import rpc

from k3scluster.components import runner as runner_mod
from k3scluster.components.runner import StepFailed, StepProvider, mask
from k3scluster.components.steps import digest_environment
from k3scluster.records import step_values

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "__main__.py"
POISON_TOKEN = "POISON-TOKEN-k3scluster-must-never-leak-0123456789"
POISON_HASH = "$6$poisonSALT$POISONhashMUSTneverLEAK0123456789abcdefghijklmnopqrstuvwxyz"
STEP_TYPES = ("command:local:Command", "pulumi-python:dynamic/k3scluster:Step")


@dataclass
class Registration:
    type: str
    name: str
    urn: str
    parent: str
    dependencies: list[str]
    secret_outputs: list[str]
    raw: str  # the inputs as the engine would receive them, secrets still wrapped (JSON)
    inputs: dict[str, Any]  # plain
    provider: str = ""  # the provider reference (urn::id) of a custom resource, if explicit


class Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        state = dict(args.inputs)
        if args.typ in STEP_TYPES:
            state.setdefault("stdout", "")
            state.setdefault("stderr", "")
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list]:
        return {}, []


class RecordingMonitor(pmocks.MockMonitor):
    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.registered: list[Registration] = []

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            from google.protobuf import json_format

            raw = json.dumps(json_format.MessageToDict(request.object), sort_keys=True)
            self.registered.append(
                Registration(
                    type=request.type,
                    name=request.name,
                    urn=response.urn,
                    parent=request.parent,
                    dependencies=list(request.dependencies),
                    secret_outputs=list(request.additionalSecretOutputs),
                    raw=raw,
                    inputs=rpc.deserialize_properties(request.object),
                    provider=request.provider,
                )
            )
        return response

    def by_type(self, typ: str) -> list[Registration]:
        return [r for r in self.registered if r.type == typ]

    def named(self, name: str) -> Registration:
        found = [r for r in self.registered if r.name == name]
        assert len(found) == 1, (name, [r.name for r in self.registered])
        return found[0]


def run_program(
    cluster_dir: Path | str,
    runner: str,
    main: Path = PROGRAM,
    mocks: pulumi.runtime.Mocks | None = None,
    **config: str,
) -> RecordingMonitor:
    """Runs the program under ``mocks`` (default: ``Mocks``, a stack with no state)."""
    mocks = mocks or Mocks()
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(
        mocks, project="k3scluster", stack="mock", preview=False, monitor=monitor
    )
    pulumi.runtime.set_all_config(
        {
            "k3scluster:clusterDir": str(cluster_dir),
            "k3scluster:runner": runner,
            **{f"k3scluster:{k}": v for k, v in config.items()},
        }
    )

    @pulumi.runtime.test
    def program() -> None:
        runpy.run_path(str(main), run_name="__main__")

    program()
    return monitor


@pytest.fixture
def poisoned(example_dir: Path) -> Path:
    """The example cluster with a recognisable token and password hash."""
    (example_dir / "secrets" / "token").write_text(POISON_TOKEN + "\n")
    (example_dir / "secrets" / "agent-token").write_text(POISON_TOKEN + "-agent\n")
    (example_dir / "secrets" / "passwd").write_text(POISON_HASH + "\n")
    return example_dir


RUNNERS = ["command", "python"]


@pytest.mark.parametrize("runner", RUNNERS)
def test_one_component_per_plan_row(poisoned: Path, runner: str) -> None:
    m = run_program(poisoned, runner)
    counts = collections.Counter(r.type for r in m.registered)
    assert counts["k3scluster:index:Cluster"] == 1
    assert counts["k3scluster:index:Host"] == 5
    assert counts["k3scluster:index:K3sServer"] == 3
    assert counts["k3scluster:index:K3sAgent"] == 3
    # no InstallerIso: buildIsos is off, it would build nothing and only lengthen the preview
    assert counts["k3scluster:index:InstallerIso"] == 0
    # token, agent token, passwd, two public keys
    assert counts["k3scluster:index:Secret"] == 5
    servers = {r.name for r in m.by_type("k3scluster:index:K3sServer")}
    assert servers == {"olaf-k3s-server", "ulf-k3s-server", "rolf-k3s-server"}
    step_type = STEP_TYPES[RUNNERS.index(runner)]
    steps = {r.name for r in m.by_type(step_type)}
    # a deploy per host, one render, hardware fetches for the hosts without a file, no ISO
    # builds (buildIsos is off), the kubeconfig (waitReady is on by default)
    assert steps == {
        *(f"{h}-deploy" for h in ("olaf", "ulf", "rolf", "karl", "ulrich")),
        "cluster-render",
        "cluster-kubeconfig",
        *(f"cluster-{h}-hardware" for h in ("olaf", "rolf", "karl", "ulrich")),
    }


@pytest.mark.parametrize("runner", RUNNERS)
def test_parents(poisoned: Path, runner: str) -> None:
    m = run_program(poisoned, runner)
    cluster = m.named("cluster")
    olaf = m.named("olaf")
    assert olaf.parent == cluster.urn
    assert m.named("olaf-deploy").parent == olaf.urn
    assert m.named("olaf-k3s-server").parent == olaf.urn
    assert m.named("olaf-k3s-agent").parent == olaf.urn
    assert m.named("cluster-render").parent == cluster.urn
    for r in m.by_type("k3scluster:index:Secret"):
        assert r.parent == cluster.urn


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("wait_ready", ["true", "false"])
def test_rolling_order_one_server_host_at_a_time(
    poisoned: Path, runner: str, wait_ready: str
) -> None:
    m = run_program(poisoned, runner, waitReady=wait_ready)
    urn = {h: m.named(f"{h}-deploy").urn for h in ("olaf", "ulf", "rolf", "karl", "ulrich")}
    render = m.named("cluster-render").urn
    deps = {h: set(m.named(f"{h}-deploy").dependencies) for h in urn}
    # olaf holds the init-server: it waits for nothing but the render and its hardware
    assert deps["olaf"] == {render, m.named("cluster-olaf-hardware").urn}
    # then each other server host alone, after the one before it (its gate is in its deploy)
    # ulf already has nixConfigs/ulf.hardware.nix: no fetch for it
    assert deps["ulf"] == {render, urn["olaf"]}
    assert deps["rolf"] == {render, m.named("cluster-rolf-hardware").urn, urn["ulf"]}
    for h in ("karl", "ulrich"):  # no server on them: after the whole server chain
        assert {urn["olaf"], urn["ulf"], urn["rolf"], render} <= deps[h]
        assert not ({urn["karl"], urn["ulrich"]} & deps[h])
    # the render does not wait for the hardware fetches: a failed fetch stops its host only
    # (each host's deploy waits for its own fetch; see test_hardware_fetch.py)
    assert not set(m.named("cluster-render").dependencies) & {
        m.named(f"cluster-{h}-hardware").urn for h in ("olaf", "rolf", "karl", "ulrich")
    }
    kubeconfig = [r for r in m.registered if r.name == "cluster-kubeconfig"]
    if wait_ready == "true":
        assert kubeconfig and urn["olaf"] in kubeconfig[0].dependencies
    else:
        assert not kubeconfig


def _argv(reg: Registration, runner: str, which: str = "create") -> list[str]:
    if runner == "python" and which == "update" and "update" not in reg.inputs:
        which = "create"  # the python runner's update runs create when no update is set
    value = reg.inputs[which]
    # one line each (a list in states of older versions)
    return shlex.split(value) if isinstance(value, str) else list(value)


def _digests(reg: Registration, runner: str) -> dict[str, str]:
    if runner == "python":
        return dict(reg.inputs["inputs"])
    # (a secret in the environment makes local.Command's whole environment map secret)
    env = rpc.unwrap_rpc_secret(reg.inputs["environment"])
    return dict(v.split("=", 1) for k, v in env.items() if k.startswith("K3SCLUSTER_IN_"))


@pytest.mark.parametrize("runner", RUNNERS)
def test_deploy_step_runs_colmena_for_its_host(poisoned: Path, runner: str) -> None:
    m = run_program(poisoned, runner, colmena="/opt/colmena", parallel="2", waitReady="false")
    render_dir = poisoned / ".k3scluster" / "mock"
    for host in ("olaf", "karl"):
        reg = m.named(f"{host}-deploy")
        colmena = ["/opt/colmena", "apply", "switch", "--on", host, "-f",
                   str(render_dir / "hive.nix"), "-p", "2"]
        argv = _argv(reg, runner)
        # the deploy task checks the render, then runs colmena alone (no gates)
        assert argv[1:4] == ["-m", "k3scluster.components.tasks", "deploy"]
        assert argv[argv.index("--render-out") + 1] == str(render_dir)
        assert argv[argv.index("--no-gates") + 1 :] == ["--", *colmena]
        assert _argv(reg, runner, "update") == argv
        assert "NOT wiped" in " ".join(_argv(reg, runner, "delete"))
        digests = _digests(reg, runner)
        assert f"file:hosts/{host}.nix" in digests
        assert digests["secret:passwd-manfred"] == _sha(POISON_HASH + "\n")[:12]  # short


@pytest.mark.parametrize("runner", RUNNERS)
def test_gates_wrap_colmena_with_the_hosts_k3s_nodes(poisoned: Path, runner: str) -> None:
    key = poisoned / "id_test"
    key.write_text("not read here\n")
    m = run_program(
        poisoned, runner, colmena="/opt/colmena", readyTimeout="90s", sshIdentity=str(key)
    )
    render_dir = poisoned / ".k3scluster" / "mock"
    colmena = ["/opt/colmena", "apply", "switch", "--on", "olaf", "-f",
               str(render_dir / "hive.nix"), "-p", "4"]
    argv = _argv(m.named("olaf-deploy"), runner)
    assert argv[argv.index("--") + 1 :] == colmena
    head = argv[: argv.index("--")]
    assert head[1:4] == ["-m", "k3scluster.components.tasks", "deploy"]

    def opts(name: str) -> list[str]:
        return [head[i + 1] for i, a in enumerate(head) if a == name]

    assert opts("--host") == ["olaf"] and opts("--ip") == ["10.0.100.2"]
    assert opts("--timeout") == ["90"]
    assert opts("--server") == ["olaf-k3s-server=10.0.100.10"]
    assert opts("--agent") == ["olaf-k3s-agent"]
    # every server's API and host, the init-server's first (issue 19 item 5)
    assert opts("--api") == [f"https://10.0.100.{i}:6443" for i in (10, 12, 14)]
    assert opts("--credentials-from") == ["10.0.100.2", "10.0.100.3", "10.0.100.4"]
    assert opts("--ssh-identity") == [str(key)]
    karl = _argv(m.named("karl-deploy"), runner)
    assert "--server" not in karl and karl[karl.index("--agent") + 1] == "karl-k3s-agent"
    ulrich = _argv(m.named("ulrich-deploy"), runner)  # no K3s: read back, nothing to wait for
    assert "--server" not in ulrich and "--agent" not in ulrich and "--api" not in ulrich
    # refresh reads the host back (python runner; local.Command has no read)
    reg = m.named("rolf-deploy")
    if runner == "python":
        read = shlex.split(reg.inputs["read"])
        assert read[3] == "observe" and read[read.index("--ip") + 1] == "10.0.100.4"
        assert [read[i + 1] for i, a in enumerate(read) if a == "--unit"] == [
            "container@k3s-server.service"
        ]
    else:
        assert "read" not in reg.inputs


@pytest.mark.parametrize("runner", RUNNERS)
def test_kubeconfig_step_output_is_secret(poisoned: Path, runner: str) -> None:
    m = run_program(poisoned, runner, kubeconfigPath="/tmp/k3scluster-mock-kubeconfig")
    reg = m.named("cluster-kubeconfig")
    argv = _argv(reg, runner)
    assert argv[3] == "kubeconfig"
    assert argv[argv.index("--ip") + 1] == "10.0.100.2"
    assert argv[argv.index("--server") + 1] == "https://10.0.100.10:6443"
    assert argv[argv.index("--name") + 1] == "mock"
    assert argv[argv.index("--out") + 1] == "/tmp/k3scluster-mock-kubeconfig"
    # a context of its own for each other server, in server order
    others = [argv[i + 1] for i, a in enumerate(argv) if a == "--other-server"]
    assert others == ["ulf-k3s-server=10.0.100.12", "rolf-k3s-server=10.0.100.14"]
    assert reg.secret_outputs == ["stdout"]
    if runner == "command":
        assert reg.inputs["logging"] == "stderr"  # progress shown, the kubeconfig never
    else:
        assert reg.inputs["wholeOutput"] is True


@pytest.mark.parametrize(("runner", "processes", "want"), [
    ("python", None, 0),  # default: one process (the default provider): previews stay cheap
    ("python", "2", 2),
    ("python", "3", 3),
    ("python", "1", 0),  # one process: the default provider, as before
    ("command", "3", 0),  # pulumi-command has no 4-request limit
])
def test_deploys_spread_over_runner_processes(
    poisoned: Path, runner: str, processes: str | None, want: int
) -> None:
    m = run_program(poisoned, runner, **({"runnerProcesses": processes} if processes else {}))
    pool = [r for r in m.registered if r.type == "pulumi:providers:pulumi-python"]
    assert sorted(r.name for r in pool) == [f"cluster-runner-{i}" for i in range(want)]
    deploys = [m.named(f"{h}-deploy") for h in ("olaf", "ulf", "rolf", "karl", "ulrich")]
    if not want:
        assert all(not r.provider for r in deploys)
        return
    # one resource per host, round robin over the pool in the deploy order (a reference is
    # <provider urn>::<id>, the urn ends in the provider's name)
    names = [r.provider.rsplit("::", 1)[0].split("::")[-1] for r in deploys]
    assert names == [f"cluster-runner-{i % want}" for i in range(5)]
    # everything else keeps the default provider
    assert not m.named("cluster-render").provider
    assert not m.named("cluster-kubeconfig").provider


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("runner", RUNNERS)
def test_no_secret_anywhere_in_the_graph(poisoned: Path, runner: str) -> None:
    m = run_program(poisoned, runner, buildIsos="true")
    assert m.by_type(STEP_TYPES[RUNNERS.index(runner)])
    for reg in m.registered:
        for poison in (POISON_TOKEN, POISON_HASH, "POISONhash"):
            assert poison not in reg.raw, (reg.name, poison)
    # the tokens are known by their digests only
    token = [r for r in m.by_type("k3scluster:index:Secret") if r.name.endswith("token")]
    assert sorted(r.name for r in token) == ["cluster-secrets-agent-token", "cluster-secrets-token"]


@pytest.mark.parametrize("runner", RUNNERS)
def test_iso_build_steps_when_enabled(poisoned: Path, runner: str) -> None:
    m = run_program(poisoned, runner, buildIsos="true", nix="/opt/nix")
    reg = m.named("olaf-installer-build")
    assert reg.parent == m.named("olaf-installer").urn
    assert m.named("olaf-installer").parent == m.named("olaf").urn
    assert len(m.by_type("k3scluster:index:InstallerIso")) == 5
    argv = _argv(reg, runner)
    assert argv[argv.index("--") + 1] == "/opt/nix"
    assert m.named("cluster-render").urn in reg.dependencies
    digests = _digests(reg, runner)
    assert "file:installers/olaf/default.nix" in digests
    assert not any(k.startswith("file:installers/ulf/") for k in digests)
    assert "file:hosts/olaf.nix" in digests


def test_plan_errors_end_the_run_with_every_diagnostic(example_dir: Path) -> None:
    hosts = example_dir / "plans" / "hosts.csv"
    lines = hosts.read_text().splitlines()
    lines[1] = lines[1].replace("10.0.100.2", "10.0.100.999")
    lines[2] = lines[2].replace("enp1s0", "")
    hosts.write_text("\n".join(lines) + "\n")
    with pytest.raises(pulumi.RunError) as err:
        run_program(example_dir, "python")
    text = str(err.value)
    assert "plans/hosts.csv:2" in text and "plans/hosts.csv:3" in text
    assert "Traceback" not in text


def test_unknown_runner_is_a_clean_error(example_dir: Path) -> None:
    with pytest.raises(pulumi.RunError, match="k3scluster:runner"):
        run_program(example_dir, "shell")


# --- steps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", RUNNERS)
def test_secret_environment_stays_out_of_commands(runner: str) -> None:
    monitor = RecordingMonitor(Mocks())
    pulumi.runtime.set_mocks(Mocks(), preview=False, monitor=monitor)
    from k3scluster.components.steps import step

    @pulumi.runtime.test
    def program() -> None:
        step(
            "s",
            runner=runner,
            host="olaf",
            create=["tool", "--flag", "it's; rm -rf /"],
            secret_environment={"K3S_TOKEN": pulumi.Output.from_input(POISON_TOKEN)},
            environment={"PLAIN": "1"},
            inputs_digest={"a/b.nix": "00"},
        )

    program()
    reg = monitor.named("s")
    assert POISON_TOKEN not in json.dumps(reg.inputs["create"])
    # the value travels only as a secret (wrapped), never as a plain string
    raw = json.loads(reg.raw)
    assert POISON_TOKEN not in _plain_strings(raw)
    assert POISON_TOKEN in reg.raw
    assert _argv(reg, runner) == ["tool", "--flag", "it's; rm -rf /"]
    assert _digests(reg, runner) == {"a/b.nix": "00"}


def _plain_strings(value: Any, inside_secret: bool = False) -> list[str]:
    """Every string in a serialized property map that is not inside a secret wrapper."""
    if isinstance(value, dict):
        if value.get(rpc._special_sig_key) == rpc._special_secret_sig:
            return []
        return [s for v in value.values() for s in _plain_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _plain_strings(v)]
    return [value] if isinstance(value, str) else []


def test_digest_environment_names_are_distinct() -> None:
    env = digest_environment({"a-b": "1", "a.b": "2", "file:x/y.nix": "3"})
    assert sorted(env.values()) == ["a-b=1", "a.b=2", "file:x/y.nix=3"]
    assert all(k.startswith("K3SCLUSTER_IN_") and k.replace("_", "").isalnum() for k in env)


def _props(**kw: Any) -> dict[str, Any]:
    base = {"host": "olaf", "create": ["true"], "update": None, "delete": None,
            "environment": {}, "secretEnvironment": {}, "triggers": [], "inputs": {}, "dir": None}
    return {**base, **kw}


def test_runner_create_captures_output(tmp_path: Path) -> None:
    props = _props(
        create=[sys.executable, "-c", "import os; print(os.environ['A'], os.getcwd())"],
        environment={"A": "plain"},
        dir=str(tmp_path),
    )
    result = StepProvider().create(props)
    assert result.outs["stdout"].strip() == f"plain {tmp_path}"


def test_runner_failure_names_host_argv_and_output_tail_with_secrets_masked() -> None:
    script = "import os, sys; print('x' * 9000); print('leak', os.environ['T']); sys.exit(3)"
    props = _props(
        create=[sys.executable, "-c", script],
        secretEnvironment={"T": POISON_TOKEN},
    )
    with pytest.raises(StepFailed) as err:
        StepProvider().create(props)
    text = str(err.value)
    assert text.startswith("host olaf: create failed with exit code 3: ")
    assert "import os, sys" in text  # the argv
    assert "leak [secret]" in text  # the tail, masked
    assert POISON_TOKEN not in text
    assert len(text) < runner_mod.TAIL_CHARS + 1000


def test_a_deploy_step_names_its_host_once(poisoned: Path) -> None:
    """A deploy's command names its host (``--host olaf``): the step records no ``host``
    property as well (one line less per host in a preview); a step whose command does not
    name it (the hardware fetch) keeps it."""
    m = run_program(poisoned, "python")
    assert "host" not in m.named("olaf-deploy").inputs
    assert m.named("cluster-rolf-hardware").inputs["host"] == "rolf"
    assert "host" not in m.named("cluster-render").inputs


def test_runner_messages_name_the_host_a_deploy_command_names() -> None:
    props = {k: v for k, v in _props().items() if k != "host"}
    with pytest.raises(StepFailed, match=r"^host karl: cannot run /nonexistent/deploy --host karl"):
        StepProvider().create({**props, "create": "/nonexistent/deploy --host karl --ip x"})
    with pytest.raises(StepFailed, match=r"^host -: cannot run /nonexistent/render"):
        StepProvider().create({**props, "create": ["/nonexistent/render", "--out", "x"]})
    created = StepProvider().create({**props, "create": [sys.executable, "-c", "", "--host", "uwe"]})
    assert created.id.startswith("uwe-")


def test_runner_missing_program_is_reported() -> None:
    with pytest.raises(StepFailed, match="host olaf: cannot run /nonexistent/colmena apply"):
        StepProvider().create(_props(create=["/nonexistent/colmena", "apply"]))


def test_runner_update_and_delete(tmp_path: Path) -> None:
    log = tmp_path / "log"
    def cmd(word: str) -> list[str]:
        return [sys.executable, "-c", f"open({str(log)!r}, 'a').write({word!r} + '\\n')"]

    p = StepProvider()
    p.update("id", _props(), _props(create=cmd("create"), update=cmd("update")))
    p.update("id", _props(), _props(create=cmd("create")))  # no update: create again
    p.delete("id", _props(delete=cmd("delete")))
    p.delete("id", _props())  # no delete: nothing runs
    assert log.read_text().split() == ["update", "create", "delete"]


def test_runner_diff_updates_on_inputs_and_replaces_on_triggers() -> None:
    p = StepProvider()
    old = _props(inputs={"a": "1"}, triggers=["10.0.0.1"], stdout="old output")
    assert p.diff("id", old, _props(inputs={"a": "1"}, triggers=["10.0.0.1"])).changes is False
    # a change is answered "unknown" (None): the engine then diffs the inputs itself and
    # prints only the changed ones (runner.StepProvider.diff); no change is a plain False
    d = p.diff("id", old, _props(inputs={"a": "2"}, triggers=["10.0.0.1"]))
    assert d.changes is None and d.replaces == []
    d = p.diff("id", old, _props(inputs={"a": "1"}, triggers=["10.0.0.2"]))
    assert d.changes is None and d.replaces == ["triggers"] and d.delete_before_replace
    d = p.diff("id", old, _props(inputs={"a": "1"}, triggers=["10.0.0.1"], create=["false"]))
    assert d.changes is None


def test_runner_diff_sees_through_secret_wrappers() -> None:
    wrapped = rpc.wrap_rpc_secret({"T": "x"})
    p = StepProvider()
    assert p.diff("id", _props(secretEnvironment=wrapped),
                  _props(secretEnvironment={"T": "x"})).changes is False


def test_runner_diff_a_new_layout_of_the_same_values_runs_nothing() -> None:
    """An upgrade of the project that shows a deploy's values another way (the two maps
    ``inputs`` and ``plan`` of older versions now one, a plan value named like a digest now
    renamed in it, a whole sha256 now recorded short, an argv list now one line, an empty
    property now left out) runs no colmena: the diff compares runner.trigger_view. A value
    that changed still runs the step, wherever it is shown."""
    from k3scluster.records import step_values

    full = "ab" * 32
    old_plan = {"address": "10.0.100.2", "modules": "rack 3"}  # a hosts.csv column `modules`
    old = _props(create=["colmena", "apply", "--on", "olaf"], environment={},
                 inputs={"file:hosts/olaf.nix": full, "k3s:agent": "1.35",
                         "modules": "base.nix @ 0123456789ab"},
                 plan=old_plan, stdout="done")

    def now(plan: dict[str, str], **digests: str) -> dict[str, object]:
        d = {"file:hosts/olaf.nix": full[:12], "k3s:agent": "1.35",
             "modules": "base.nix @ 0123456789ab", **digests}
        return {"create": "colmena apply --on olaf", "inputs": step_values(d, plan)}

    new = now(old_plan)
    assert "modules (plan)" in new["inputs"]  # type: ignore[operator]
    p = StepProvider()
    assert p.diff("id", old, new).changes is False
    for plan in ({"address": "10.0.100.9", "modules": "rack 3"},
                 {"address": "10.0.100.2", "modules": "rack 4"},
                 {**old_plan, "zone": "a"}):  # a new hosts.csv column is one value more
        assert p.diff("id", old, now(plan)).changes is None, plan
    assert p.diff("id", old, now(old_plan, **{"k3s:agent": "1.36"})).changes is None
    assert p.diff("id", old, now(old_plan, **{"file:hosts/olaf.nix": "cd" * 6})).changes is None
    assert p.diff("id", old, {**new, "create": "colmena apply --on olaf -p 4"}).changes is None


def test_a_deploy_step_records_its_plan_values_among_its_digests(poisoned: Path) -> None:
    """One map, ``inputs``, not ``inputs`` and ``plan``: two lines less per host in a
    ``pulumi preview --diff`` (records.step_values)."""
    m = run_program(poisoned, "python")
    reg = m.named("olaf-deploy")
    assert "plan" not in reg.inputs
    values = dict(reg.inputs["inputs"])
    assert values["address"] == "10.0.100.2" and values["roles"] == "init-server, agent (K3s 1.35)"
    assert values["k3s:agent"] == "1.35" and len(values["file:hosts/olaf.nix"]) == 12


def test_plan_values_named_like_digests_keep_both() -> None:
    """A hosts.csv column named like one of the step's digests (``modules``) or like a kind
    of digest (``zone:a``) is renamed among them: both values stay, and no plan value reads
    as a rendered file's digest."""
    from k3scluster.components.rendered import input_environment, planned_files
    from k3scluster.records import DIGEST_GROUPS, is_digest_name, step_values
    from k3scluster.render import GROUPS

    assert set(DIGEST_GROUPS) == set(GROUPS)
    digests = {"modules": "base.nix @ 0123456789ab", "file:hosts/olaf.nix": "ab" * 6}
    plan = {"address": "10.0.100.2", "modules": "none", "file:x": "y", "modules (plan)": "z"}
    values = step_values(digests, plan)
    assert values == {**digests, "address": "10.0.100.2", "modules (plan)'": "none",
                      "file_x (plan)": "y", "modules (plan)": "z"}
    assert [k for k in values if is_digest_name(k)] == ["file:hosts/olaf.nix", "modules"]
    assert planned_files(input_environment(values)) == {
        "hosts/olaf.nix": "ab" * 6, "modules/": "base.nix @ 0123456789ab"}


def test_runner_diff_the_plan_values_among_the_digests_as_before_runs_nothing() -> None:
    """A state written with the plan values in a map of their own (``plan``) counts the same
    as the one map the step records now (records.step_values): an ``up`` after the upgrade
    runs no colmena; a changed value still runs the step."""
    digests = {"file:hosts/olaf.nix": "ab" * 6, "k3s:agent": "1.35"}
    plan = {"address": "10.0.100.2", "roles": "agent (K3s 1.35)"}
    old = _props(create="deploy", inputs=digests, plan=plan, stdout="done")
    new = {"host": "olaf", "create": "deploy", "inputs": step_values(digests, plan)}
    p = StepProvider()
    assert p.diff("id", old, new).changes is False
    moved = step_values(digests, {**plan, "address": "10.0.100.9"})
    assert p.diff("id", old, {**new, "inputs": moved}).changes is None


def test_runner_diff_a_column_named_like_an_input_hides_no_change() -> None:
    """A hosts.csv column shown among the plan values under the name of one of the step's
    inputs (``modules``, ``secret:k3s-token``) is a value of its own in runner.trigger_view:
    a change of the input's digest, or of the column, still runs the step (one map of names
    over both would keep one of the two and lose the other's change)."""
    p = StepProvider()
    for name in ("modules", "secret:k3s-token"):
        old = _props(create="deploy", inputs={name: "a" * 12}, plan={name: "rack-top"})
        assert p.diff("id", old, {**old, "stdout": "x"}).changes is False
        for inputs, plan in (({name: "b" * 12}, {name: "rack-top"}),
                             ({name: "a" * 12}, {name: "attic"})):
            new = _props(create="deploy", inputs=inputs, plan=plan)
            assert p.diff("id", old, new).changes is None, (name, inputs, plan)


def test_pickled_provider_is_small_and_holds_nothing_of_ours() -> None:
    import base64

    from pulumi.dynamic.dynamic import serialize_provider

    blob = base64.b64decode(serialize_provider(StepProvider()))
    assert b"k3scluster.components.runner" in blob  # by reference, not by value
    assert len(blob) < 400
    assert b"POISON" not in blob


def test_mask_prefers_longest_secret() -> None:
    assert mask("abc abcdef", ["abc", "abcdef"]) == "[secret] [secret]"
    assert mask("nothing", [""]) == "nothing"


# --- tasks ---------------------------------------------------------------------------------


def _task(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k3scluster.components.tasks", *args],
        cwd=cwd, capture_output=True, text=True, check=False,
    )


def test_capture_writes_atomically_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "nixConfigs" / "x.hardware.nix"
    r = _task("capture", "--out", str(out), "--", "printf", "{ }\n")
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "{ }\n"
    r = _task("capture", "--out", str(out), "--", "printf", "other")
    assert r.returncode == 0 and out.read_text() == "{ }\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.hardware.nix"]


def test_capture_failure_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "x.nix"
    r = _task("capture", "--out", str(out), "--", "sh", "-c", "echo partial; exit 255")
    assert r.returncode == 1 and "exit code 255" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_iso_task_reports_image_and_digest(tmp_path: Path) -> None:
    link = tmp_path / "result"
    script = f"import os; os.makedirs({str(link / 'iso')!r}); " \
             f"open({str(link / 'iso' / 'nixos-olaf.iso')!r}, 'w').write('image')"
    r = _task("iso", "--result", str(link), "--", sys.executable, "-c", script)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out == {"image": str(link / "iso" / "nixos-olaf.iso"), "sha256": _sha("image")}


def test_capture_reports_the_digest_of_the_file_it_leaves(tmp_path: Path) -> None:
    import hashlib

    from k3scluster.components.tasks import captured_sha256

    out = tmp_path / "x.hardware.nix"
    r = _task("capture", "--out", str(out), "--", "printf", "{ }\n")
    assert captured_sha256(r.stdout) == hashlib.sha256(b"{ }\n").hexdigest()
    # a kept file reports its own content, not what the command printed
    r = _task("capture", "--out", str(out), "--", "printf", "other")
    assert captured_sha256(r.stdout) == hashlib.sha256(b"{ }\n").hexdigest()
    assert captured_sha256("") is None and captured_sha256(None) is None


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_changed_picture_redeploys_no_host(
    example_dir: Path, runner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cluster.svg / cluster.md re-render when the picture changes, but no host's deploy
    digest and no installer image's inputs depend on them."""
    from k3scluster import diagram

    def digests(m: RecordingMonitor) -> dict[str, dict[str, str]]:
        names = [f"{h}-deploy" for h in ("olaf", "ulf", "rolf", "karl", "ulrich")]
        names += [f"{h}-installer-build" for h in ("olaf", "ulrich")]
        return {n: _digests(m.named(n), runner) for n in [*names, "cluster-render"]}

    before = digests(run_program(example_dir, runner, buildIsos="true"))
    drawn = diagram.dot_source
    monkeypatch.setattr(diagram, "dot_source", lambda c: drawn(c).replace("LR", "TB"))
    monkeypatch.setattr(diagram, "markdown", lambda c, picture=None: "# another picture\n")
    after = digests(run_program(example_dir, runner, buildIsos="true"))
    for name in before:
        if name != "cluster-render":
            assert after[name] == before[name], name
            assert not any("cluster.md" in k or "cluster.dot" in k for k in after[name]), name
    changed = {k for k in before["cluster-render"] if before["cluster-render"][k] != after["cluster-render"][k]}
    assert changed == {"picture"}  # one short digest over the picture's sources


def test_cluster_and_vm_components_do_not_import_each_other() -> None:
    """Both take ``Settings`` from ``components/settings.py``: the cluster makes its lab
    (``vm.make_lab``), and ``vm`` no longer imports ``cluster`` back, not even for typing."""
    import ast

    def imported(module: str) -> set[str]:
        tree = ast.parse((ROOT / "k3scluster" / "components" / f"{module}.py").read_text())
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert "k3scluster.components.cluster" not in imported("vm")
    assert "k3scluster.components.settings" in imported("vm")


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


# library modules that still import from k3scluster.components (to be moved out; the list
# may only shrink: the test fails when one of them no longer does, so it gets dropped here)
IMPORTS_COMPONENTS_STILL = {"probe.py"}


def test_library_never_imports_components() -> None:
    """The layering: k3scluster/ outside components/ never imports k3scluster.components
    (components build on the library, not the other way round); e.g. BOOT_FILES, the reboot
    rule both build and status's host script use, lives in k3scluster/bootentries.py."""
    lib = ROOT / "k3scluster"
    offenders = set()
    for path in lib.rglob("*.py"):
        rel = path.relative_to(lib)
        if rel.parts[0] == "components":
            continue
        if any(m == "k3scluster.components" or m.startswith("k3scluster.components.")
               for m in _imported_modules(path)):
            offenders.add(str(rel))
    assert offenders == IMPORTS_COMPONENTS_STILL


def test_build_renders_and_builds_what_the_program_deploys(
    poisoned: Path, tmp_path: Path
) -> None:
    """``k3scluster build --stack S`` and the program read the stack alike (stackconfig): the
    same render directory and tree as the program's render step writes, and colmena builds
    the hive its deploy steps apply, so the deploy finds the build in the store."""
    colmena = ROOT / "tests" / "bin" / "colmena"
    m = run_program(poisoned, "python", colmena=str(colmena))
    deploy = _argv(m.named("olaf-deploy"), "python")
    hive = deploy[deploy.index("-f") + 1]
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "Pulumi.yaml").write_text((ROOT / "Pulumi.yaml").read_text())
    (proj / "__main__.py").write_text("# not run by k3scluster build\n")
    (proj / "Pulumi.mock.yaml").write_text(
        f"config:\n  k3scluster:clusterDir: {poisoned}\n  k3scluster:colmena: {colmena}\n"
    )
    log = tmp_path / "colmena.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLMENA_LOG": str(log),
           "COLMENA_STORE": str(tmp_path / "store"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "k3scluster", "build", str(poisoned), "--stack", "mock",
         "--project", str(proj), "--on", "olaf"],
        env=env, capture_output=True, text=True, check=False, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (call,) = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert call["argv"][call["argv"].index("-f") + 1] == hive

    def tree(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
                if p.is_file() and ".gcroots" not in p.parts}

    render_dir = Path(hive).parent
    built = tree(render_dir)
    assert "hosts/olaf.nix" in built
    # the program's render step, run as its step runs it: the very same tree
    subprocess.run(_argv(m.named("cluster-render"), "python"), env=env, check=True,
                   capture_output=True, cwd=ROOT)
    assert tree(render_dir) == built
    assert (render_dir / ".gcroots" / "node-olaf").is_symlink()


@pytest.mark.parametrize("agent_token", [True, False], ids=["agent-token", "no-agent-token"])
def test_secret_hosts_are_the_hosts_that_receive_it(example_dir: Path, agent_token: bool) -> None:
    # the Secret components list who receives each token; without secrets/agent-token (a
    # cluster made before it) the agents join with the server token, so it reaches them too
    from k3scluster import plans
    from k3scluster.components.cluster import _secret_args

    if not agent_token:
        (example_dir / "secrets" / "agent-token").unlink()
    cluster = plans.load(example_dir).cluster
    assert cluster is not None
    tokens = {
        rel: set(sa.hosts) for rel, sa in _secret_args(cluster).items() if "token" in rel
    }
    servers, agents = {"olaf", "ulf", "rolf"}, {"olaf", "ulf", "karl"}
    if agent_token:
        assert tokens == {"secrets/token": servers, "secrets/agent-token": servers | agents}
    else:
        assert tokens == {"secrets/token": servers | agents}
