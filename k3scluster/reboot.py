"""Reboot a host after its deploy when its kernel, initrd or kernel parameters changed
(``k3scluster:reboot auto``, issue 17 item 3). No pulumi.

``k3scluster:reboot`` is ``never`` (the default: the hosts are listed in the stack output
``needsReboot`` and the run warns, ``k3scluster.bootentries``) or ``auto``. With ``auto`` the
deploy step of each host (``tasks deploy --reboot-timeout S``), after the switch and its
health gates, asks the host whether its boot entries differ from the booted system's
(:func:`boot_entries_changed`, the rule of ``bootentries.boot_script``) and, when they do:

0. for a host with a K3s server: refuses unless every other etcd member is healthy
   (:func:`refuse_unless_other_members_healthy`: its own member goes down for the reboot);
1. drains the host's K3s agent node (cordon, then the Eviction API; ``k3scluster.drain``),
   unless the switch already drained it (kept cordoned until after the reboot), even when the
   switch itself left the agent running;
2. runs ``systemctl reboot`` over ssh and remembers the boot id the host had
   (``/proc/sys/kernel/random/boot_id``, new on every boot);
3. waits until ssh answers with a NEW boot id (a host still shutting down answers with the old
   one), bounded by ``k3scluster:rebootTimeout``, a progress line at least every 30 s;
4. runs the host's health gates again within the same time (its K3s server's ``/readyz``, its
   agent's Node Ready as the kubelet of the new boot reports it: ``nodeInfo.bootID``);
5. uncordons the node, only when this deploy cordoned it (a node cordoned by hand stays so).

The deploy's record read back afterwards then shows no reboot needed. One host at a time:
server hosts already deploy one after the other, each after the one before passed its gates
(etcd keeps its quorum: only the rebooting host's member is down), and with ``auto`` the agent
hosts move in batches of one (``update_plan.UpdateSettings.reboot_auto``).

A refused reboot or a failed drain fails the deploy saying that the host runs its new system,
not rebooted (:func:`not_rebooted`), and what became of its node. A reboot that does not come
back in time fails the deploy naming the host; a node this deploy
cordoned stays cordoned and the error says so. It is never rolled back (``k3scluster.rollback``
covers the switch and its gates, which passed before the reboot): the system the host booted
is the one the deploy made its boot default.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Protocol

from k3scluster import kube
from k3scluster.bootentries import boot_script
from k3scluster.errors import K3sClusterError
from k3scluster.membership import Member

REBOOT_MODES = ("never", "auto")
BOOT_ID = "/proc/sys/kernel/random/boot_id"
REBOOT_COMMAND = ("systemctl", "reboot")
REPORT_EVERY = 10.0  # seconds between progress lines while a host is away (with a slow ssh
# try of up to 15 s on top, still under 30 s)
POLL_EVERY = 3.0
SSH_CONNECT_TIMEOUT = 5  # each try while the host is away

# remote words, connect timeout -> the finished ssh (tasks._ssh_run: exit 255 when ssh failed)
Run = Callable[[list[str], int], "subprocess.CompletedProcess[str]"]


class Undo(Protocol):
    """A drain to undo after (``k3scluster.drain.Drain``): what it says on a failure."""

    def left_cordoned(self, err: K3sClusterError) -> K3sClusterError: ...


def _said(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"ssh exit code {proc.returncode}"


def not_rebooted(host: str) -> str:
    """What became of a host whose reboot did not start (after its switch and gates)."""
    return f"{host} runs its new system (switched, its gates passed) and was not rebooted"


def refuse_unless_other_members_healthy(
    host: str, own: list[str], read: Callable[[], list[Member]], node: str | None,
) -> None:
    """Before a server host reboots, every OTHER etcd member must be healthy (``read()``: the
    members and their health as etcd reports them through this host's server; ``own``: the
    host's K3s server node names): this host's member is down for the reboot, and another one
    down too may cost etcd its quorum. A server that has not joined yet is no member (a new
    cluster's first server reboots alone). Raises naming the unhealthy members, the host's
    state and ``node``'s (its agent's, not cordoned yet); also when etcd cannot be asked."""
    cordon = f"; node {node} was not cordoned" if node else ""
    try:
        members = read()
    except K3sClusterError as err:
        raise K3sClusterError(
            f"{host}: cannot read etcd's members before its reboot ({err.message}): "
            f"{not_rebooted(host)}{cordon}", hint=err.hint) from None
    bad = [m for m in members if m.node not in own and not m.healthy]
    if not bad:
        return
    raise K3sClusterError(
        f"{host}: its kernel, initrd or kernel parameters changed, but another etcd member is "
        f"not healthy ({', '.join(m.name or '(unstarted)' for m in bad)}): rebooting {host} "
        f"would take a second member down (etcd may lose its quorum); "
        f"{not_rebooted(host)}{cordon}",
        hint="bring the other servers back to health (journalctl -M k3s-server -u k3s on "
        f"their hosts); then `pulumi up` reboots {host}, or reboot it by hand once they are "
        "(ssh root@<host> systemctl reboot)",
    )


def boot_entries_changed(run: Run, ip: str) -> list[str] | None:
    """The boot entries (kernel, initrd, kernel-params) of the host's current system that
    differ from its booted system's; None when the host cannot tell (not a NixOS system)."""
    proc = run([boot_script()], 15)
    if proc.returncode != 0:
        raise K3sClusterError(
            f"cannot ask {ip} whether it needs a reboot: {_said(proc)}",
            hint="check that the host is up and accepts your ssh key for root",
        )
    lines = proc.stdout.splitlines()
    if "reboot-checked" not in lines:
        return None
    return [ln[len("reboot:"):] for ln in lines if ln.startswith("reboot:")]


def boot_id(run: Run, timeout: int = 15) -> tuple[str | None, str]:
    """The host's boot id, or None and what ssh said."""
    proc = run(["cat", BOOT_ID], timeout)
    value = proc.stdout.strip() if proc.returncode == 0 else ""
    return (value or None), (f"boot id {value}" if value else _said(proc))


def reboot_and_wait(
    host: str,
    run: Run,
    timeout: float,
    progress: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, str, float]:
    """``systemctl reboot`` on the host, then wait until ssh answers with another boot id.
    Returns (old boot id, new boot id, the deadline the gates after it keep)."""
    old, said = boot_id(run)
    if old is None:
        raise K3sClusterError(f"{host}: cannot read its boot id ({BOOT_ID}): {said}; not rebooted")
    start = clock()
    deadline = start + timeout
    progress(f"{host}: rebooting (`{' '.join(REBOOT_COMMAND)}`), boot id {old}")
    proc = run(list(REBOOT_COMMAND), 10)
    # 255: ssh lost the connection, which a reboot may do before systemctl answers
    if proc.returncode not in (0, 255):
        raise K3sClusterError(
            f"{host}: `{' '.join(REBOOT_COMMAND)}` failed with exit code {proc.returncode}: "
            f"{_said(proc)}; not rebooted",
        )
    new: list[str] = []

    def back() -> kube.Check:
        got, seen = boot_id(run, SSH_CONNECT_TIMEOUT)
        if got is None:
            return kube.Check(False, f"no ssh answer yet ({seen})")
        if got == old:
            return kube.Check(False, f"still answers from the boot before ({seen})")
        new[:] = [got]
        return kube.Check(True, f"up again with a new {seen}")

    check = kube.wait_until(
        f"{host}: rebooting", back, max(0.0, deadline - clock()), progress,
        interval=POLL_EVERY, report_every=REPORT_EVERY, clock=clock, sleep=sleep,
    )
    if not check.ready:
        raise K3sClusterError(
            f"{host}: not back from its reboot after {kube.duration(timeout)} "
            f"(k3scluster:rebootTimeout); last seen: {check.seen}",
            hint="look at the host's console; when it is up again, `pulumi up` checks it "
            "again (or raise the time: pulumi config set k3scluster:rebootTimeout 30m)",
        )
    return old, new[0], deadline


def reboot_if_needed(
    host: str,
    ip: str,
    run: Run,
    *,
    timeout: float,
    drained: Undo | None,
    drain: Callable[[], Undo | None],
    gates: Callable[[float, str], object],
    progress: Callable[[str], None],
    may_reboot: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[str], Undo | None]:
    """After the switch and its gates: when the host's boot entries changed, drain (unless
    ``drained``: the switch's drain, still cordoned), reboot, wait for a new boot id and run
    ``gates(deadline, new boot id)`` again (a Node's Ready counts only from a kubelet of the
    new boot: the API shows the old one Ready for a while after it went away), all within ``timeout`` s from the reboot; ``may_reboot()``
    first, which raises to refuse the reboot (a server host while another etcd member is not
    healthy: :func:`refuse_unless_other_members_healthy`). Returns the entries it
    rebooted for ([] none) and the drain the caller undoes (uncordons) after: ``drained`` or
    the one made here. A failure says the node stays cordoned (``left_cordoned``)."""
    changed = boot_entries_changed(run, ip)
    if not changed:
        progress(f"{host}: runs the kernel, initrd and kernel parameters it booted: no reboot"
                 if changed == [] else f"{host}: cannot tell whether it needs a reboot: none")
        return [], drained
    try:
        may_reboot()
    except K3sClusterError as err:
        raise drained.left_cordoned(err) if drained is not None else err from None
    progress(f"{host}: its {', '.join(changed)} changed since it booted: rebooting it")
    undo = drained if drained is not None else drain()
    try:
        _old, new, deadline = reboot_and_wait(host, run, timeout, progress, clock=clock,
                                              sleep=sleep)
        gates(deadline, new)
    except K3sClusterError as err:
        raise undo.left_cordoned(err) if undo is not None else err from None
    return changed, undo
