"""A host's deploy drains its agent first when the switch would restart it (issue 17 item 2).

``python -m k3scluster.components.tasks deploy --drain NODE …`` runs against real parts, in the
network namespace of the real kube-apiserver (tests/kubeapi.py, with its disruption
controller): the admin kubeconfig is read over ssh from a real ``sshd`` at the init-server
host's address (10.0.100.2), which also answers as the agent host (10.0.100.5) for the read
back after the deploy; colmena is the stand-in tests/bin/colmena, whose dry activation says
the agent's unit would restart when the host's agent changed (``$COLMENA_STATE``), and whose
switch runs a hook that records the node and its pods at that moment. The test makes the
Node, its pods (a ReplicaSet's, a DaemonSet's, one under a PodDisruptionBudget) itself.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from test_kube_drain import _daemonset, _namespace, _owner, _pod, _until

from k3scluster import kube as kubelib

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "bin" / "colmena"
SSHD = Path("/usr/sbin/sshd")
INIT_HOST, AGENT_HOST = "10.0.100.2", "10.0.100.5"
NEW_AGENT_HOST = "10.0.100.25"  # the agent host's address after a re-address
STACK = "prod"
SNAPSHOT = """
import json, os, sys
from kubernetes import client, config
config.load_kube_config_from_dict(json.load(open(sys.argv[1])))
core = client.CoreV1Api()
node = core.read_node(sys.argv[2])
pods = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=" + sys.argv[2]).items
with open(sys.argv[3], "a") as f:
    f.write(json.dumps({"host": os.environ["COLMENA_HOST"],
                        "unschedulable": bool(node.spec.unschedulable),
                        "pods": sorted(p.metadata.name for p in pods
                                       if not p.metadata.deletion_timestamp)}) + "\\n")
"""


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


class Host:
    """One sshd answering at the init-server host's and the agent host's addresses (and the
    agent host's new one), as host name karl (a UTS namespace of its own), with K3s's admin
    kubeconfig where a server host keeps it and a /run/current-system link; its sessions'
    PATH starts with ``bin/`` (a test's stand-ins)."""

    def __init__(self, base: Path, api: Any) -> None:
        self.dir = base / "host"
        (self.dir / "run" / "sshd").mkdir(parents=True)
        (self.dir / "run" / "current-system").symlink_to("/nix/store/x-nixos-system-karl")
        kc = self.dir / "var-lib" / kubelib.KUBECONFIG_ON_HOST.removeprefix("/var/lib/")
        kc.parent.mkdir(parents=True)
        kc.write_text(api.k3s_yaml)
        kc.chmod(0o600)
        self.key, self.host_key = base / "id_test", base / "host_key"
        _keygen(self.key)
        _keygen(self.host_key)
        self.known_hosts = base / "known_hosts"
        self.bin = self.dir / "bin"
        self.bin.mkdir()
        (self.dir / "sshd_config").write_text(
            f"ListenAddress {INIT_HOST}\nListenAddress {AGENT_HOST}\n"
            f"ListenAddress {NEW_AGENT_HOST}\nPort 22\n"
            f"SetEnv PATH={self.bin}:/usr/sbin:/usr/bin:/bin\n"
            f"HostKey {self.host_key}\nPidFile {self.dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.key}.pub\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\n"
        )
        q = shlex.quote
        inner = (f"hostname karl && mount --bind {q(str(self.dir / 'run'))} /run && "
                 f"mount --bind {q(str(self.dir / 'var-lib'))} /var/lib && "
                 f"exec {SSHD} -D -f {q(str(self.dir / 'sshd_config'))} "
                 f"-E {q(str(self.dir / 'sshd.log'))}")
        self.proc = api.ns.popen(
            ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", inner],
            self.dir / "sshd.out",
        )
        _until("sshd", lambda: (self.dir / "sshd.pid").exists(), 10)


@pytest.fixture
def host(kube_api: Any, tmp_path: Path) -> Iterator[Host]:
    if not SSHD.is_file() or not shutil.which("ssh"):
        pytest.skip("needs OpenSSH (ssh, /usr/sbin/sshd)")
    for ip in (INIT_HOST, AGENT_HOST, NEW_AGENT_HOST):
        if ip not in kube_api.ns.addresses:
            kube_api.ns.add_address(ip)
    h = Host(tmp_path, kube_api)
    try:
        yield h
    finally:
        from netns import stop

        stop(h.proc)


def _ready_node(core: Any, name: str, unschedulable: bool = False) -> None:
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name),
                                   spec=client.V1NodeSpec(unschedulable=unschedulable or None)))
    core.patch_node_status(name, {"status": {"conditions": [
        {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}]}})


