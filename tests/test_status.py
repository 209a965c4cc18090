"""``k3scluster status``: the rows (pure), and the command against a stack after a real ``up``.

The engine test reuses test_health.py's lab: the real engine, runner ``python``, the colmena
stand-in, a real sshd per host (its ``/run/current-system`` a link the test repoints) and the
K3s API stand-in ``tests/k3sapi.py`` (real ``kubernetes`` client), all inside namespaces of
the test's own with only loopback: no packet leaves the machine. ``status`` itself runs in
those namespaces too (``engine.run_in_namespace``) and reads the stack with the same engine.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import k3sapi
import pytest
from engine import netns_available, run_in_namespace
from test_health import (
    AGENTS,
    HOSTS,
    SERVERS,
    STACK,
    Lab,
    Project,
    new_lab,
    system_dir,
    system_path,
)

from k3scluster import status
from k3scluster.errors import K3sClusterError
from k3scluster.plans import load_or_raise

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cluster"


@pytest.fixture(scope="module")
def example() -> Any:
    cluster, _ = load_or_raise(EXAMPLE)
    return cluster


def _deployed(example: Any, planned: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        h: {"ip": str(example.host(h).ip), "roles": [], "digest": d, "system": system_path(h),
            "deployedAt": "2026-12-06T07:00:00Z", "health": "ready"}
        for h, d in planned.items()
    }


def _nodes(example: Any, **ready: bool) -> dict[str, status.NodeState]:
    return {
        n.name: status.NodeState(n.name, n.type.value, ready.get(n.name, True),
                                 f"node {n.name} Ready={ready.get(n.name, True)}",
                                 "v1.35.2+k3s1")
        for n in example.k3s
    }


def _observed(example: Any, **systems: str | None) -> dict[str, status.Observed]:
    out = {}
    for h in example.hosts:
        sys_ = systems.get(h.name, system_path(h.name))
        out[h.name] = (status.Observed(True, sys_, {}) if sys_ is not None
                       else status.Observed(False, error="connection refused"))
    return out


def test_the_planned_digest_is_the_deploys_own_and_follows_the_plan(example: Any,
                                                                     tmp_path: Path) -> None:
    a = status.planned_digests(example, tmp_path / "r", None)
    assert sorted(a) == sorted(HOSTS)
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in a.values())
    # a VM stack's render names the NICs by the VMs' MACs: other digests
    vm = status.planned_digests(example, tmp_path / "r", "test-vms")
    assert all(vm[h] != a[h] for h in a)
    # the render directory is part of the hive's paths (relative to the cluster directory)
    assert status.planned_digests(example, tmp_path / "a" / "b", None) != a


def test_rows_up_to_date_changed_not_deployed_removed(example: Any, tmp_path: Path) -> None:
    planned = status.planned_digests(example, tmp_path, None)
    deployed = _deployed(example, planned)
    deployed["ulrich"]["digest"] = "0" * 64  # the plan changed since
    del deployed["karl"]  # its deploy never ran
    deployed["gone"] = {"ip": "10.0.100.9", "roles": ["agent"], "digest": "1" * 64}
    rows = {r.host: r for r in status.host_statuses(
        example, planned, deployed, observed=_observed(example), nodes=_nodes(example))}
    assert [h for h in rows] == [*HOSTS, "gone"]
    assert rows["olaf"].plan == status.UP_TO_DATE and rows["olaf"].attention == ()
    assert rows["olaf"].roles == ("init-server", "agent")
    assert rows["ulrich"].plan == status.CHANGED
    assert "`pulumi up` redeploys it" in rows["ulrich"].attention[0]
    assert rows["karl"].plan == status.NOT_DEPLOYED
    assert rows["gone"].plan == status.NOT_IN_PLANS and rows["gone"].ip == "10.0.100.9"
    assert status.needs_attention(rows.values())


def test_rows_drift_unreachable_not_ready_reboot(example: Any, tmp_path: Path) -> None:
    planned = status.planned_digests(example, tmp_path, None)
    rows = {r.host: r for r in status.host_statuses(
        example, planned, _deployed(example, planned),
        observed={**_observed(example, rolf=system_path("rolf", 1), karl=None),
                  "olaf": status.Observed(True, system_path("olaf"), {
                      "container@k3s-server.service": "activating",
                      "podman-k3s-agent.service": "unknown"}),
                  "ulf": status.Observed(True, system_path("ulf"), {
                      "container@k3s-server.service": "failed"})},
        nodes=_nodes(example, **{"ulf-k3s-agent": False}),
        needs_reboot=frozenset({"ulrich"}))}
    assert rows["rolf"].drift is True and rows["rolf"].running == system_path("rolf", 1)
    assert f"runs {system_path('rolf', 1)}, but its last deploy activated " \
           f"{system_path('rolf')}" in rows["rolf"].attention[0]
    assert rows["karl"].reachable is False and rows["karl"].drift is None
    assert rows["karl"].attention == ("not reachable over ssh (connection refused)",)
    assert rows["ulf"].attention == ("container@k3s-server.service is failed",
                                     "node ulf-k3s-agent Ready=False")  # what the API said
    assert rows["ulrich"].needs_reboot is True and "needs a reboot" in rows["ulrich"].attention[0]
    assert rows["olaf"].needs_reboot is False and rows["olaf"].attention == ()
    table = status.format_table("s", list(rows.values()))
    assert "stack s: 4 of 5 host(s) need attention" in table
    assert max(len(line) for line in table.splitlines()[:6]) <= 130


def test_a_host_that_booted_another_kernel_needs_a_reboot(example: Any, tmp_path: Path) -> None:
    planned = status.planned_digests(example, tmp_path, None)
    seen = {
        **_observed(example),
        "olaf": status.Observed(True, system_path("olaf"), {}, reboot=("kernel", "initrd")),
        "ulf": status.Observed(True, system_path("ulf"), {}, reboot=()),
    }
    rows = {r.host: r for r in status.host_statuses(
        example, planned, _deployed(example, planned), observed=seen, nodes=_nodes(example))}
    assert rows["olaf"].needs_reboot is True
    assert rows["olaf"].attention == ("needs a reboot (its kernel, initrd changed since it booted)",)
    assert rows["ulf"].needs_reboot is False and rows["ulf"].attention == ()
    assert rows["rolf"].needs_reboot is None  # it could not tell, and the stack has no list
    # the stack's list counts too, with the host's own answer
    rows = {r.host: r for r in status.host_statuses(
        example, planned, _deployed(example, planned), observed=seen, nodes=_nodes(example),
        needs_reboot=frozenset({"rolf"}))}
    assert rows["rolf"].needs_reboot is True and rows["ulf"].needs_reboot is False
    assert rows["rolf"].attention == ("needs a reboot (the stack lists it)",)


@pytest.mark.parametrize(
    "case",
    ["same", "kernel", "initrd+params", "params only in one"],
)
def test_the_hosts_boot_check_is_builds_rule(tmp_path: Path, case: str) -> None:
    """bootentries.boot_script (run on the host by status) answers as
    bootentries.boot_changes (which build uses to compare a deployed and a built system
    here), on stand-in system directories."""
    from k3scluster.bootentries import boot_changes, boot_script

    tmp_path = tmp_path / "a dir"  # the script quotes the paths it is given
    store = tmp_path / "store"
    store.mkdir(parents=True)
    for f in ("k1", "k2", "i1", "i2"):
        (store / f).touch()

    def system(name: str, kernel: str, initrd: str, params: str | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "kernel").symlink_to(kernel)
        (d / "initrd").symlink_to(store / initrd)
        if params is not None:
            (d / "kernel-params").write_text(params)
        return d

    k1 = str(store / "k1")
    other = {
        "same": (k1, "i1", "loglevel=4"),
        "kernel": (str(store / "k2"), "i1", "loglevel=4"),
        "initrd+params": (k1, "i2", "loglevel=7"),
        "params only in one": (k1, "i1", None),
    }[case]
    booted = system("booted", k1, "i1", "loglevel=4")
    current = system("current", *other)
    out = subprocess.run(["sh", "-c", boot_script(str(booted), str(current))],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "reboot-checked"
    assert [ln.removeprefix("reboot:") for ln in out[:-1]] == boot_changes(str(booted),
                                                                           str(current))


def test_offline_rows_know_nothing_they_did_not_ask(example: Any, tmp_path: Path) -> None:
    planned = status.planned_digests(example, tmp_path, None)
    rows = status.host_statuses(example, planned, _deployed(example, planned))
    assert all(r.reachable is None and r.drift is None and r.needs_reboot is None for r in rows)
    assert all(n.ready is None and n.seen == "not asked" for r in rows for n in r.nodes)
    assert not status.needs_attention(rows)
    assert status.format_table("s", rows).endswith("stack s: all 5 host(s) up to date\n")


def test_the_json_schema_is_the_documented_one(example: Any, tmp_path: Path) -> None:
    planned = status.planned_digests(example, tmp_path, None)
    doc = status.to_json("s", EXAMPLE, status.host_statuses(
        example, planned, _deployed(example, planned), observed=_observed(example),
        nodes=_nodes(example)))
    assert tuple(doc) == status.JSON_FIELDS["document"]
    assert all(tuple(h) == status.JSON_FIELDS["host"] for h in doc["hosts"])
    assert all(tuple(n) == status.JSON_FIELDS["k3s"] for h in doc["hosts"] for n in h["k3s"])
    # README documents every field, in a table of its own
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### `k3scluster status"):]
    section = section[: section.index("\n## ")]
    documented = set(re.findall(r"^\| `([A-Za-z0-9]+)`", section, re.MULTILINE))
    assert documented == {*status.JSON_FIELDS["document"], *status.JSON_FIELDS["host"]}


# --- the command against a stack after `up` --------------------------------------------------

@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return new_lab(tmp_path)


def _status(p: Project, lab: Lab, *extra: str, down: tuple[str, ...] = ()) -> Any:
    return run_in_namespace(
        [sys.executable, "-m", "k3scluster", "status", str(p.cluster), "--stack", STACK,
         "--project", str(p.dir), *extra],
        cwd=p.dir, setup=lab.setup(down), timeout=300,
    )


@pytest.mark.integration
@pytest.mark.root
def test_status_after_up_then_a_changed_plan_drift_and_an_unreachable_host(
    lab: Lab, tmp_path: Path
) -> None:
    p = Project(tmp_path, lab)
    r = p.up()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    state = p.state_text()
    calls = len(p.colmena_calls())  # the up's (its applies and the drain's dry activations)

    # right after up: everything up to date, read from the hosts and the API
    r = _status(p, lab, "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["stack"] == STACK
    hosts = {h["host"]: h for h in doc["hosts"]}
    assert list(hosts) == list(HOSTS)
    for name, h in hosts.items():
        assert h["plan"] == "up to date" and h["attention"] == [], h
        assert h["deployedDigest"] == h["plannedDigest"] == p.outputs()["hosts"][name]["digest"]
        assert h["reachable"] is True and h["drift"] is False
        assert h["system"] == h["running"] == system_path(name)
        assert h["deployedAt"].endswith("Z")
    assert hosts["olaf"]["roles"] == ["init-server", "agent"]
    olaf_k3s = {n["name"]: n for n in hosts["olaf"]["k3s"]}
    assert olaf_k3s["olaf-k3s-server"]["ready"] is True
    assert olaf_k3s["olaf-k3s-server"]["version"] == "v1.35.2+k3s1"  # GET /version
    assert olaf_k3s["olaf-k3s-agent"] == {"name": "olaf-k3s-agent", "role": "agent",
                                          "ready": True, "seen": "node olaf-k3s-agent Ready",
                                          "version": "v1.35.2+k3s1"}
    assert hosts["ulrich"]["k3s"] == []

    # a changed plan (ulrich), drift (rolf runs another system), karl switched off and its
    # agent NotReady
    (p.cluster / "nixConfigs" / "ulrich.nix").write_text("{ ... }: { }\n# changed\n")
    # ulrich was switched to a system with another kernel than the one it booted
    booted, current = system_dir(tmp_path, "booted", "k1"), system_dir(tmp_path, "new", "k2")
    (lab.hosts["ulrich"] / "run" / "booted-system").symlink_to(booted)
    lab.repoint("ulrich", str(current))
    lab.repoint("rolf", system_path("rolf", 1))
    lab.set_api(readyz={ip: ["200"] for _, ip in SERVERS.values()},
                nodes={**{n: ["True"] for n in AGENTS.values()}, "karl-k3s-agent": ["False"]})
    r = _status(p, lab, down=("karl",))
    assert r.returncode == 3, r.stdout + r.stderr
    out = r.stdout
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:6]}
    assert "up to date" in lines["olaf"] and "changed" in lines["ulrich"]
    assert "DRIFT" in lines["rolf"] and "unreachable" in lines["karl"]
    assert "ulrich: its plan changed since its last deploy: `pulumi up` redeploys it" in out
    assert f"rolf: runs {system_path('rolf', 1)}, but its last deploy activated " \
           f"{system_path('rolf')}" in out
    assert "karl: not reachable over ssh (" in out
    assert "karl: node karl-k3s-agent Ready=False (KubeletNotReady)" in out
    assert "ulrich: needs a reboot (its kernel changed since it booted)" in out
    assert "stack gates: 3 of 5 host(s) need attention" in out
    assert not any(ln.startswith(("olaf:", "ulf:")) for ln in out.splitlines())

    # it changed nothing: the state, the hosts, colmena untouched; the kubeconfig's key never
    # printed (the secret output is read as "[secret]")
    assert p.state_text() == state
    assert len(p.colmena_calls()) == calls
    printed = first + out + r.stderr
    # the key as the kubeconfig file holds it (base64 of the PEM), and as a PEM body
    assert k3sapi.client_key_data(lab.pki) in (p.render_dir / "kubeconfig").read_text()
    assert k3sapi.client_key_data(lab.pki) not in printed
    key = (lab.pki / "client.key").read_text()
    assert "".join(key.splitlines()[1:-1]) not in printed

    # offline: no host and no API asked, only the record and the plans
    before = len(lab.api_requests())
    r = _status(p, lab, "--offline", "--json")
    assert r.returncode == 3, r.stderr
    doc = json.loads(r.stdout)
    assert [h["host"] for h in doc["hosts"] if h["attention"]] == ["ulrich"]
    assert len(lab.api_requests()) == before


def test_the_stack_settings_resolve_like_the_program(tmp_path: Path) -> None:
    from k3scluster import stackinfo
    from k3scluster.stackconfig import StackFile

    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(ROOT / "Pulumi.yaml", project)
    (project / "Pulumi.st.yaml").write_text(
        "config:\n  k3scluster:clusterDir: ../c\n  k3scluster:vms: true\n"
        "  k3scluster:sshIdentity: keys/id\n  k3scluster:deployUser: admin\n"
    )
    outputs = {"hosts": {"olaf": {"digest": "d"}}, "kubeconfig": "[secret]",
               "needsReboot": ["olaf"]}
    info = stackinfo.resolve(StackFile(project, "st"), "st", project, outputs)
    assert info.layout.cluster_dir == (tmp_path / "c").resolve()
    assert info.layout.render_dir == (tmp_path / "c").resolve() / ".k3scluster" / "st"
    assert info.layout.vm_stack == "st"
    assert info.ssh.user == "admin" and info.ssh.identity == (project / "keys" / "id")
    assert info.kubeconfig == info.layout.render_dir / "kubeconfig"
    assert info.needs_reboot == frozenset({"olaf"})
    assert stackinfo.StackInfo(info.layout, {}).needs_reboot is None


def test_status_outside_a_project_is_a_clear_error(tmp_path: Path, capsys: Any) -> None:
    from k3scluster.cli import main

    code = main(["status", str(EXAMPLE), "--stack", "x", "--project", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "Pulumi.yaml does not exist" in err and "--project" in err



@pytest.mark.parametrize("vms", ["false", "true"])
def test_the_planned_digest_is_the_one_the_program_exports(
    short_example_dir: Path, vms: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status.planned_digests against the `hosts` output of the Pulumi program itself (mocks),
    for a hardware stack and a VM stack: one rule, so "up to date" means what `up` means.
    (The example under a short path: its VM stack's QMP sockets must fit a unix socket's
    path, which pytest's own temporary paths outgrow; conftest.short_example_dir.)"""
    example_dir = short_example_dir
    import test_components
    from pulumi.runtime import rpc

    from k3scluster.lab import netcheck

    monkeypatch.setattr(netcheck, "check_machine", lambda *a: None)
    outputs: dict[str, Any] = {}

    def keep(self: Any, request: Any) -> Any:
        outputs[request.urn] = rpc.deserialize_properties(request.outputs)
        return type(self).__mro__[1].RegisterResourceOutputs(self, request)

    monkeypatch.setattr(test_components.RecordingMonitor, "RegisterResourceOutputs", keep,
                        raising=False)
    test_components.run_program(example_dir, "python", vms=vms, vmAccel="tcg")
    # the Cluster component's `hosts` (what the program exports as the stack output `hosts`)
    hosts = next(o["hosts"] for u, o in outputs.items() if u.endswith("Cluster::cluster"))
    cluster, _ = load_or_raise(example_dir)
    planned = status.planned_digests(
        cluster, example_dir / ".k3scluster" / "mock", "mock" if vms == "true" else None)
    assert {h: v["digest"] for h, v in hosts.items()} == planned


