"""Drain a host's K3s agent around its deploy (issue 17 item 2). No pulumi.

A deploy step of a host with an agent (``tasks deploy --drain NODE``) first asks colmena what
the switch would do: ``colmena apply dry-activate`` runs the new system's
``switch-to-configuration dry-activate`` on the host, which prints the units it would stop,
restart and start (``would restart the following units: a.service, b.service``). When the
agent's unit (``podman-k3s-agent.service``) would be stopped or restarted, every pod on that
node would die with it: so before the switch the node is cordoned and drained
(``k3scluster.kube``: the Eviction API, PodDisruptionBudgets respected, DaemonSet pods left,
at most ``k3scluster:drainTimeout``), and after the host passed its gates it is uncordoned —
only when this deploy cordoned it: a node someone cordoned by hand stays cordoned.

A deploy that fails after the cordon leaves the node cordoned (its pods are elsewhere; it may
not be healthy) and says so.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from k3scluster.errors import K3sClusterError

AGENT_UNIT = "podman-k3s-agent.service"
_WOULD = re.compile(r"would (stop|restart|start|reload) the following units: (.*)$")


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


def agent_restarts(output: str, unit: str = AGENT_UNIT) -> bool:
    """Would the switch stop or restart the agent's unit (and so every pod on the node)?"""
    changed = units_changed(output)
    return unit in changed.get("stop", set()) | changed.get("restart", set())


def dry_activate_argv(argv: Sequence[str]) -> list[str]:
    """``colmena apply switch …`` -> ``colmena apply dry-activate …`` (the same hosts and hive)."""
    out = list(argv)
    try:
        i = out.index("apply")
    except ValueError:
        raise K3sClusterError(f"not a colmena apply: {' '.join(argv)}") from None
    if i + 1 >= len(out) or out[i + 1].startswith("-"):
        out.insert(i + 1, "dry-activate")
    else:
        out[i + 1] = "dry-activate"
    return out


def dry_activate(argv: Sequence[str], progress: Callable[[str], None]) -> str:
    """Runs the dry activation of the deploy ``argv``; its output (also passed to stderr)."""
    dry = dry_activate_argv(argv)
    progress(f"asking what the switch would restart: {' '.join(dry)}")
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
    """A node this deploy may drain: ``cordoned`` says whether this deploy cordoned it."""

    kubeconfig: dict[str, Any]
    server: str
    node: str
    timeout: float
    progress: Callable[[str], None]
    cordoned: bool = False

    def before(self) -> None:
        """Cordon (remembering whether this call did) and drain."""
        from k3scluster import kube

        self.cordoned = kube.cordon(self.kubeconfig, self.server, self.node)
        self.progress(
            f"{self.node}: cordoned"
            if self.cordoned
            else f"{self.node}: was already cordoned; it stays cordoned after the deploy"
        )
        kube.drain(self.kubeconfig, self.server, self.node, self.timeout, self.progress)

    def after(self) -> None:
        """Uncordon, only what this deploy cordoned."""
        from k3scluster import kube

        if self.cordoned:
            kube.uncordon(self.kubeconfig, self.server, self.node)
            self.progress(f"{self.node}: uncordoned")

    def left_cordoned(self, err: K3sClusterError) -> K3sClusterError:
        """``err`` with what became of the node when the deploy failed after the cordon."""
        if not self.cordoned:
            return err
        return K3sClusterError(
            f"{err.message}; node {self.node} stays cordoned (this deploy cordoned it)",
            hint=(err.hint + "; " if err.hint else "")
            + f"once it is healthy: kubectl uncordon {self.node} (or the next `pulumi up` "
            "that deploys it cordons and uncordons it again)",
        )