def _hive(base: Path, host: str) -> Path:
    """A render the stand-in reads: hive.nix and hosts/<host>.nix with an agent."""
    render = base / "render"
    (render / "hosts").mkdir(parents=True)
    (render / "hive.nix").write_text(
        f'{{ meta = {{ }}; "{host}" = {{ imports = [ ./hosts/{host}.nix ]; }}; }}\n')
    (render / "hosts" / f"{host}.nix").write_text(
        '{ modulesPath, ... }: { k3scluster.k3s.packageAttr = "k3s_1_35";\n'
        '  k3scluster.agent = { name = "x"; }; }\n')
    return render / "hive.nix"


def _deploy(kube: Any, h: Host, base: Path, node: str, hive: Path, *, state: Path,
            timeout: float = 30, drain_timeout: float = 20,
            stack: str = STACK, extra_env: dict[str, str] | None = None,
            via: str | None = None,
            guard: tuple[str, ...] = ("--no-rollback", "--confirm-timeout", "0"),
            ) -> subprocess.CompletedProcess[str]:
    kc = base / "admin.json"
    kc.write_text(json.dumps(kube.kubeconfig))
    hook = base / "hook.py"
    hook.write_text(SNAPSHOT)
    argv = [
        sys.executable, "-m", "k3scluster.components.tasks", "deploy", "--host", "karl",
        "--ip", NEW_AGENT_HOST if via else AGENT_HOST,
        *(["--via", via] if via else []), "--ssh-identity", str(h.key), "--ssh-known-hosts", str(h.known_hosts),
        "--timeout", f"{timeout:g}", "--agent", node, "--api", kube.server,
        "--credentials-from", INIT_HOST, "--drain", node, "--drain-timeout", f"{drain_timeout:g}",
        "--stack", stack, *guard, "--", str(STANDIN), "apply", "switch", "--on", "karl", "-f", str(hive),
    ]
    env = {
        "PATH": "/usr/sbin:/usr/bin:/bin", "HOME": str(base),
        "COLMENA_LOG": str(base / "colmena.log"), "COLMENA_STATE": str(state),
        "COLMENA_ON_SWITCH": json.dumps([sys.executable, str(hook), str(kc), node,
                                         str(base / "at-switch.jsonl")]),
    }
    return subprocess.run(kube.ns.argv(*argv), cwd=ROOT, env={**env, **(extra_env or {})},
                          capture_output=True, text=True, check=False)


def _at_switch(base: Path) -> list[dict[str, Any]]:
    f = base / "at-switch.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _calls(base: Path) -> list[str]:
    log = base / "colmena.log"
    return [json.loads(line)["argv"][1] for line in log.read_text().splitlines()]


def _workload(kube: Any, node: str) -> tuple[str, list[str], str]:
    core = kube.core()
    ns = _namespace(core)
    web = [_pod(core, ns, node, owner=_owner("ReplicaSet", "web")) for _ in range(2)]
    ds = _daemonset(kube, ns)
    daemon = _pod(core, ns, node, owner=_owner("DaemonSet", ds.metadata.name, ds.metadata.uid))
    return ns, web, daemon


def _changed_agent(base: Path) -> Path:
    """A COLMENA_STATE in which the host's agent ran something else before this deploy."""
    state = base / "state"
    state.mkdir()
    (state / "karl").write_text("an older agent")
    return state