# --- what status's ssh does to a host, and to this machine --------------------------------

_OBSERVE = """
import json, sys
from pathlib import Path
from k3scluster import probe, stackinfo
from k3scluster.plans import load_or_raise
from k3scluster.stackconfig import StackFile
project = Path(sys.argv[1])
info = stackinfo.resolve(StackFile(project, "st"), "st", project, {})
cluster, _ = load_or_raise(info.layout.cluster_dir)
seen = probe.observe_hosts(cluster, info.ssh, timeout=int(sys.argv[2]))
print(json.dumps({h: [o.reachable, o.system, o.error] for h, o in seen.items()}))
"""


def _observe_as_status(lab: Lab, tmp_path: Path, known_hosts: Path, timeout: int = 10) -> Any:
    """probe.observe_hosts with the ssh settings status resolves from a stack file, run in
    the lab's namespaces (real sshd per host, only loopback)."""
    project = tmp_path / "p"
    if not project.exists():
        project.mkdir()
        shutil.copy(ROOT / "Pulumi.yaml", project)
        (project / "Pulumi.st.yaml").write_text(
            f"config:\n  k3scluster:clusterDir: {EXAMPLE}\n"
            f"  k3scluster:sshIdentity: {lab.client_key}\n"
            f"  k3scluster:sshKnownHosts: {known_hosts}\n"
        )
    r = run_in_namespace([sys.executable, "-c", _OBSERVE, str(project), str(timeout)],
                         cwd=tmp_path, setup=lab.setup(), timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + lab.sshd_logs()[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.integration
@pytest.mark.root
def test_status_ssh_never_writes_known_hosts_and_refuses_unknown_keys(
    lab: Lab, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    seen = _observe_as_status(lab, tmp_path, known)
    assert all(r[0] is False and "Host key verification failed" in r[2] for r in seen.values()), seen
    assert not known.exists()  # a deploy would have remembered the keys; status did not
    key = " ".join(lab.host_key.with_suffix(".pub").read_text().split()[:2])
    known.write_text("".join(f"{ip} {key}\n" for ip in HOSTS.values()))
    before = known.read_text()
    seen = _observe_as_status(lab, tmp_path, known)
    assert {h: r[:2] for h, r in seen.items()} == {h: [True, system_path(h)] for h in HOSTS}
    assert known.read_text() == before


@pytest.mark.integration
@pytest.mark.root
def test_status_gives_up_a_host_that_answers_ssh_then_hangs(lab: Lab, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    key = " ".join(lab.host_key.with_suffix(".pub").read_text().split()[:2])
    known.write_text("".join(f"{ip} {key}\n" for ip in HOSTS.values()))
    # every host logs the key in, then runs `sleep 600` instead of what ssh asked for
    lab.authorized.write_text('command="sleep 600" ' + lab.authorized.read_text())
    seen = _observe_as_status(lab, tmp_path, known, timeout=2)
    assert all(r[0] is False and "no answer within 6 s" in r[2] for r in seen.values()), seen


# --- K3s nodes: an agent's node asked of every server in turn -----------------------------

_NODES = """
import json, subprocess, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import k3sapi
from k3scluster import kube, probe
from k3scluster.plans import load_or_raise
cluster, _ = load_or_raise(Path(sys.argv[2]))
up = json.loads(sys.argv[3])
servers = [str(n.ip) for n in cluster.k3s if n.type.is_server]
assert servers[0] == str(cluster.init_server.ip)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for ip in servers:
    subprocess.run(["ip", "addr", "add", ip + "/32", "dev", "lo"], check=True)
d = Path(tempfile.mkdtemp())
k3sapi.make_pki(d / "pki", servers)
script, log = d / "script.json", d / "log.jsonl"
script.write_text(json.dumps({"readyz": {ip: ["200"] for ip in servers},
                              "nodes": {n.name: ["True"] for n in cluster.k3s}}))
log.touch()
for ip in up:
    k3sapi.serve(ip, d / "pki", script, log)
kc = d / "kubeconfig"
kc.write_text(kube.rewrite_kubeconfig(k3sapi.k3s_yaml(d / "pki"), kube.server_url(servers[0]),
                                      "st"))
nodes, notes = probe.k3s_nodes(cluster, kc, timeout=3)
print(json.dumps({n: [s.ready, s.seen] for n, s in nodes.items()}))
"""


def _k3s_nodes(up: list[str]) -> dict[str, list[Any]]:
    """probe.k3s_nodes on the example, in a network namespace of its own where the stand-in
    K3s API (real HTTPS, client certificates) listens on the servers ``up`` only."""
    if not netns_available():
        pytest.skip("needs root and unshare for a network namespace")
    r = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", _NODES, str(ROOT / "tests"), str(EXAMPLE),
         json.dumps(up)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_an_agent_is_asked_of_the_next_server_when_the_init_servers_api_is_down() -> None:
    seen = _k3s_nodes(["10.0.100.12"])  # olaf's server (the init-server) is down
    assert seen["olaf-k3s-server"][0] is False  # its own /readyz
    assert seen["ulf-k3s-server"][0] is True
    for agent in ("olaf-k3s-agent", "ulf-k3s-agent", "karl-k3s-agent"):
        assert seen[agent] == [True, f"node {agent} Ready"], seen


def test_an_agent_no_api_answers_for_is_not_known_not_notready() -> None:
    seen = _k3s_nodes([])
    assert seen["karl-k3s-agent"][0] is None, seen
    assert seen["karl-k3s-agent"][1].startswith("not known: no K3s API answered (https://")
    assert all(seen[n][0] is False for n in ("olaf-k3s-server", "ulf-k3s-server"))


def _program_settings(project: Path, stack: str) -> Any:
    """The Pulumi program's own ``settings_from_config`` (``__main__.py`` without its last
    line, ``main()``), its project directory set to ``project``, reading that stack file."""
    import ast

    from k3scluster.stackconfig import StackFile

    tree = ast.parse((ROOT / "__main__.py").read_text())
    tree.body = [n for n in tree.body if not (
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
        and getattr(n.value.func, "id", "") == "main")]
    ns: dict[str, Any] = {"__name__": "k3scluster_program", "__file__": str(ROOT / "__main__.py")}
    exec(compile(tree, str(ROOT / "__main__.py"), "exec"), ns)  # noqa: S102 - our program
    ns["PROJECT_DIR"] = project

    class Config(StackFile):
        def get_int(self, key: str) -> int | None:
            value = self.get(key)
            return int(value) if value else None

    return ns["settings_from_config"](Config(project, stack), stack)[1]


@pytest.mark.parametrize("extra", [
    "  k3scluster:vms: true\n",
    ("  k3scluster:deployUser: admin\n  k3scluster:sshIdentity: keys/id\n"
     "  k3scluster:sshKnownHosts: kh/known\n  k3scluster:kubeconfigPath: ../kc/config\n"
     "  k3scluster:renderDir: out\n"),
])
def test_status_reaches_the_hosts_and_the_api_as_the_program_does(
    tmp_path: Path, extra: str
) -> None:
    """stackinfo.resolve (status) against the program's settings_from_config on one stack
    file: the same ssh user, key, known_hosts file, kubeconfig file and render directory."""
    from k3scluster import stackinfo
    from k3scluster.stackconfig import StackFile

    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(ROOT / "Pulumi.yaml", project)
    (tmp_path / "c").mkdir()
    (project / "keys").mkdir()
    (project / "keys" / "id").write_text("not read here\n")
    (project / "kh").mkdir()
    (project / "Pulumi.st.yaml").write_text(
        "config:\n  k3scluster:clusterDir: ../c\n" + extra)
    settings = _program_settings(project, "st")
    info = stackinfo.resolve(StackFile(project, "st"), "st", project, {})
    assert info.layout.render_dir == settings.render_dir
    assert info.ssh.user == settings.deploy_user
    assert info.ssh.identity == settings.ssh_identity
    assert info.ssh.known_hosts == settings.known_hosts_file
    assert info.kubeconfig == settings.kubeconfig_file
    if "vms" in extra:  # a VM stack: its own file
        assert info.ssh.known_hosts == tmp_path / "c" / ".k3scluster" / "st-vm-known_hosts"
    else:  # the settings were read, not defaults on both sides
        assert info.ssh.user == "admin" and info.kubeconfig == tmp_path / "kc" / "config"


def test_a_vm_stack_refuses_a_known_hosts_file_not_its_own(tmp_path: Path) -> None:
    """A VM stack adds its VMs' keys for the plan's addresses to its known_hosts and drops
    them when a VM is deleted or installed again: in a file the real machines' keys are in
    (the cluster's committed known_hosts, ~/.ssh/known_hosts) that would replace, then delete
    them. The program and status both refuse such a stack; its own file is accepted."""
    from k3scluster import stackinfo
    from k3scluster.stackconfig import StackFile

    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(ROOT / "Pulumi.yaml", project)
    (tmp_path / "c").mkdir()
    shared = tmp_path / "c" / "known_hosts"
    shared.write_text("10.0.100.5 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIRealMachineKey\n")
    stack_file = project / "Pulumi.st.yaml"
    stack_file.write_text(
        "config:\n  k3scluster:clusterDir: ../c\n  k3scluster:vms: true\n"
        "  k3scluster:sshKnownHosts: ../c/known_hosts\n"
    )
    with pytest.raises(K3sClusterError, match="sshKnownHosts .* VM stack"):
        _program_settings(project, "st")
    with pytest.raises(K3sClusterError, match="sshKnownHosts .* VM stack"):
        stackinfo.resolve(StackFile(project, "st"), "st", project, {})
    # the same file in a hardware stack, and the VM stack's own file named: both fine
    stack_file.write_text(stack_file.read_text().replace("vms: true", "vms: false"))
    assert _program_settings(project, "st").known_hosts_file == shared
    own = tmp_path / "c" / ".k3scluster" / "st-vm-known_hosts"
    stack_file.write_text(
        "config:\n  k3scluster:clusterDir: ../c\n  k3scluster:vms: true\n"
        "  k3scluster:sshKnownHosts: ../c/.k3scluster/st-vm-known_hosts\n"
    )
    (tmp_path / "c" / ".k3scluster").mkdir()
    assert _program_settings(project, "st").known_hosts_file == own
    assert stackinfo.resolve(StackFile(project, "st"), "st", project, {}).ssh.known_hosts == own


def test_a_stack_keeps_other_known_hosts_as_vm_stack_and_as_hardware_stack(
    tmp_path: Path,
) -> None:
    """One stack turned from hardware to VMs (or back) by k3scluster:vms: the VM stack's keys
    for the plan's addresses never go into the file that holds the real machines' keys (its
    reinstalls would drop them), and the hardware stack never finds the VMs' keys."""
    from k3scluster import stackinfo
    from k3scluster.stackconfig import StackFile

    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(ROOT / "Pulumi.yaml", project)
    (tmp_path / "c").mkdir()
    found = {}
    for vms in ("false", "true"):
        (project / "Pulumi.st.yaml").write_text(
            f"config:\n  k3scluster:clusterDir: ../c\n  k3scluster:vms: {vms}\n"
        )
        found[vms] = _program_settings(project, "st").known_hosts_file
        assert stackinfo.resolve(StackFile(project, "st"), "st", project, {}).ssh.known_hosts \
            == found[vms]
    assert found["false"] == tmp_path / "c" / ".k3scluster" / "st-known_hosts"
    assert found["true"] == tmp_path / "c" / ".k3scluster" / "st-vm-known_hosts"
