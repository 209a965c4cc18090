"""Paths named by a stack's configuration, kept as the stack file writes them.

Several operators share one stack (its state in PostgreSQL or S3, its stack file in git), each
from a checkout of the project and a clone of the cluster directory of their own, at paths of
their own. What a step records in the state must therefore name no path of one operator's
machine: the step records a path as the stack file writes it (``../my-cluster``, ``~/.ssh/id``
or an absolute path every operator shares) and each operator's step resolves it when it runs,
against the project directory (the working directory of every step: Pulumi starts its
provider plugins there, and the steps set no ``dir``) and the home of whoever runs it. The
program resolves the same text the same way, on its own machine, to read the plans.

``STEP_PYTHON`` is how a step names the Python that runs k3scluster's tasks: a launcher in
the project (``scripts/k3scluster-python``), never the path of one checkout's virtualenv.
Plain library code: no pulumi here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# relative to the project directory; the python runner runs its own interpreter instead
STEP_PYTHON = "scripts/k3scluster-python"


def recorded(path: Path, roots: Sequence[tuple[Path, str]]) -> Path:
    """``path`` as a step records it: under one of ``roots`` (a local directory or file and
    the stack file's text for it, e.g. ``(/home/ann/src/cluster, "../cluster")``), the
    deepest such root's text joined with the rest; else ``path`` as it is."""
    best: tuple[Path, str] | None = None
    for local, text in roots:
        under = path == local or local in path.parents
        if under and (best is None or len(local.parts) > len(best[0].parts)):
            best = (local, text)
    if best is None:
        return path
    rest = path.relative_to(best[0])
    return Path(best[1]) / rest if rest.parts else Path(best[1])


def resolve(text: str | os.PathLike[str], base: Path | None = None) -> Path:
    """A recorded path on this machine: ``~`` is the home of whoever runs this, a relative
    path is relative to ``base`` (default: the working directory, the project directory of
    a step)."""
    path = Path(text).expanduser()
    return Path(os.path.abspath(path if base is None or path.is_absolute() else base / path))


def resolve_args(argv: Sequence[str]) -> list[str]:
    """A recorded argv of another program (colmena, nix) made runnable here: an argument
    that starts with ``~/`` (a path under the operator's home) is expanded; the others, and
    relative paths (the working directory is the project), stay as they are."""
    return [os.path.expanduser(a) if a.startswith("~/") else a for a in argv]