def test_a_deploy_that_restarts_the_agent_cordons_drains_and_uncordons(
    kube: Any, host: Host, tmp_path: Path
) -> None:
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node)
    with kube.kubelet():
        ns, web, daemon = _workload(kube, node)
        _until("pods running", lambda: all(
            core.read_namespaced_pod(p, ns).status.phase == "Running" for p in [*web, daemon]))
        r = _deploy(kube, host, tmp_path, node, _hive(tmp_path, "karl"),
                    state=_changed_agent(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # the dry activation first, then the switch
    assert _calls(tmp_path) == ["dry-activate", "switch"]
    # at the switch: cordoned, the ReplicaSet's pods evicted, the DaemonSet's pod left
    (seen,) = _at_switch(tmp_path)
    assert seen["unschedulable"] is True
    assert seen["pods"] == [daemon]
    # after the gates: uncordoned
    assert not core.read_node(node).spec.unschedulable
    assert f"drain {node}: evicting 2 pod(s)" in r.stderr
    assert f"{node}: uncordoned" in r.stderr


def test_a_deploy_that_leaves_the_agent_running_drains_nothing(
    kube: Any, host: Host, tmp_path: Path
) -> None:
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node)
    hive = _hive(tmp_path, "karl")
    state = tmp_path / "state"
    # a first deploy records what the agent runs; a second one of the same changes nothing
    with kube.kubelet():
        _ns, web, daemon = _workload(kube, node)
        assert _deploy(kube, host, tmp_path, node, hive, state=state).returncode == 0
        (tmp_path / "at-switch.jsonl").unlink()
        r = _deploy(kube, host, tmp_path, node, hive, state=state)
    assert r.returncode == 0, r.stderr[-3000:]
    (seen,) = _at_switch(tmp_path)
    assert seen["unschedulable"] is False and set(seen["pods"]) == {*web, daemon}
    assert "no drain" in r.stderr


def test_a_dry_activation_that_prints_nothing_known_drains_as_if_it_restarted(
    kube: Any, host: Host, tmp_path: Path
) -> None:
    # nothing changes for the agent, but the dry activation's output is not one k3scluster
    # knows (no "would activate the configuration..."): it may hide a restart, so drain
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node)
    hive = _hive(tmp_path, "karl")
    state = tmp_path / "state"
    with kube.kubelet():
        _ns, web, daemon = _workload(kube, node)
        assert _deploy(kube, host, tmp_path, node, hive, state=state).returncode == 0
        (tmp_path / "at-switch.jsonl").unlink()
        _until("pods running", lambda: all(
            core.read_namespaced_pod(p, _ns).status.phase == "Running" for p in [*web, daemon]))
        r = _deploy(kube, host, tmp_path, node, hive, state=state,
                    extra_env={"COLMENA_DRY_SILENT": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (seen,) = _at_switch(tmp_path)
    assert seen["unschedulable"] is True and seen["pods"] == [daemon]
    text = " ".join(r.stderr.split())
    assert ("karl: the dry activation printed no 'would activate the configuration...' line"
            in text)
    assert f"so {node} is drained as if it did" in text
    assert "no drain" not in r.stderr
    assert not core.read_node(node).spec.unschedulable  # uncordoned after the gates


def test_a_host_that_moves_is_drained_before_it_reboots_into_its_new_address(
    kube: Any, host: Host, tmp_path: Path
) -> None:
    # karl moves from AGENT_HOST to NEW_AGENT_HOST: installed as the boot default through
    # its old address, then rebooted; its agent restarts with the reboot, whatever the
    # switch would do, so its node is drained first. The reboot (a systemctl stand-in on
    # the host) records the node and its pods at that moment.
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node)
    kc = tmp_path / "admin.json"
    reboot = host.bin / "systemctl"
    reboot.write_text(
        "#!/bin/sh\n# stand-in for systemctl on the test host: a reboot records the node\n"
        '[ "$*" = "--no-block reboot" ] || exit 3\n'
        f"COLMENA_HOST=karl exec {sys.executable} {tmp_path / 'hook.py'} {kc} {node} "
        f"{tmp_path / 'at-reboot.jsonl'}\n")
    reboot.chmod(0o755)
    with kube.kubelet():
        _ns, _web, daemon = _workload(kube, node)
        r = _deploy(kube, host, tmp_path, node, _hive(tmp_path, "karl"),
                    state=tmp_path / "state", via=AGENT_HOST)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert _calls(tmp_path) == ["boot"]  # no dry activation: the reboot restarts the agent
    (seen,) = [json.loads(ln) for ln in (tmp_path / "at-reboot.jsonl").read_text().splitlines()]
    assert seen["unschedulable"] is True and seen["pods"] == [daemon]
    text = " ".join(r.stderr.split())
    assert f"karl: it reboots into its new address {NEW_AGENT_HOST}: draining {node} first" in text
    assert not core.read_node(node).spec.unschedulable  # uncordoned after its gates
    assert f"{node}: uncordoned" in r.stderr


def test_a_node_cordoned_by_hand_stays_cordoned(kube: Any, host: Host, tmp_path: Path) -> None:
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node, unschedulable=True)
    with kube.kubelet():
        r = _deploy(kube, host, tmp_path, node, _hive(tmp_path, "karl"),
                    state=_changed_agent(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _at_switch(tmp_path)[0]["unschedulable"] is True
    assert core.read_node(node).spec.unschedulable is True  # never uncordoned by this run
    assert "was already cordoned; it stays cordoned" in r.stderr


def test_a_pdb_that_blocks_stops_the_deploy_before_the_switch(
    kube: Any, host: Host, tmp_path: Path
) -> None:
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node)
    with kube.kubelet():
        ns = _namespace(core)
        sel = {"app": "db"}
        pod = _pod(core, ns, node, owner=_owner("ReplicaSet", "db"), labels=sel)
        client.PolicyV1Api(kube.api_client()).create_namespaced_pod_disruption_budget(
            ns, client.V1PodDisruptionBudget(
                metadata=client.V1ObjectMeta(name="db"),
                spec=client.V1PodDisruptionBudgetSpec(
                    min_available=1, selector=client.V1LabelSelector(match_labels=sel))))
        _until("pod running", lambda: core.read_namespaced_pod(pod, ns).status.phase == "Running")
        r = _deploy(kube, host, tmp_path, node, _hive(tmp_path, "karl"),
                    state=_changed_agent(tmp_path), drain_timeout=4)
    assert r.returncode == 1
    assert f"draining node {node} timed out after 4s" in r.stderr
    assert f"{ns}/{pod}" in r.stderr
    assert _calls(tmp_path) == ["dry-activate"]  # never switched
    assert _at_switch(tmp_path) == []
    # cordoned by this deploy, whose drain failed: nothing was deployed, so the node goes
    # back to work, and the run says so
    got = core.read_node(node)
    assert not got.spec.unschedulable
    assert kubelib.CORDONED_BY not in (got.metadata.annotations or {})
    assert f"node {node} was uncordoned (nothing deployed)" in " ".join(r.stderr.split())


def _cordon_marked(core: Any, node: str, stack: str) -> None:
    core.patch_node(node, {"metadata": {"annotations": {kubelib.CORDONED_BY: stack}},
                           "spec": {"unschedulable": True}})


@pytest.mark.parametrize("restarts", [True, False], ids=["drained", "no-drain"])
def test_a_cordon_an_earlier_run_of_the_stack_left_is_undone_after_a_healthy_deploy(
    kube: Any, host: Host, tmp_path: Path, restarts: bool
) -> None:
    """An earlier run cordoned the node and failed (or its uncordon did): this run, whether
    or not its switch restarts the agent, uncordons it after the gates."""
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node)
    _cordon_marked(core, node, STACK)
    state = _changed_agent(tmp_path) if restarts else tmp_path / "state"
    hive = _hive(tmp_path, "karl")
    with kube.kubelet():
        if not restarts:  # a first deploy records what the agent runs: the next restarts nothing
            assert _deploy(kube, host, tmp_path, node, hive, state=state,
                           stack="other").returncode == 0
            _cordon_marked(core, node, STACK)
        r = _deploy(kube, host, tmp_path, node, hive, state=state)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("no drain" in r.stderr) is not restarts
    got = core.read_node(node)
    assert not got.spec.unschedulable
    assert kubelib.CORDONED_BY not in (got.metadata.annotations or {})
    assert f"{node}: uncordoned" in r.stderr


