"""Argv builders for the commands a deploy runs: colmena, ssh, and the project's own tasks.

Pure functions returning ``list[str]``: no shell, no quoting, nothing run here. A secret never
appears in an argv (the K3s token and password hashes are key *files* that colmena reads
itself); the Pulumi steps pass argv lists to ``subprocess`` or ``shlex.join`` them for
pulumi-command. Nothing here imports pulumi.
"""

from __future__ import annotations

import ipaddress
import shlex
from pathlib import Path

from k3scluster.errors import K3sClusterError

HARDWARE_CONFIG_ON_HOST = "/etc/nixos/hardware-configuration.nix"
TASKS_MODULE = "k3scluster.components.tasks"


def _plain_arg(kind: str, value: str) -> str:
    """Reject values that another program could read as an option or a filter expression."""
    if not value or value.startswith("-") or any(c in value for c in ",*?@ \t\n"):
        raise K3sClusterError(
            f"{kind} {value!r} cannot be passed on a command line",
            hint="host names are letters, digits and '-' (checked in plans/hosts.csv)",
        )
    return value


def colmena_apply(
    colmena: str,
    hive: Path,
    host: str,
    *,
    goal: str = "switch",
    parallel: int | None = None,
) -> list[str]:
    """``colmena apply <goal> --on <host> -f <hive>`` for exactly one host.

    ``-f`` is a global colmena option, so it may follow the subcommand. ``parallel`` becomes
    ``-p N`` (colmena's own deploy limit; with one host per call it bounds nothing else).
    """
    if goal not in {"switch", "boot", "test", "build", "push", "dry-activate", "keys"}:
        raise K3sClusterError(f"unknown colmena goal {goal!r}")
    argv = [colmena, "apply", goal, "--on", _plain_arg("host name", host), "-f", str(hive)]
    if parallel is not None:
        if parallel < 1:
            raise K3sClusterError(
                f"deploy parallelism must be at least 1, not {parallel}",
                hint="set it with `pulumi config set k3scluster:parallel 4`",
            )
        argv += ["-p", str(parallel)]
    return argv


def ssh_cat(
    user: str,
    ip: ipaddress.IPv4Address,
    path: str,
    *,
    ssh: str = "ssh",
    identity: Path | None = None,
    known_hosts: Path | None = None,
    connect_timeout: int = 15,
) -> list[str]:
    """``ssh -o BatchMode=yes … <user>@<ip> cat -- <path>``: read one file from a host.

    BatchMode makes ssh fail instead of asking for a password; a new host key is accepted
    and remembered (the first contact with a freshly installed host), a changed one is not.
    ``identity`` is a private key *file* (``-i FILE -o IdentitiesOnly=yes``: that key and no
    other, not the agent's); ``known_hosts`` replaces ``~/.ssh/known_hosts`` (where a new host
    key is remembered, too). Without them ssh's own defaults apply.
    """
    argv = [
        ssh,
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={connect_timeout}",
        "-o", "StrictHostKeyChecking=accept-new",
    ]
    if identity is not None:
        argv += ["-i", _local_path("k3scluster:sshIdentity", identity), "-o", "IdentitiesOnly=yes"]
    if known_hosts is not None:
        # ssh splits UserKnownHostsFile at spaces (several files): _local_path refuses them
        argv += ["-o", "UserKnownHostsFile=" + _local_path("k3scluster:sshKnownHosts", known_hosts)]
    if not path.startswith("/"):
        raise K3sClusterError(f"remote path {path!r} must be absolute")
    # ssh joins the remote words with spaces and the user's shell on the host splits them
    # again: quote the path for that shell (a plain path stays as it is)
    target = f"{_plain_arg('user', user)}@{ipaddress.IPv4Address(ip)}"
    argv += [target, "cat", "--", shlex.quote(path)]
    return argv


def _local_path(setting: str, path: Path) -> str:
    """A local file for an ssh option: refuse what ssh would split or expand."""
    text = str(path)
    if not text or text.startswith("-") or any(c.isspace() or c in "%~\\\"'" for c in text):
        raise K3sClusterError(
            f"{setting} {text!r} cannot be passed to ssh",
            hint="use a path without white space, quotes, backslashes, '%' or '~'",
        )
    return text


def fetch_hardware_config(
    python: str,
    user: str,
    ip: ipaddress.IPv4Address,
    out: Path,
    *,
    ssh: str = "ssh",
    identity: Path | None = None,
    known_hosts: Path | None = None,
) -> list[str]:
    """Read the host's ``hardware-configuration.nix`` over ssh into ``out``, atomically."""
    return capture_to_file(
        python,
        out,
        ssh_cat(
            user, ip, HARDWARE_CONFIG_ON_HOST, ssh=ssh, identity=identity, known_hosts=known_hosts
        ),
    )


def capture_to_file(python: str, out: Path, argv: list[str]) -> list[str]:
    """Run ``argv`` and write its stdout to ``out`` atomically (only when it succeeds)."""
    return [python, "-m", TASKS_MODULE, "capture", "--out", str(out), "--", *argv]


def render_tree(
    python: str, cluster_dir: Path, out: Path, vm_stack: str | None = None
) -> list[str]:
    """``k3scluster render DIR --out OUT [--vm-stack S]``: load the plans again and write the
    rendered tree (for a VM stack: with the .link files of its VMs)."""
    argv = [python, "-m", "k3scluster", "render", str(cluster_dir), "--out", str(out)]
    return argv + (["--vm-stack", vm_stack] if vm_stack else [])


def build_iso(python: str, result: Path, argv: list[str]) -> list[str]:
    """Run an ISO build ``argv``, then print ``{"image": path, "sha256": hex}`` as the last line.

    ``result`` is the build's out-link (``installer.iso_out_link``); the image is the one
    ``iso/*.iso`` below it.
    """
    return [python, "-m", TASKS_MODULE, "iso", "--result", str(result), "--", *argv]


def lab_ctl(python: str, task: str, spec_json: str) -> list[str]:
    """``python -m k3scluster.lab.ctl TASK --spec JSON``: a lab network or VM step."""
    return [python, "-m", "k3scluster.lab.ctl", task, "--spec", spec_json]


def notice(message: str) -> list[str]:
    """A command that only prints ``message`` (for steps whose delete must change nothing)."""
    return ["echo", message]
