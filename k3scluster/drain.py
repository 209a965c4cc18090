"""Drain a host's K3s agent around its deploy (issue 17 item 2). No pulumi.

A deploy step of a host with an agent (``tasks deploy --drain NODE``) first asks colmena what
the switch would do: ``colmena apply dry-activate`` runs the new system's
``switch-to-configuration dry-activate`` on the host, which prints the units it would stop,
restart and start (``would restart the following units: a.service, b.service``). When the
agent's unit (``podman-k3s-agent.service``) would be stopped or restarted, every pod on that
node would die with it — and when the output is not recognisably a dry activation's (no
``would activate the configuration...``: another wording, or nothing printed), it may be: so
before the switch the node is cordoned and drained
(``k3scluster.kube``: the Eviction API, PodDisruptionBudgets respected, DaemonSet pods left,
at most ``k3scluster:drainTimeout``), and after the host passed its gates it is uncordoned —
only when the cordon is this stack's: a node someone cordoned by hand stays cordoned. A cordon
made by this project carries the stack's mark (``kube.CORDONED_BY``), so a later run of the
same stack recognises a cordon an earlier run left and uncordons it after a healthy deploy.

A drain that fails (nothing deployed) undoes the cordon. A deploy that fails after the drain
leaves the node cordoned (its pods are elsewhere; it may not be healthy) and says so.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from k3scluster.errors import K3sClusterError
from k3scluster.progress import heartbeat

AGENT_UNIT = "podman-k3s-agent.service"
NOTHING_DEPLOYED = "nothing was deployed"
_WOULD = re.compile(r"would (stop|restart|start|reload) the following units: (.*)$")
# The line switch-to-configuration dry-activate always prints, whatever changes or not: the
# Perl script (nixos/modules/system/activation/switch-to-configuration.pl) and the Rust
# switch-to-configuration-ng (pkgs/by-name/sw/switch-to-configuration-ng) of every pinned
# nixpkgs, between its "would stop"/"would NOT stop" lines and its "would restart systemd"/
# "would reload"/"would restart"/"would start" ones (each printed only when not empty).
# colmena's plain output prints it after "<host> | ".
DRY_ACTIVATION_MARK = "would activate the configuration..."


def units_changed(output: str) -> dict[str, set[str]]:
    """verb (stop, restart, start, reload) -> units, from ``switch-to-configuration
    dry-activate`` output (colmena prefixes each line with ``<host> | ``)."""
    found: dict[str, set[str]] = {}
    for line in output.splitlines():
        m = _WOULD.search(line)
        if m:
            found.setdefault(m.group(1), set()).update(
                u.strip() for u in m.group(2).split(",") if u.strip()
            )
    return found


def recognised(output: str) -> bool:
    """Is ``output`` a dry activation's, as switch-to-configuration prints it? Only then
    does the absence of a unit in its lists mean that the switch leaves that unit alone."""
    return any(line.rstrip().endswith(DRY_ACTIVATION_MARK) for line in output.splitlines())


def agent_restarts(output: str, unit: str = AGENT_UNIT) -> bool:
    """Would the switch stop or restart the agent's unit (and so every pod on the node)?
    Fails closed: output that is not recognisably a dry activation's (another wording, or
    colmena printing nothing) may hide a restart, so it counts as one."""
    if not recognised(output):
        return True
    changed = units_changed(output)
    return unit in changed.get("stop", set()) | changed.get("restart", set())


def dry_activate_argv(argv: Sequence[str]) -> list[str]:
    """``colmena apply switch …`` -> ``colmena apply dry-activate …`` (the same hosts and hive)."""
    return colmena_goal_argv(argv, "dry-activate")


def colmena_goal_argv(argv: Sequence[str], goal: str) -> list[str]:
    """``colmena apply switch …`` -> ``colmena apply <goal> …`` (the same hosts and hive)."""
    out = list(argv)
    try:
        i = out.index("apply")
    except ValueError:
        raise K3sClusterError(f"not a colmena apply: {' '.join(argv)}") from None
    if i + 1 >= len(out) or out[i + 1].startswith("-"):
        out.insert(i + 1, goal)
    else:
        out[i + 1] = goal
    return out


def dry_activate(argv: Sequence[str], progress: Callable[[str], None]) -> str:
    """Runs the dry activation of the deploy ``argv``; its output (also passed to stderr)."""
    dry = dry_activate_argv(argv)
    progress(f"asking what the switch would restart: {' '.join(dry)}")
    # it builds the new system first: minutes, during which colmena's output is held here
    with heartbeat("colmena's dry activation", progress):
        proc = subprocess.run(
            dry, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
    sys.stderr.write(proc.stderr)
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        raise K3sClusterError(
            f"`{' '.join(dry)}` failed with exit code {proc.returncode}; nothing was deployed"
        )
    return proc.stdout + proc.stderr


@dataclass
class Drain:
    """A node this deploy may drain: ``cordoned`` says whether the cordon is this stack's
    (made by this deploy, or by an earlier run of ``owner``, the stack, whose mark it
    carries: ``kube.CORDONED_BY``)."""

    kubeconfig: dict[str, Any]
    server: str
    node: str
    timeout: float
    progress: Callable[[str], None]
    cordoned: bool = False
    owner: str | None = None
    # what became of the host when the drain fails: before the switch nothing was deployed;
    # before a reboot (k3scluster.reboot) the host runs its new system, not rebooted
    done: str = NOTHING_DEPLOYED

    def before(self) -> None:
        """Cordon (remembering whether the cordon is this stack's) and drain. A drain that
        fails (a PodDisruptionBudget that blocks until the timeout) undoes this stack's
        cordon: the host runs what it ran (``done``), so the node goes back to work."""
        from k3scluster import kube

        self.cordoned = kube.cordon(self.kubeconfig, self.server, self.node, self.owner)
        self.progress(
            f"{self.node}: cordoned"
            if self.cordoned
            else f"{self.node}: was already cordoned; it stays cordoned after the deploy"
        )
        try:
            kube.drain(self.kubeconfig, self.server, self.node, self.timeout, self.progress)
        except K3sClusterError as err:
            raise self.undo(err) from None

    def undo(self, err: K3sClusterError) -> K3sClusterError:
        """``err`` (and ``done``: what became of the host) after this stack's cordon is
        undone, saying so."""
        from k3scluster import kube

        if not self.cordoned:
            return K3sClusterError(
                f"{err.message}; {self.done}; node {self.node} stays cordoned (it "
                "was cordoned before this run)", hint=err.hint)
        try:
            kube.uncordon(self.kubeconfig, self.server, self.node)
        except K3sClusterError as again:
            return K3sClusterError(
                f"{err.message}; {self.done}, and uncordoning node {self.node} failed "
                f"too ({again.message}): it stays cordoned",
                hint=(err.hint + "; " if err.hint else "") + f"kubectl uncordon {self.node}")
        self.cordoned = False
        if self.done == NOTHING_DEPLOYED:
            self.progress(f"{self.node}: uncordoned (the drain failed; nothing deployed)")
            return K3sClusterError(
                f"{err.message}; node {self.node} was uncordoned (nothing deployed)",
                hint=err.hint)
        self.progress(f"{self.node}: uncordoned (the drain failed)")
        return K3sClusterError(f"{err.message}; {self.done}; node {self.node} was uncordoned",
                               hint=err.hint)

    def after(self, host: str) -> None:
        """Uncordon, only when the cordon is this stack's. ``host`` has been deployed and
        passed its gates: an uncordon that fails says so, and what to run."""
        from k3scluster import kube

        if not self.cordoned:
            return
        try:
            kube.uncordon(self.kubeconfig, self.server, self.node)
        except K3sClusterError as err:
            raise K3sClusterError(
                f"{host}: deployed and healthy, but uncordoning node {self.node} failed: "
                f"{err.message}",
                hint=f"kubectl uncordon {self.node} (or the next `pulumi up` of this stack "
                "uncordons it: the cordon carries this stack's mark)",
            ) from None
        self.progress(f"{self.node}: uncordoned")

    def left_cordoned(self, err: K3sClusterError) -> K3sClusterError:
        """``err`` with what became of the node when the deploy failed after the cordon."""
        if not self.cordoned:
            return err
        return K3sClusterError(
            f"{err.message}; node {self.node} stays cordoned (this deploy cordoned it)",
            hint=(err.hint + "; " if err.hint else "")
            + f"once it is healthy: kubectl uncordon {self.node}, or the next `pulumi up` of "
            "this stack uncordons it after a healthy deploy (the cordon carries this "
            "stack's mark)",
        )
