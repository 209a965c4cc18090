"""k3scluster/reboot.py's sequence, with the host's ssh answers and the clock given by the test
(tests/test_reboot_engine.py runs it for real: the engine, sshd, a reboot stand-in).

A host is a small script of what ``cat /proc/sys/kernel/random/boot_id`` and the boot-entry
check answer; each ssh try moves the test's clock on by the seconds it would take.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from k3scluster.errors import K3sClusterError
from k3scluster.reboot import BOOT_ID, REBOOT_COMMAND, reboot_if_needed


@dataclass
class Host:
    """The answers of one host; ``back_after``: tries of the boot id after the reboot until it
    answers with a new one (None: never); the first try still gets the old one."""

    changed: str = "reboot:kernel\nreboot-checked\n"
    back_after: int | None = 3
    try_seconds: float = 15.0  # an ssh try to a host that is away: connect timeout and more
    now: float = 0.0
    asked: list[list[str]] = field(default_factory=list)
    rebooted: bool = False
    tries: int = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s

    def run(self, words: list[str], timeout: int) -> subprocess.CompletedProcess[str]:
        self.asked.append(words)
        if words == list(REBOOT_COMMAND):
            self.rebooted = True
            return subprocess.CompletedProcess(words, 255, "", "Connection closed by remote host")
        if words == ["cat", BOOT_ID]:
            if not self.rebooted:
                return subprocess.CompletedProcess(words, 0, "old-id\n", "")
            self.tries += 1
            self.now += self.try_seconds
            if self.tries == 1:  # still shutting down: its sshd answers from the old boot
                return subprocess.CompletedProcess(words, 0, "old-id\n", "")
            if self.back_after is None or self.tries < self.back_after:
                return subprocess.CompletedProcess(words, 255, "", "ssh: connect: Connection refused")
            return subprocess.CompletedProcess(words, 0, "new-id\n", "")
        return subprocess.CompletedProcess(words, 0, self.changed, "")  # the boot-entry check


class Drain:
    def __init__(self) -> None:
        self.made = 0

    def left_cordoned(self, err: K3sClusterError) -> K3sClusterError:
        return K3sClusterError(f"{err.message}; node karl-k3s-agent stays cordoned")


def _reboot(host: Host, drained: Drain | None = None, timeout: float = 600) -> tuple[
        list[str], object, list[str], list[float], Drain]:
    """(entries rebooted for, the drain to undo, progress lines, the deadlines the gates got,
    the drain this call would make)."""
    said: list[str] = []
    gated: list[tuple[float, str]] = []
    made = Drain()

    def drain() -> Drain:
        made.made += 1
        return made

    changed, undo = reboot_if_needed(
        "karl", "10.0.100.5", host.run, timeout=timeout, drained=drained, drain=drain,
        gates=lambda d, booted: gated.append((d, booted)), progress=said.append, clock=host.clock, sleep=host.sleep,
    )
    return changed, undo, said, gated, made


def test_a_changed_kernel_drains_reboots_waits_for_a_new_boot_id_and_gates() -> None:
    host = Host()
    changed, undo, said, gated, made = _reboot(host)
    assert changed == ["kernel"] and undo is made and made.made == 1
    assert list(REBOOT_COMMAND) in host.asked
    # the gates again, with what is left of rebootTimeout from the reboot on (600 s at 0)
    assert gated == [(600.0, "new-id")]  # and the boot id it came back with
    assert any("still answers from the boot before (boot id old-id)" in s for s in said)
    assert any("up again with a new boot id new-id" in s for s in said)


def test_nothing_changed_reboots_nothing_and_drains_nothing() -> None:
    host = Host(changed="reboot-checked\n")
    changed, undo, said, gated, made = _reboot(host)
    assert changed == [] and undo is None and made.made == 0 and gated == []
    assert list(REBOOT_COMMAND) not in host.asked
    assert said == ["karl: runs the kernel, initrd and kernel parameters it booted: no reboot"]


def test_the_switchs_drain_is_kept_not_made_again() -> None:
    kept = Drain()
    changed, undo, _, _, made = _reboot(Host(), drained=kept)
    assert changed == ["kernel"] and undo is kept and made.made == 0


def test_a_host_that_does_not_come_back_fails_in_time_naming_it_and_its_cordon() -> None:
    host = Host(back_after=None)
    with pytest.raises(K3sClusterError) as err:
        _reboot(host, timeout=120)
    assert "karl: not back from its reboot after 2m (k3scluster:rebootTimeout)" in err.value.message
    assert "Connection refused" in err.value.message
    assert "node karl-k3s-agent stays cordoned" in err.value.message
    # bounded: the last try started before the deadline
    assert host.now <= 120 + host.try_seconds + 3


def test_progress_lines_come_at_least_every_30_seconds_while_the_host_is_away() -> None:
    host = Host(back_after=None)
    said: list[float] = []
    with pytest.raises(K3sClusterError):
        reboot_if_needed(
            "karl", "10.0.100.5", host.run, timeout=300, drained=Drain(), drain=Drain,
            gates=lambda _d, _b: None, progress=lambda _s: said.append(host.now),
            clock=host.clock, sleep=host.sleep,
        )
    gaps = [b - a for a, b in itertools.pairwise(said)]
    assert gaps and max(gaps) <= 30, gaps


def test_a_server_host_is_not_rebooted_while_another_etcd_member_is_not_healthy() -> None:
    """etcd's quorum: the host's member goes down for the reboot, so every other member must
    be healthy first; refused before the drain and the reboot, saying what the host runs. A
    server that has not joined yet is no member: a new cluster's first server reboots."""
    from k3scluster.membership import Member
    from k3scluster.reboot import refuse_unless_other_members_healthy

    members = [Member(1, "olaf-k3s-server-0a1b2c3d", True),
               Member(2, "ulf-k3s-server-1a1b2c3d", True),
               Member(3, "rolf-k3s-server-2a1b2c3d", False)]

    def check(listed: list[Member], node: str | None = "olaf-k3s-agent") -> None:
        refuse_unless_other_members_healthy("olaf", ["olaf-k3s-server"], lambda: listed, node)

    host = Host()
    made = Drain()
    with pytest.raises(K3sClusterError) as err:
        reboot_if_needed(
            "olaf", "10.0.100.2", host.run, timeout=600, drained=None,
            drain=lambda: made, gates=lambda _d, _b: None, progress=lambda _s: None,
            may_reboot=lambda: check(members), clock=host.clock, sleep=host.sleep,
        )
    text = err.value.message
    assert "another etcd member is not healthy (rolf-k3s-server-2a1b2c3d)" in text
    assert "ulf-k3s" not in text
    assert "olaf runs its new system (switched, its gates passed) and was not rebooted" in text
    assert "node olaf-k3s-agent was not cordoned" in text
    assert list(REBOOT_COMMAND) not in host.asked and made.made == 0
    # the switch's drain: the node stays cordoned, and the error says so
    with pytest.raises(K3sClusterError) as err:
        reboot_if_needed(
            "olaf", "10.0.100.2", Host().run, timeout=600, drained=Drain(),
            drain=lambda: made, gates=lambda _d, _b: None, progress=lambda _s: None,
            may_reboot=lambda: check(members, None), clock=host.clock, sleep=host.sleep,
        )
    assert "not rebooted; node karl-k3s-agent stays cordoned" in err.value.message
    # its own member is not asked about (it is the one going down); etcd not answering:
    # refused too (nothing tells that the others are healthy)
    check([Member(1, "olaf-k3s-server-0a1b2c3d", False), *members[1:2]])
    check(members[:1])  # a new cluster: the first server alone
    with pytest.raises(K3sClusterError, match="cannot read etcd's members before its reboot "
                       r"\(no etcd\): olaf runs its new system"):
        refuse_unless_other_members_healthy(
            "olaf", ["olaf-k3s-server"],
            lambda: (_ for _ in ()).throw(K3sClusterError("no etcd")), None)
    # every other member healthy: rebooted
    changed, _undo = reboot_if_needed(
        "olaf", "10.0.100.2", Host().run, timeout=600, drained=None, drain=lambda: made,
        gates=lambda _d, _b: None, progress=lambda _s: None,
        may_reboot=lambda: check(members[:2]), clock=host.clock, sleep=host.sleep,
    )
    assert changed == ["kernel"]


