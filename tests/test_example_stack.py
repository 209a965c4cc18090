"""The example's stack files, and what ``scripts/run-example`` shows at its end.

``Pulumi.test-vms.yaml`` is a VM stack over ``examples/cluster`` and ``Pulumi.hardware.yaml`` the
template for real machines. The engine test previews the shipped ``Pulumi.test-vms.yaml``
unchanged (in a copy of the project) with the real engine, in a network namespace with only
loopback, with recording stand-ins for ``qemu-system-x86_64`` and ``qemu-img`` first on PATH:
the preview shows the lab network and one VM per host next to the hosts, and starts nothing
(no QEMU, not even the KVM probe; no bridge or tap; no file written). ``k3scluster summary``
then reads that preview's JSON as run-example does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from engine import BIN, netns_available, require_engine, run_pulumi

from k3scluster.lab.spec import bridge_name
from k3scluster.plans import load_or_raise
from k3scluster.summary import host_plans, summarize

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("olaf", "ulf", "rolf", "karl", "ulrich")
RECORDER = """#!/bin/sh
echo "$0 $*" >> {log}
exit 1
"""


def _config(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / f"Pulumi.{name}.yaml").read_text())["config"]  # type: ignore[no-any-return]


def test_test_vms_is_a_vm_stack_and_hardware_the_template_for_machines() -> None:
    vms, hw = _config("test-vms"), _config("hardware")
    assert vms["k3scluster:clusterDir"] == "examples/cluster"
    assert str(vms["k3scluster:vms"]).lower() == "true"
    assert "k3scluster:vms" not in hw  # real machines: no VM of any kind
    assert hw["k3scluster:clusterDir"] != "examples/cluster"


def _step(name: str, op: str, old: dict[str, str] | None = None,
          new: dict[str, str] | None = None) -> dict[str, Any]:
    urn = f"urn:pulumi:s::k3scluster::k3scluster:index:Cluster$x::{name}"
    step: dict[str, Any] = {"op": op, "urn": urn}
    if old is not None:
        step["oldState"] = {"inputs": {"inputs": old}}
    if new is not None:
        step["newState"] = {"inputs": {"inputs": new}}
    return step


def test_the_summary_says_what_up_does_to_each_host() -> None:
    cluster, _ = load_or_raise(ROOT / "examples" / "cluster")
    steps = [
        _step("olaf-deploy", "update", {"nixConfig:nixConfigs/olaf.nix": "a", "x": "1"},
              {"nixConfig:nixConfigs/olaf.nix": "b", "x": "1"}),
        _step("ulf-deploy", "same"),
        {**_step("rolf-deploy", "update"),  # a plan value shown in clear (the step's plan)
         "oldState": {"inputs": {"plan": {"ip": "10.0.100.4", "roles": "server"}}},
         "newState": {"inputs": {"plan": {"ip": "10.0.100.9", "roles": "server",
                                          "zone": "rack:2"}}}},
        _step("cluster-karl-hardware", "create"),
        _step("karl-deploy", "create"),
        _step("gone-deploy", "delete"),
        _step("cluster-ulf-hardware", "delete"),  # fetched by an earlier up: forgotten
        _step("cluster-lab-network", "update"),  # vmNat changed
    ]
    plans = {p.host: p for p in host_plans(cluster, steps)}
    assert list(plans) == [*HOSTS, "gone"]
    assert plans["olaf"].actions == ("redeploy (nixConfigs/olaf.nix changed)",)
    assert plans["olaf"].ip == "10.0.100.2" and plans["olaf"].roles == ("init-server", "agent")
    assert plans["ulf"].actions == ()
    # a plan value is shown as it is, a ":" in it too
    rolf = "redeploy (ip 10.0.100.4 -> 10.0.100.9, zone - -> rack:2 changed)"
    assert plans["rolf"].actions == (rolf,)
    assert plans["karl"].actions == ("fetch hardware config (ssh)", "first deploy")
    assert plans["gone"].actions[0].startswith("forget it (the machine is not wiped")
    text = summarize("s", cluster, {"steps": steps})
    # the bridge and gateway the program makes for this stack and plan, whatever the step holds
    assert f"  lab network: update bridge {bridge_name('s')} with gateway 10.0.100.1/24 on " \
           "this machine" in text.splitlines()
    assert "4 of 6 host(s) would change; nothing has been done yet" in text
    assert "  ulf     10.0.100.3  server,agent       nothing" in text


def test_the_summary_reads_plan_values_among_the_digests() -> None:
    """A deploy step records its plan values and digests in one map (records.step_values);
    the summary still shows a plan value as ``old -> new`` and a digest by its name, also
    against a state of an earlier version that kept the plan values in a map of their own."""
    from k3scluster.summary import changed_inputs

    new = {"address": "10.0.100.9", "roles": "server", "k3s:server": "1.35",
           "file:hosts/rolf.nix": "bbbbbbbbbbbb", "modules": "base.nix @ 0123456789ab"}
    now = _step("rolf-deploy", "update", {**new, "address": "10.0.100.4",
                                          "file:hosts/rolf.nix": "aaaaaaaaaaaa"}, new)
    assert changed_inputs(now) == ["address 10.0.100.4 -> 10.0.100.9", "hosts/rolf.nix"]
    old_layout = {"inputs": {"inputs": {"k3s:server": "1.35", "modules": new["modules"],
                                        "file:hosts/rolf.nix": "aaaaaaaaaaaa"},
                             "plan": {"address": "10.0.100.4", "roles": "server"}}}
    assert changed_inputs({**now, "oldState": old_layout}) == changed_inputs(now)


@pytest.mark.parametrize("runner", ["python", "command"])
def test_the_summary_names_the_bridge_of_the_stacks_lab_id(runner: str) -> None:
    """The lab id the network step records (its name's hex part): another lab of a stack
    named the same has another bridge."""
    from k3scluster.components.steps import digest_environment
    from k3scluster.records import COMMAND_TYPE, PYTHON_STEP_TYPE

    cluster, _ = load_or_raise(ROOT / "examples" / "cluster")
    recorded = {"state": "down", "lab": "0123abcd"}
    state = (
        {"type": PYTHON_STEP_TYPE, "inputs": {"inputs": recorded}} if runner == "python"
        else {"type": COMMAND_TYPE, "inputs": {"environment": digest_environment(recorded)}}
    )
    step = {**_step("cluster-lab-network", "update"), "newState": state}
    text = summarize("s", cluster, {"steps": [step]})
    assert f"  lab network: update bridge {bridge_name('s', '0123abcd')} with gateway " \
           "10.0.100.1/24 on this machine" in text.splitlines()
    assert bridge_name("s", "0123abcd") != bridge_name("s")


@pytest.mark.integration
@pytest.mark.root
def test_the_example_vm_stack_previews_its_lab_and_starts_nothing(tmp_path: Path) -> None:
    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a loopback-only network namespace")
    # a short path: a VM's QMP socket path must stay under 108 bytes
    short = Path(tempfile.mkdtemp(prefix="k3s-", dir="/tmp"))
    try:
        _preview_and_summary(short / "p", tmp_path)
    finally:
        shutil.rmtree(short)


def _preview_and_summary(project: Path, tmp_path: Path) -> None:
    project.mkdir()
    for f in ("Pulumi.yaml", "__main__.py", "Pulumi.test-vms.yaml"):
        shutil.copy(ROOT / f, project)
    (project / "k3scluster").symlink_to(ROOT / "k3scluster")
    cluster = project / "examples" / "cluster"
    shutil.copytree(ROOT / "examples" / "cluster", cluster,
                    ignore=shutil.ignore_patterns(".k3scluster"))
    for f in ("token", "passwd"):
        (cluster / "secrets" / f).chmod(0o600)
    before = {p: p.read_bytes() for p in cluster.rglob("*") if p.is_file()}
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    calls = tmp_path / "qemu-calls.log"
    for tool in ("qemu-system-x86_64", "qemu-img"):
        (stubs / tool).write_text(RECORDER.format(log=calls))
        (stubs / tool).chmod(0o755)
    links = tmp_path / "links-after.txt"
    env = {"PATH": f"{stubs}:{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    r = run_pulumi(["stack", "init", "test-vms", "--non-interactive"], cwd=project, env=env)
    assert r.returncode == 0, r.stderr
    r = run_pulumi(
        ["preview", "--json", "--non-interactive", "--stack", "test-vms"], cwd=project, env=env,
        setup=":", teardown=f"ip -o link show > {links}; ps -eo comm > {links}.ps",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    preview = json.loads(r.stdout)
    ops = {s["urn"].rsplit("::", 1)[-1]: s["op"] for s in preview["steps"]}
    # the lab network and one VM per host, next to the hosts
    assert ops["cluster-lab-network"] == "create"
    for h in HOSTS:
        assert ops[f"{h}-vm-machine"] == "create" and ops[f"{h}-deploy"] == "create"
    # ... and nothing was started or made
    assert not calls.exists(), calls.read_text()  # no QEMU, not even the KVM probe
    assert [ln.split(":")[1].strip() for ln in links.read_text().splitlines()] == ["lo"]
    assert "qemu" not in Path(f"{links}.ps").read_text()
    after = {p: p.read_bytes() for p in cluster.rglob("*") if p.is_file()}
    assert after == before
    assert not (cluster / ".k3scluster").exists()

    # the summary scripts/run-example ends with: one screen, every host, the lab
    out = tmp_path / "preview.json"
    out.write_text(r.stdout)
    s = subprocess.run(
        [sys.executable, "-m", "k3scluster", "summary", str(cluster), "--stack", "test-vms",
         "--preview", str(out)],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    assert s.returncode == 0, s.stderr
    lines = s.stdout.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 120, s.stdout
    rows = {ln.split()[0]: ln for ln in lines[2:7]}
    assert list(rows) == list(HOSTS)
    assert "10.0.100.2  init-server,agent" in rows["olaf"]
    assert rows["ulrich"].split()[1:3] == ["10.0.100.6", "-"]
    # a VM stack fetches every VM's hardware file into its lab, nixConfigs/<host>.hardware.nix
    # (ulf has one: the real machine's) or not
    assert (cluster / "nixConfigs" / "ulf.hardware.nix").exists()
    for h in HOSTS:
        assert rows[h].endswith("  make its VM, install from its ISO; "
                                "fetch hardware config (ssh); first deploy"), rows[h]
    # a new lab's id (in its bridge's name) is drawn when up makes it
    assert "  lab network: create bridge k3b-testvm-… with gateway 10.0.100.1/24 " \
           "on this machine" in lines
    assert lines[-1] == "5 of 5 host(s) would change; nothing has been done yet " \
                        "(`pulumi up` does it)."
    # the README shows this summary: its lines are these (a "…" stands for what it leaves out)
    readme = (ROOT / "README.md").read_text()
    sample = readme[readme.index("Summary of the preview of stack test-vms:"):]
    sample = sample[: sample.index("```")].splitlines()
    for line in sample:
        if "…" in line:
            head = line[: line.index("…")]
            assert line.strip() == "…" or any(ln.startswith(head) for ln in lines), (line, s.stdout)
        else:
            assert line in lines, (line, s.stdout)
