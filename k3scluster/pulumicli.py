"""Running one ``pulumi stack …`` command of a project and reading what it printed.

``records.read_export`` (``pulumi stack export``) and ``stackinfo.read_outputs``
(``pulumi stack output --json``) both read a stack's state this way: the engine on PATH
(scripts/env.sh puts the offline one there), run in the project directory, its last error
line in a clear error when it fails.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from k3scluster.errors import K3sClusterError

ENV_HINT = "source scripts/env.sh first (it puts the offline Pulumi engine on PATH)"


def run_stack_command(
    pulumi: str | None,
    argv: Callable[[str], list[str]],
    project_dir: Path,
    what: str,
    hint: str,
) -> str:
    """The standard output of ``argv(<pulumi executable>)`` run in ``project_dir``.

    ``what`` names the command in errors (```pulumi stack export --stack S```), ``hint``
    says what to check when it fails. No secret is passed or decrypted here.
    """
    name = pulumi or "pulumi"
    exe = shutil.which(name)
    if exe is None:
        raise K3sClusterError(f"{name} is not on PATH: the stack's state cannot be read", hint=ENV_HINT)
    proc = subprocess.run(
        argv(exe),
        cwd=project_dir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}, no message"
        raise K3sClusterError(f"`{what}` failed: {last}", hint=hint)
    return proc.stdout
