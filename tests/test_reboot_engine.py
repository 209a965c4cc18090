"""Reboots after a deploy (issue 17 item 3), with the real engine.

``k3scluster:reboot never`` (the default): a host whose kernel, initrd or kernel parameters
differ from the booted system's is listed in the stack output ``needsReboot`` and in the
warning the run ends with. ``auto``: its deploy drains its agent node, reboots it, waits for a
new boot id over ssh and its gates, and uncordons it; ``needsReboot`` is then empty. With
``auto`` the agent hosts move one at a time, whatever ``maxUnavailable`` says.

The real engine runs ``pulumi up`` of the example cluster against the lab of
tests/test_health.py (a real sshd per host in network and mount namespaces of the test's own,
the K3s API stand-in, the colmena stand-in). Each host's ``/run/booted-system`` and
``/run/current-system`` are stand-in system directories (kernel and initrd links, a
kernel-params file): the current system's kernel is another than the booted one's, as after
a switch to a new NixOS release. ``systemctl`` in every host's sessions is the reboot stand-in
tests/bin/host/systemctl (a new boot id bind-mounted over the real path, the booted system
re-pointed, sshd stopped and started again). No packet leaves the machine.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from engine import run_pulumi
from test_health import ROOT, SSHD, STACK, Lab, Project, new_lab, system_dir
from test_update_components import add_agent_hosts

from k3scluster.bootentries import hosts_needing_reboot, reboot_warning
from k3scluster.records import DEPLOYED_PREFIX, last_json


def test_hosts_needing_reboot_lists_hosts_whose_record_names_a_changed_boot_entry() -> None:
    records = {
        "ulrich": {"system": "/nix/store/a", "reboot": ["kernel", "initrd"]},
        "olaf": {"system": "/nix/store/b", "reboot": []},
        "karl": {"system": "/nix/store/c", "reboot": None},  # could not tell
        "rolf": {"system": "/nix/store/d"},  # deployed before the record said
        "ulf": None,  # no deploy record (waitReady false, or failed)
        "anna": {"reboot": ["kernel-params"]},
    }
    assert hosts_needing_reboot(records) == ["anna", "ulrich"]
    assert hosts_needing_reboot({}) == []


def test_reboot_warning_names_each_host_and_how_to_reboot_it() -> None:
    assert reboot_warning([], {"olaf": "10.0.100.2"}) is None
    text = reboot_warning(["anna", "ulrich"], {"anna": "10.0.0.9", "ulrich": "10.0.100.6"})
    assert text is not None
    assert "2 host(s) need a reboot" in text and "anna, ulrich" in text
    assert "ssh root@10.0.0.9 systemctl reboot; ssh root@10.0.100.6 systemctl reboot" in text
    assert "one at a time" in text and "kubectl drain" in text and "needsReboot" in text


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return with_reboot_stand_in(new_lab(tmp_path))


STANDIN = ROOT / "tests" / "bin" / "host" / "systemctl"
SESSION_PATH = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def with_reboot_stand_in(lab: Lab) -> Lab:
    """Every host's ssh sessions find the systemctl stand-in (its ``reboot``) first on their
    PATH (a directory holding it alone), and every systemctl of the machine on that PATH is
    the stand-in too in the hosts' mount namespaces: no session of the lab can reach a real
    reboot."""
    hostbin = lab.dir / "reboot-bin"
    hostbin.mkdir()
    (hostbin / "systemctl").symlink_to(STANDIN)
    for h in lab.hosts.values():
        (h / "run" / "reboot-stand-in.json").write_text(json.dumps({
            "pid_file": str(h / "sshd.pid"),
            "sshd": [str(SSHD), "-D", "-f", str(h / "sshd_config"), "-E", str(h / "sshd.log")],
        }))
        with (h / "sshd_config").open("a") as f:
            f.write(f"SetEnv PATH={hostbin}:{':'.join(SESSION_PATH)} "
                    "K3SCLUSTER_REBOOT_STAND_IN=1\n")
    # each host's agent reports the boot id the stand-in gave it (the gates after a reboot
    # wait for a kubelet of the new boot)
    lab.boot_ids.update({f"{host}-k3s-agent": str(h / "run" / "reboots.jsonl")
                         for host, h in lab.hosts.items()})
    script = json.loads(lab.api_script.read_text())
    lab.set_api(readyz=script["readyz"], nodes=script["nodes"])
    real = sorted({os.path.realpath(p) for d in SESSION_PATH
                   if os.path.exists(p := os.path.join(d, "systemctl"))})
    for host in lab.hosts:
        lab.binds.setdefault(host, []).extend((STANDIN, r) for r in real)
    return lab


def reboots(lab: Lab, host: str) -> list[dict[str, Any]]:
    """What the reboot stand-in recorded on ``host``."""
    f = lab.hosts[host] / "run" / "reboots.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.exists() else []


@pytest.mark.integration
@pytest.mark.root
def test_up_lists_the_host_whose_kernel_changed_in_needs_reboot_and_warns(
    lab: Lab, tmp_path: Path
) -> None:
    systems = tmp_path / "systems"
    systems.mkdir()
    old, new = system_dir(systems, "old", "kernel-6.6"), system_dir(systems, "new", "kernel-6.12")
    same = system_dir(systems, "same", "kernel-6.6-olaf")
    # ulrich booted the old system and was switched to one with another kernel
    (lab.hosts["ulrich"] / "run" / "booted-system").symlink_to(old)
    lab.repoint("ulrich", str(new))
    # olaf runs the system it booted
    (lab.hosts["olaf"] / "run" / "booted-system").symlink_to(same)
    lab.repoint("olaf", str(same))

    p = Project(tmp_path, lab)
    r = p.up()
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-6000:] + lab.sshd_logs()[-3000:]

    assert p.outputs()["needsReboot"] == ["ulrich"]
    # each deploy step's result keeps what it saw (olaf: nothing changed since it booted)
    assert last_json(p.step_state("ulrich-deploy")["outputs"]["stdout"],
                     DEPLOYED_PREFIX)["reboot"] == ["kernel"]
    assert last_json(p.step_state("olaf-deploy")["outputs"]["stdout"], DEPLOYED_PREFIX)[
        "reboot"] == []
    flat = " ".join(text.split())
    assert "1 host(s) need a reboot to run their new kernel, initrd or kernel parameters: " \
           "ulrich." in flat
    assert "ssh root@10.0.100.6 systemctl reboot" in flat
    assert "ssh root@10.0.100.2" not in flat  # olaf needs none
    assert reboots(lab, "ulrich") == []  # never: nothing rebooted


@pytest.mark.integration
@pytest.mark.root
def test_reboot_auto_drains_reboots_gates_and_uncordons_the_host_whose_kernel_changed(
    lab: Lab, tmp_path: Path
) -> None:
    systems = tmp_path / "systems"
    systems.mkdir()
    old, new = system_dir(systems, "old", "kernel-6.6"), system_dir(systems, "new", "kernel-6.12")
    same = system_dir(systems, "same", "kernel-6.6-olaf")
    # karl (an agent of its own) booted the old system and is switched to another kernel
    (lab.hosts["karl"] / "run" / "booted-system").symlink_to(old)
    lab.repoint("karl", str(new))
    (lab.hosts["olaf"] / "run" / "booted-system").symlink_to(same)
    lab.repoint("olaf", str(same))

    p = Project(tmp_path, lab, reboot="auto", rebootTimeout="60s")
    # the preview says which hosts may reboot (it cannot know whose kernel changes)
    r = p.pulumi("preview")
    flat = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0, flat[-3000:]
    assert ("karl: reboot possible (k3scluster:reboot auto: when its kernel, initrd or kernel "
            "parameters change, it is drained, rebooted and checked by its gates again)") in flat
    r = p.up()
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-6000:] + lab.sshd_logs()[-3000:]

    # karl was rebooted once, into the system the switch made current; olaf not at all
    (boot,) = reboots(lab, "karl")
    assert boot["booted"] == str(new) and boot["old"] != boot["new"]
    assert reboots(lab, "olaf") == []
    # the node: cordoned before the reboot (no drain for the switch: it left the agent
    # running), gated Ready after it, uncordoned after that; no other node was touched
    api = lab.api_requests()
    patches = [q for q in api if q["method"] == "PATCH"]
    assert [(q["path"], q["unschedulable"]) for q in patches] == [
        ("/api/v1/nodes/karl-k3s-agent", True), ("/api/v1/nodes/karl-k3s-agent", False)]
    cordon, uncordon = patches[0]["t"], patches[1]["t"]
    assert cordon < boot["t"] < uncordon
    listed = [q["t"] for q in api if q["path"].startswith("/api/v1/pods")]
    assert listed and cordon < min(listed) < boot["t"]  # drained after the cordon
    gated = [q["t"] for q in api if q["path"] == "/api/v1/nodes/karl-k3s-agent"
             and q["method"] == "GET" and boot["t"] < q["t"] < uncordon]
    assert gated, "karl's agent was not gated again after its reboot"
    # the record after it: nothing left to reboot
    assert p.outputs()["needsReboot"] == []
    assert last_json(p.step_state("karl-deploy")["outputs"]["stdout"],
                     DEPLOYED_PREFIX)["reboot"] == []
    flat = " ".join(text.split())
    assert "karl: its kernel changed since it booted: rebooting it" in flat
    assert "karl: it reboots: draining karl-k3s-agent first" in flat
    assert f"karl: rebooting: up again with a new boot id {boot['new']}" in flat
    assert "need a reboot" not in flat


class Held:
    """The colmena stand-in holds karl and anton (``COLMENA_HOLD``) until both have started or
    ``wait`` seconds passed: whether both were in flight together is what ``together`` says."""

    def __init__(self, base: Path, wait: float = 6.0) -> None:
        base.mkdir()
        self.hold = base / "hold"
        self.together: bool | None = None
        self.env = {"COLMENA_HOLD": str(self.hold), "COLMENA_HOLD_HOSTS": "karl,anton"}
        self._wait = wait
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _started(self, host: str) -> bool:
        return Path(f"{self.hold}.{host}.started").exists()

    def _watch(self) -> None:
        while not self._started("karl"):  # the agent hosts come after the servers
            time.sleep(0.05)
        end = time.monotonic() + self._wait
        while time.monotonic() < end and not self._started("anton"):
            time.sleep(0.05)
        self.together = self._started("anton")
        Path(f"{self.hold}.release").write_text("go")

    def join(self) -> None:
        self._thread.join(timeout=120)


def spans(p: Project, since: int, hosts: list[str]) -> dict[str, tuple[float, float]]:
    """host -> (its first colmena call's start, its last one's end) since call ``since``."""
    calls = [c for c in p.colmena_calls()[since:] if c["argv"][0] == "apply"]
    return {h: (min(c["start"] for c in calls if c["hosts"] == [h]),
                max(c["end"] for c in calls if c["hosts"] == [h])) for h in hosts}


def change_agent_hosts(p: Project, hosts: list[str], n: int) -> None:
    """A change of the agent-only hosts alone (their hardware configuration)."""
    for h in hosts:
        (p.cluster / "nixConfigs" / f"{h}.hardware.nix").write_text(
            f'{{ ... }}: {{ boot.kernelParams = [ "change-{n}" ]; }}\n')


EXTRA_AGENTS = {"anton": "10.0.100.30", "bruno": "10.0.100.31"}


@pytest.fixture
def agents_lab(tmp_path: Path) -> Lab:
    lab = with_reboot_stand_in(new_lab(tmp_path, EXTRA_AGENTS))
    lab.set_api(readyz={ip: ["200"] for ip in ("10.0.100.10", "10.0.100.12", "10.0.100.14")},
                nodes={n: ["True"] for n in ("olaf-k3s-agent", "ulf-k3s-agent",
                                             "karl-k3s-agent", "anton-k3s-agent",
                                             "bruno-k3s-agent")})
    return lab


@pytest.mark.integration
@pytest.mark.root
def test_agent_only_hosts_move_max_unavailable_at_a_time_and_one_with_reboot_auto(
    agents_lab: Lab, tmp_path: Path
) -> None:
    lab = agents_lab
    agents = ["karl", "anton", "bruno"]
    p = Project(tmp_path, lab, maxUnavailable="2")
    add_agent_hosts(p.cluster, list(EXTRA_AGENTS))
    r = p.up()
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]

    # an agent-only change, maxUnavailable 2: karl and anton together, then bruno
    change_agent_hosts(p, agents, 1)
    since = len(p.colmena_calls())
    held = Held(tmp_path / "a")
    r = p.up(env=held.env)
    held.join()
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    calls = p.colmena_calls()[since:]
    assert sorted({c["hosts"][0] for c in calls if c["argv"][0] == "apply"}) == sorted(agents)
    assert held.together is True
    got = spans(p, since, agents)
    assert got["anton"][0] < got["karl"][1] and got["karl"][0] < got["anton"][1]
    assert got["bruno"][0] >= max(got["karl"][1], got["anton"][1])

    # reboot auto: one at a time (the first up after it deploys every host once more: the
    # deploy steps' command changed)
    set_config = run_pulumi(["config", "set", "--stack", STACK, "k3scluster:reboot", "auto"],
                            cwd=p.dir)
    assert set_config.returncode == 0, set_config.stderr
    r = p.up()
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    change_agent_hosts(p, agents, 2)
    since = len(p.colmena_calls())
    held = Held(tmp_path / "b")
    r = p.up(env=held.env)
    held.join()
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert held.together is False
    got = spans(p, since, agents)
    assert got["karl"][1] <= got["anton"][0] and got["anton"][1] <= got["bruno"][0]
    # the preview says so
    r = p.pulumi("preview")
    flat = " ".join((r.stdout + r.stderr).split())
    assert "k3scluster:reboot auto: the hosts with an agent move one at a time " \
           "(k3scluster:maxUnavailable 2 is not used)" in flat
