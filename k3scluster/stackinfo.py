"""What a Pulumi stack of this project recorded and how it reaches its hosts (read-only).

``k3scluster status`` needs the stack's outputs (``hosts``, and ``needsReboot`` where the
program exports it), read with ``pulumi stack output --json`` run without ``--show-secrets``:
the secret output ``kubeconfig`` arrives as ``"[secret]"`` and is never decrypted, printed or
kept. Its settings (cluster and render directory, VM stack or not, ssh, kubeconfig file) are
read from ``Pulumi.<stack>.yaml`` by ``stackconfig`` with the Pulumi program's own rules
(``stack_layout``, ``project_path``). Nothing here writes to the stack. No pulumi SDK import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k3scluster import commands
from k3scluster.errors import K3sClusterError
from k3scluster.pulumicli import run_stack_command
from k3scluster.stackconfig import (
    ConfigReader,
    StackLayout,
    known_hosts_file,
    kubeconfig_file,
    project_path,
    stack_layout,
)


@dataclass(frozen=True)
class StackInfo:
    """One stack's outputs and the settings ``status`` uses, resolved."""

    layout: StackLayout
    outputs: Mapping[str, Any]
    ssh: commands.SshSettings = field(default_factory=commands.SshSettings)
    kubeconfig: Path | None = None

    @property
    def hosts(self) -> Mapping[str, Mapping[str, Any]]:
        value = self.outputs.get("hosts")
        return value if isinstance(value, dict) else {}

    @property
    def needs_reboot(self) -> frozenset[str] | None:
        """The hosts the stack says need a reboot, or None when it records no such list."""
        value = self.outputs.get("needsReboot")
        if isinstance(value, list):
            return frozenset(str(v) for v in value)
        return None


def resolve(
    config: ConfigReader, stack: str, project_dir: Path, outputs: Mapping[str, Any]
) -> StackInfo:
    """The stack's facts from its configuration and its parsed ``stack output --json``."""
    layout = stack_layout(config, stack, project_dir)
    ssh = commands.SshSettings(
        user=config.get("deployUser") or "root",
        identity=project_path(project_dir, config.get("sshIdentity")),
        known_hosts=known_hosts_file(
            layout.render_dir,
            project_path(project_dir, config.get("sshKnownHosts")),
            vms=layout.vms,
        ),
        remember_host_keys=False,  # status looks: it never writes a known_hosts file
    )
    kubeconfig = kubeconfig_file(
        layout.render_dir, project_path(project_dir, config.get("kubeconfigPath"))
    )
    return StackInfo(layout, dict(outputs), ssh, kubeconfig)


def read_outputs(stack: str, project_dir: Path, pulumi: str = "pulumi") -> dict[str, Any]:
    """``pulumi stack output --json`` in the project (secret outputs stay ``"[secret]"``)."""
    out = run_stack_command(
        pulumi,
        lambda exe: commands.pulumi_stack_outputs(exe, stack),
        project_dir,
        f"pulumi stack output --stack {stack}",
        hint="run it inside `source scripts/env.sh`; `pulumi stack ls` lists the stacks",
    )
    try:
        data = json.loads(out or "{}")
    except json.JSONDecodeError:
        raise K3sClusterError(f"`pulumi stack output --stack {stack}` did not print JSON") from None
    if not isinstance(data, dict):
        raise K3sClusterError(f"`pulumi stack output --stack {stack}` is not a JSON object")
    return data
