"""The K3s servers this stack has deployed, handed to the deploy task at run time.

Whether a server host that comes back with no etcd data may start a new cluster depends on
what the stack deployed before: on a stack that deployed no server yet (a first ``up``) the
init-server finds nobody and inits; on a stack that deployed other servers (a running
cluster) a reinstalled server that finds none of them answering must not init (a second
cluster beside the first: a split brain when they come back).

The deploy step cannot carry that list in its argv or environment: both are inputs of the
step, so every server host would be deployed again after the first ``up`` and whenever a
server joins or leaves (``components/runner.py`` ``trigger_view``; pulumi-command's
``local.Command`` runs again on any input change). So the program writes it, at every
``up`` (never at a preview), from the stack's own state (``records.deployed_hosts_of``) to
``<renderDir>-deployed-servers.json`` beside the render directory, before any step runs,
and the deploy task reads it from the render directory it already names (``--render-out``).
The file is a copy of the state made again by each ``up``, never read by a preview or kept
as the truth: the stack's state is.

Plain library code: no pulumi, no network.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from k3scluster.errors import K3sClusterError
from k3scluster.membership import Deployed

SUFFIX = "-deployed-servers.json"


@dataclass(frozen=True)
class DeployedServer:
    """A K3s server the stack deployed: its name, its host and the host's address then."""

    name: str
    host: str
    ip: str


def file_for(render_dir: Path) -> Path:
    """Where the list of ``render_dir``'s stack lives (beside the render directory, as the
    stack's own known_hosts file)."""
    return render_dir.parent / f"{render_dir.name}{SUFFIX}"


def servers_of(deployed: Deployed) -> list[DeployedServer]:
    return [DeployedServer(n.name, h.name, str(h.ip)) for h, n in deployed.servers]


def write(path: Path, deployed: Deployed) -> None:
    """The servers of ``deployed`` into ``path`` (written whole, then renamed: a task never
    reads half a file). Nothing secret: names and addresses, as the plans have them."""
    text = json.dumps(
        {"servers": [s.__dict__ for s in servers_of(deployed)]}, indent=1, sort_keys=True
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path) -> list[DeployedServer] | None:
    """The servers the file lists; None when there is no file (a deploy run outside an
    ``up`` of this version: whether the cluster exists is then not known)."""
    try:
        data = json.loads(path.read_text())
        return [DeployedServer(str(s["name"]), str(s["host"]), str(s["ip"]))
                for s in data["servers"]]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        raise K3sClusterError(
            f"{path}: not a list of deployed servers ({err})",
            hint="`pulumi up` writes it again from the stack's state; delete the file and run it",
        ) from None