def test_a_mark_left_on_a_node_uncordoned_by_hand_is_removed_so_a_later_hand_cordon_stays(
    kube: Any, host: Host, tmp_path: Path
) -> None:
    """kubectl uncordon leaves annotations alone: after an earlier run's cordon was undone by
    hand, its mark stays on a schedulable node, and a kubectl cordon later would look like the
    stack's own. A deploy that finds its stack's mark on a schedulable node removes it."""
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node)
    state = tmp_path / "state"
    hive = _hive(tmp_path, "karl")
    with kube.kubelet():
        # a first deploy records what the agent runs: the next restarts nothing (no drain)
        assert _deploy(kube, host, tmp_path, node, hive, state=state,
                       stack="other").returncode == 0
        _cordon_marked(core, node, STACK)  # an earlier run of the stack, which failed
        core.patch_node(node, {"spec": {"unschedulable": None}})  # kubectl uncordon by hand
        r = _deploy(kube, host, tmp_path, node, hive, state=state)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "no drain" in r.stderr
        assert kubelib.CORDONED_BY not in (core.read_node(node).metadata.annotations or {})
        assert f"its mark {kubelib.CORDONED_BY} removed" in " ".join(r.stderr.split())
        core.patch_node(node, {"spec": {"unschedulable": True}})  # kubectl cordon by hand
        r = _deploy(kube, host, tmp_path, node, hive, state=state)
    assert r.returncode == 0, r.stderr[-3000:]
    assert core.read_node(node).spec.unschedulable is True  # the hand cordon stays
    assert f"{node}: uncordoned" not in r.stderr