def _reboot_args(**over: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "host": "karl", "ip": "10.0.100.5", "drain": "karl-k3s-agent",
        "api": ["https://10.0.100.10:6443"], "credentials_from": ["10.0.100.2"],
        "timeout": 30.0, "drain_timeout": 4.0, "stack": "prod", "reboot_timeout": "60",
    }
    values.update(over)
    return argparse.Namespace(**values)


@pytest.fixture
def karl(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """tasks' deploy of karl (an agent host) after its switch and gates, its kernel changed:
    ssh answers as :class:`Host`, the API (kube's calls) as a node whose drain times out;
    what was done to the node."""
    from k3scluster import kube
    from k3scluster.components import tasks

    host = Host()
    done: list[str] = []
    monkeypatch.setattr(tasks, "_ssh_run", lambda _ssh, _ip, words, timeout=15: host.run(
        words, timeout))
    monkeypatch.setattr(tasks, "_credentials", lambda *_a: {"admin": "kubeconfig"})
    monkeypatch.setattr(kube, "read_node", lambda *_a, **_k: kube.NodeSeen(
        kube.Check(True, "Ready"), registered=True))
    monkeypatch.setattr(kube, "cordon", lambda *_a, **_k: done.append("cordon") or True)
    monkeypatch.setattr(kube, "uncordon", lambda *_a, **_k: done.append("uncordon"))

    def drain(*_a: object, **_k: object) -> None:
        done.append("drain")
        raise K3sClusterError("draining node karl-k3s-agent timed out after 4s")

    monkeypatch.setattr(kube, "drain", drain)
    return done


def test_a_drain_before_a_reboot_that_fails_says_the_host_runs_its_new_system(
    karl: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host was switched and passed its gates: the error must not say nothing was
    deployed, but that it runs its new system, was not rebooted, and what its node is."""
    from k3scluster.components import tasks

    with pytest.raises(K3sClusterError) as err:
        tasks._reboot_if_needed(_reboot_args(), None, [], ["karl-k3s-agent"], None)  # type: ignore[arg-type]
    text = err.value.message
    assert karl == ["cordon", "drain", "uncordon"]
    assert "nothing was deployed" not in text and "nothing deployed" not in text
    assert ("draining node karl-k3s-agent timed out after 4s; karl runs its new system "
            "(switched, its gates passed) and was not rebooted; node karl-k3s-agent was "
            "uncordoned") in text
    # no credentials for the drain: nothing cordoned
    monkeypatch.setattr(tasks, "_credentials", lambda *_a: None)
    with pytest.raises(K3sClusterError) as err:
        tasks._reboot_if_needed(_reboot_args(), None, [], ["karl-k3s-agent"], None)  # type: ignore[arg-type]
    text = err.value.message
    assert "nothing was deployed" not in text
    assert "karl runs its new system (switched, its gates passed) and was not rebooted; " \
           "node karl-k3s-agent was not cordoned" in text


def test_tasks_asks_etcd_through_its_own_server_before_a_server_host_reboots(
    karl: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deploy's wiring: a server host asks etcd's members through its own address (its
    server passed its gate) and refuses with one unhealthy; an agent-only host asks nothing."""
    from k3scluster import etcdmembers
    from k3scluster.components import tasks
    from k3scluster.membership import Member

    asked: list[list[str]] = []

    def read_members(_run: object, via: list[str]) -> etcdmembers.View:
        asked.append(list(via))
        return etcdmembers.View(via[0], [Member(1, "olaf-k3s-server-0a1b2c3d", True),
                                         Member(2, "rolf-k3s-server-2a1b2c3d", False)])

    monkeypatch.setattr(etcdmembers, "read_members", read_members)
    monkeypatch.setattr(etcdmembers, "ssh_runner", lambda _ssh: None)
    args = _reboot_args(host="olaf", ip="10.0.100.2", drain="olaf-k3s-agent")
    with pytest.raises(K3sClusterError) as err:
        tasks._reboot_if_needed(args, None, [["olaf-k3s-server", "10.0.100.10"]],  # type: ignore[arg-type]
                                ["olaf-k3s-agent"], None)
    assert asked == [["10.0.100.2"]]
    assert "another etcd member is not healthy (rolf-k3s-server-2a1b2c3d)" in err.value.message
    assert "node olaf-k3s-agent was not cordoned" in err.value.message
    assert karl == []  # neither cordoned nor drained
    asked.clear()
    with pytest.raises(K3sClusterError, match="timed out"):  # karl: an agent host, its drain
        tasks._reboot_if_needed(_reboot_args(), None, [], ["karl-k3s-agent"], None)  # type: ignore[arg-type]
    assert asked == []


def test_the_gates_after_a_reboot_wait_for_a_kubelet_of_the_new_boot(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after a reboot the API still shows the Node Ready as the kubelet of the boot
    before left it (until the node controller's grace period passes): that Ready must not
    pass the gate, or the node is uncordoned before its kubelet is back. The kubelet reports
    its machine's boot id (nodeInfo.bootID): Ready counts from the new one on."""
    from k3scluster import kube
    from k3scluster.components import tasks

    answers = ["old-id", "old-id", "new-id"]
    reads: list[str] = []

    def read_node(*_a: object, **_k: object) -> kube.NodeSeen:
        boot = answers[min(len(reads), len(answers) - 1)]
        reads.append(boot)
        return kube.NodeSeen(kube.Check(True, "node karl-k3s-agent Ready"), registered=True,
                             boot_id=boot)

    said: list[str] = []
    monkeypatch.setattr(tasks, "_credentials", lambda *_a: {"admin": "kubeconfig"})
    monkeypatch.setattr(tasks, "_progress", said.append)
    monkeypatch.setattr(kube, "read_node", read_node)
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    args = _reboot_args()
    tasks._gates(args, None, [], ["karl-k3s-agent"], 60, time.monotonic() + 60,  # type: ignore[arg-type]
                 booted="new-id")
    assert reads == ["old-id", "old-id", "new-id"]
    assert any("its kubelet has not reported since the reboot (boot id old-id, the host's "
               "is new-id)" in s for s in said), said
    # never from the new boot: the gate fails in time, saying so
    answers[:] = ["old-id"]
    reads.clear()
    with pytest.raises(K3sClusterError) as err:
        tasks._gates(args, None, [], ["karl-k3s-agent"], 1, time.monotonic() + 1,  # type: ignore[arg-type]
                     booted="new-id")
    assert "not Ready after 1s" in err.value.message
    assert "has not reported since the reboot" in err.value.message
    # the gates of a switch (no reboot) read the Node as before
    reads.clear()
    tasks._gates(args, None, [], ["karl-k3s-agent"], 60, time.monotonic() + 60)  # type: ignore[arg-type]
    assert reads == ["old-id"]
