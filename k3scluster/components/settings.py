"""The stack's ``k3scluster:*`` configuration, resolved and checked (``Settings``).

``__main__.py`` reads the stack config into it; ``components/cluster.py`` and
``components/vm.py`` take it. A module of its own so that neither of those imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from k3scluster import commands, stackconfig
from k3scluster.components.steps import RUNNERS
from k3scluster.errors import K3sClusterError
from k3scluster.lab.spec import VmSettings
from k3scluster.reboot import REBOOT_MODES
from k3scluster.stackpaths import STEP_PYTHON, recorded


@dataclass(frozen=True)
class Settings:
    """The stack's ``k3scluster:*`` configuration, resolved (see ``__main__.py``)."""

    render_dir: Path
    project_dir: Path
    colmena: str = "colmena"
    nix: str = "nix"
    build_isos: bool = False
    runner: str = "command"
    parallel: int = 4
    deploy_user: str = "root"
    # how steps name the Python of k3scluster's tasks: resolved when they run (stackpaths)
    python: str = STEP_PYTHON
    # the project's ssh: a private key file (None: ssh's own) and a known_hosts file (None:
    # the stack's own, known_hosts_file)
    ssh_identity: Path | None = None
    ssh_known_hosts: Path | None = None
    # seconds the hardware fetch waits for a host's ssh to log in (a VM just booted)
    ssh_wait: float = 300.0
    # a VM stack (k3scluster:vms true): its VM settings; None for every other stack
    vm: VmSettings | None = None
    # health gates (health.py): wait for /readyz and Ready nodes after each deploy, at most
    # ready_timeout seconds; the kubeconfig file (None: <render_dir>/kubeconfig)
    wait_ready: bool = True
    ready_timeout: float = 600.0
    kubeconfig_path: Path | None = None
    stack: str = "stack"
    # python runner: provider processes the deploys spread over (None: one per 4 hosts, up to 8)
    runner_processes: int | None = None
    # (local path, the stack file's text for it) of clusterDir, renderDir, kubeconfigPath and
    # the ssh files: steps record a path under one of them as the stack file names it, and
    # resolve it when they run (stackpaths.py), so that no step names one operator's paths
    recorded_as: tuple[tuple[Path, str], ...] = ()
    # updates (k3scluster.update_plan): agent hosts deployed at once; how long a drain may take
    max_unavailable: int = 1
    drain_timeout: float = 600.0
    snapshot_before_servers: bool = True
    # k3scluster.rollback: back to the previous system when a switch or gate fails; the
    # dead-man switch's seconds (None: the default, rollback.CONFIRM_TIMEOUT; 0: off)
    rollback: bool = True
    confirm_timeout: float | None = None
    # reboots (k3scluster.reboot): "never" (listed in needsReboot) or "auto" (drain, reboot,
    # wait for a new boot id and the gates within reboot_timeout s, uncordon; one host at a time)
    reboot: str = "never"
    reboot_timeout: float = 900.0

    def rec(self, path: Path) -> Path:
        """``path`` as steps record it (``stackpaths.recorded``)."""
        return recorded(path, self.recorded_as)

    @property
    def kubeconfig_file(self) -> Path:
        return stackconfig.kubeconfig_file(self.render_dir, self.kubeconfig_path)

    @property
    def known_hosts_file(self) -> Path:
        """Where ssh remembers the hosts' keys: ``k3scluster:sshKnownHosts``, else a file of
        this stack's own beside its render directory, never ``~/.ssh/known_hosts``: a VM
        stack's keys for the plan's addresses would make ssh refuse the real machines."""
        return stackconfig.known_hosts_file(
            self.render_dir, self.ssh_known_hosts, vms=self.vm is not None
        )

    @property
    def ssh(self) -> commands.SshSettings:
        """The ssh settings as steps record them."""
        return commands.SshSettings(
            self.deploy_user,
            self.rec(self.ssh_identity) if self.ssh_identity else None,
            self.rec(self.known_hosts_file),
        )

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise K3sClusterError(
                f"k3scluster:runner is {self.runner!r}; it must be one of {', '.join(RUNNERS)}",
                hint="pulumi config set k3scluster:runner command",
            )
        if self.runner_processes is not None and self.runner_processes < 1:
            raise K3sClusterError(
                f"k3scluster:runnerProcesses is {self.runner_processes}; it must be at least 1",
                hint="pulumi config set k3scluster:runnerProcesses 4",
            )
        if self.max_unavailable < 1:
            raise K3sClusterError(
                f"k3scluster:maxUnavailable is {self.max_unavailable}; it must be at least 1",
                hint="pulumi config set k3scluster:maxUnavailable 1",
            )
        if self.confirm_timeout is not None and self.confirm_timeout < 0:
            raise K3sClusterError(
                f"k3scluster:confirmTimeout is {self.confirm_timeout:g}; it must not be negative",
                hint="pulumi config set k3scluster:confirmTimeout 2m (0 turns it off)",
            )
        if self.reboot not in REBOOT_MODES:
            raise K3sClusterError(
                f"k3scluster:reboot is {self.reboot!r}; it must be one of "
                f"{', '.join(REBOOT_MODES)} (never: list the hosts that need a reboot in the "
                "stack output needsReboot; auto: drain, reboot and check them one at a time)",
                hint="pulumi config set k3scluster:reboot never",
            )
        if self.reboot_timeout <= 0:
            raise K3sClusterError(
                f"k3scluster:rebootTimeout is {self.reboot_timeout:g} s; it must be more than 0",
                hint="pulumi config set k3scluster:rebootTimeout 15m",
            )
        if self.reboot == "auto" and not self.wait_ready:
            raise K3sClusterError(
                "k3scluster:reboot is 'auto' but k3scluster:waitReady is false: a host is "
                "rebooted only after its health gates passed, and checked by them again after",
                hint="pulumi config set k3scluster:waitReady true (or k3scluster:reboot never)",
            )
        if self.parallel < 1:
            raise K3sClusterError(
                f"k3scluster:parallel is {self.parallel}; it must be at least 1",
                hint="pulumi config set k3scluster:parallel 4",
            )
        if self.ssh_wait < 0:
            raise K3sClusterError(
                f"k3scluster:sshWait is {self.ssh_wait:g}; it must not be negative",
                hint="pulumi config set k3scluster:sshWait 5m",
            )
        if self.ssh_identity is not None and not self.ssh_identity.is_file():
            raise K3sClusterError(
                f"k3scluster:sshIdentity {self.ssh_identity} is not a file",
                hint="name your private key file (a path, never the key): "
                "pulumi config set k3scluster:sshIdentity ~/.ssh/id_ed25519",
            )
        self.known_hosts_file  # noqa: B018 (a VM stack refuses another file: stackconfig)
        if self.ssh_known_hosts is not None and not self.ssh_known_hosts.parent.is_dir():
            raise K3sClusterError(
                f"k3scluster:sshKnownHosts {self.ssh_known_hosts}: its directory does not exist",
                hint="ssh creates the file itself, but not its directory",
            )