def test_a_cordon_of_another_stack_stays(kube: Any, host: Host, tmp_path: Path) -> None:
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node)
    _cordon_marked(core, node, "lab")
    with kube.kubelet():
        r = _deploy(kube, host, tmp_path, node, _hive(tmp_path, "karl"),
                    state=_changed_agent(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    got = core.read_node(node)
    assert got.spec.unschedulable is True
    assert got.metadata.annotations[kubelib.CORDONED_BY] == "lab"
    assert "was already cordoned; it stays cordoned" in r.stderr


def test_an_uncordon_that_fails_after_a_healthy_deploy_says_what_to_run(kube: Any) -> None:
    from k3scluster.drain import Drain
    from k3scluster.errors import K3sClusterError

    # the API went away between the gates and the uncordon (nothing listens at port 1)
    d = Drain(kube.kubeconfig, "https://127.0.0.1:1", "karl-k3s-agent", 10, lambda _: None,
              cordoned=True, owner=STACK)
    with pytest.raises(K3sClusterError) as got:
        d.after("karl")
    text = f"{got.value.message} {got.value.hint}"
    assert "karl: deployed and healthy, but uncordoning node karl-k3s-agent failed" in text
    assert "kubectl uncordon karl-k3s-agent" in text


def test_a_dead_man_switch_that_cannot_be_armed_undoes_the_cordon(
    kube: Any, host: Host, tmp_path: Path
) -> None:
    """The drain went through, then the deploy stopped before colmena (this host's
    /run/current-system is no system to go back to): nothing deployed, the node goes back."""
    core = kube.core()
    node = f"karl-{int(time.time() * 1000) % 100000}"
    _ready_node(core, node)
    with kube.kubelet():
        r = _deploy(kube, host, tmp_path, node, _hive(tmp_path, "karl"),
                    state=_changed_agent(tmp_path), guard=("--confirm-timeout", "30"))
    assert r.returncode == 1
    text = " ".join(r.stderr.split())
    assert "/run/current-system is not a Nix store path" in text
    assert f"node {node} was uncordoned (nothing deployed)" in text
    assert _calls(tmp_path) == ["dry-activate"]  # never pushed nor switched
    assert not core.read_node(node).spec.unschedulable
