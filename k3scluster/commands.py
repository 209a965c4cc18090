"""Argv builders for the commands a deploy runs: colmena, ssh, and the project's own tasks.

Pure functions returning ``list[str]``: no shell, no quoting, nothing run here. A secret never
appears in an argv (the K3s token and password hashes are key *files* that colmena reads
itself); the Pulumi steps pass argv lists to ``subprocess`` or ``shlex.join`` them for
pulumi-command. Nothing here imports pulumi.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def colmena_build(colmena: str, hive: Path, hosts: Sequence[str]) -> list[str]:
    """``colmena build --keep-result --no-build-on-target --on <hosts> -f <hive>``.

    Builds the hosts' systems on this machine and contacts none of them:
    ``--no-build-on-target`` overrides a ``deployment.buildOnTarget`` in a host's own
    configuration (which would copy the derivation to the host and build there).
    ``--keep-result`` makes each built system an indirect GC root ``.gcroots/node-<host>``
    in the hive's directory (colmena runs ``nix-store --indirect --add-root``).
    """
    if not hosts:
        raise K3sClusterError("no host to build")
    names = ",".join(_plain_arg("host name", h) for h in hosts)
    return [colmena, "build", "--keep-result", "--no-build-on-target", "--on", names,
            "-f", str(hive)]


def nix_command(nix: str, *args: str) -> list[str]:
    """``nix --extra-experimental-features nix-command ARGS`` (the ``nix`` CLI is experimental
    in the Nix releases Debian ships)."""
    return [nix, "--extra-experimental-features", "nix-command", *args]


def nix_diff_closures(nix: str, before: str, after: str) -> list[str]:
    """``nix store diff-closures BEFORE AFTER``: the packages that change between two systems."""
    return nix_command(nix, "store", "diff-closures", _store_path(before), _store_path(after))


def nix_path_info(nix: str, path: str) -> list[str]:
    """``nix path-info PATH``: succeeds when PATH is valid in the local store."""
    return nix_command(nix, "path-info", _store_path(path))


def _store_path(path: str) -> str:
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise K3sClusterError(f"{path!r} is not a store path")
    return path


def pulumi_stack_export(pulumi: str, stack: str) -> list[str]:
    """``pulumi stack export --stack STACK``: the stack's state, secrets left encrypted."""
    return [pulumi, "stack", "export", "--stack", _plain_arg("stack", stack), "--non-interactive"]


def pulumi_stack_outputs(pulumi: str, stack: str) -> list[str]:
    """``pulumi stack output --json --stack STACK``: every stack output, secrets masked."""
    return [pulumi, "stack", "output", "--json", "--stack", _plain_arg("stack", stack),
            "--non-interactive"]


def ssh_command(
    user: str,
    ip: ipaddress.IPv4Address,
    remote: Sequence[str],
    *,
    ssh: str = "ssh",
    identity: Path | None = None,
    known_hosts: Path | None = None,
    connect_timeout: int = 15,
    remember_host_keys: bool = True,
    new_connection: bool = False,
) -> list[str]:
    """``ssh -o BatchMode=yes … <user>@<ip> REMOTE…``: run words on a host (its shell joins them).

    BatchMode makes ssh fail instead of asking for a password; a new host key is accepted
    and remembered (the first contact with a freshly installed host), a changed one is not.
    ``remember_host_keys`` False (a read-only look, ``k3scluster status``): only a host whose
    key is known already is accepted, and no known_hosts file is written
    (``StrictHostKeyChecking=yes``, ``UpdateHostKeys=no``).
    ``identity`` is a private key *file* (``-i FILE -o IdentitiesOnly=yes``: that key and no
    other, not the agent's); ``known_hosts`` replaces ``~/.ssh/known_hosts`` (where a new host
    key is remembered, too). Without them ssh's own defaults apply. ``remote`` is shell text
    for the host's shell: callers pass fixed words or words quoted with ``shlex.quote``.
    ``new_connection``: never through a multiplexed connection a ``ControlMaster`` of the
    user's ssh_config keeps open (``ControlPath=none``): a login made now (the dead-man
    switch's confirmation, ``k3scluster.rollback``).
    """
    argv = [
        ssh,
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={connect_timeout}",
        *(["-o", "ControlMaster=no", "-o", "ControlPath=none"] if new_connection else []),
        *(
            ["-o", "StrictHostKeyChecking=accept-new"]
            if remember_host_keys
            else ["-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no"]
        ),
    ]
    if identity is not None:
        argv += ["-i", _local_path("k3scluster:sshIdentity", identity), "-o", "IdentitiesOnly=yes"]
    if known_hosts is not None:
        # ssh splits UserKnownHostsFile at spaces (several files): _local_path refuses them
        argv += ["-o", "UserKnownHostsFile=" + _local_path("k3scluster:sshKnownHosts", known_hosts)]
    target = f"{_plain_arg('user', user)}@{ipaddress.IPv4Address(ip)}"
    return [*argv, target, *remote]


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
    """``ssh … <user>@<ip> cat -- <path>``: read one file from a host (see ``ssh_command``)."""
    if not path.startswith("/"):
        raise K3sClusterError(f"remote path {path!r} must be absolute")
    # ssh joins the remote words with spaces and the user's shell on the host splits them
    # again: quote the path for that shell (a plain path stays as it is)
    return ssh_command(
        user,
        ip,
        ["cat", "--", shlex.quote(path)],
        ssh=ssh,
        identity=identity,
        known_hosts=known_hosts,
        connect_timeout=connect_timeout,
    )


COLMENA_SSH_CONFIG_ENV = "SSH_CONFIG_FILE"  # colmena (0.3, 0.4) passes it to its ssh as ``-F``


def colmena_ssh_config(ssh: SshSettings) -> str | None:
    """The ssh_config colmena's own ssh reads (``SSH_CONFIG_FILE``): the stack's known_hosts
    file and identity first (ssh keeps the first value it reads), then the user's and the
    system's configuration (``Include``; ``-F`` would otherwise drop them). None without a
    known_hosts file (every stack has one: ``k3scluster:sshKnownHosts`` has a default).

    colmena 0.4.0, what nixpkgs ships, has no ``deployment.sshOptions`` (it came later);
    ``SSH_CONFIG_FILE`` is read by ``colmena apply`` and ``exec`` since 0.3.0."""
    if ssh.known_hosts is None:
        return None
    lines = [
        "# written by k3scluster for colmena's ssh: this stack's host keys and key",
        "UserKnownHostsFile " + _local_path("k3scluster:sshKnownHosts", ssh.known_hosts),
    ]
    if ssh.identity is not None:
        lines += ["IdentityFile " + _local_path("k3scluster:sshIdentity", ssh.identity),
                  "IdentitiesOnly yes"]
    lines += ["StrictHostKeyChecking accept-new", "Include ~/.ssh/config",
              "Include /etc/ssh/ssh_config"]
    return "\n".join(lines) + "\n"


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
    python: str, ip: ipaddress.IPv4Address, ssh: SshSettings, out: Path, *, wait: float = 300
) -> list[str]:
    """Read the host's ``hardware-configuration.nix`` over ssh into ``out``, atomically, once
    ssh logs in (``tasks hardware``: a host that just booted gets ``wait`` seconds; the ssh
    command is made when the step runs, from paths the step resolves then; see ``ssh_cat``)."""
    return [
        python, "-m", TASKS_MODULE, "hardware", "--ip", str(ipaddress.IPv4Address(ip)),
        *ssh.task_args(), "--out", str(out), "--wait", f"{wait:g}",
    ]


def render_tree(
    python: str,
    cluster_dir: Path,
    out: Path,
    vm_stack: str | None = None,
    held_agents: Mapping[str, str] | None = None,
) -> list[str]:
    """``k3scluster render DIR --out OUT [--vm-stack S] [--hold-agent HOST=MINOR…]``: load the
    plans again and write the rendered tree (for a VM stack: with the .link files of its
    VMs; during a K3s minor upgrade: the hives that keep those hosts' agents back)."""
    argv = [python, "-m", "k3scluster", "render", str(cluster_dir), "--out", str(out)]
    argv += ["--vm-stack", vm_stack] if vm_stack else []
    for host, minor in sorted((held_agents or {}).items()):
        argv += ["--hold-agent", f"{_plain_arg('host name', host)}={_plain_arg('K3s', minor)}"]
    return argv


def build_iso(python: str, result: Path, argv: list[str]) -> list[str]:
    """Run an ISO build ``argv``, then print ``{"image": path, "sha256": hex}`` as the last line.

    ``result`` is the build's out-link (``installer.iso_out_link``); the image is the one
    ``iso/*.iso`` below it.
    """
    return [python, "-m", TASKS_MODULE, "iso", "--result", str(result), "--", *argv]


def lab_ctl(python: str, task: str, spec_json: str) -> list[str]:
    """``python -m k3scluster.lab.ctl TASK --spec JSON``: a lab network or VM step."""
    return [python, "-m", "k3scluster.lab.ctl", task, "--spec", spec_json]


VIA_ENV_PREFIX = "K3SCLUSTER_VIA_"


def via_env(host: str) -> str:
    """The environment variable the hive reads a host's deploy address from when it is not
    the plan's (a host that moves: templates/hive.nix.j2, tasks deploy ``--via``)."""
    return VIA_ENV_PREFIX + host.replace("-", "_")


def notice(message: str) -> list[str]:
    """A command that only prints ``message`` (for steps whose delete must change nothing)."""
    return ["echo", message]


@dataclass(frozen=True)
class RenderArgs:
    """The render a deploy checks before colmena: the cluster, the render directory, the
    VM stack whose render it is (None for a hardware stack) and the agents the render step
    holds back (a K3s minor upgrade: its servers-first hives); paths as steps record them.
    The task renders with :func:`render_tree`, the render step's own argv."""

    cluster: Path
    out: Path
    vm_stack: str | None = None
    held_agents: tuple[tuple[str, str], ...] = ()

    def task_args(self) -> list[str]:
        argv = ["--render", str(self.cluster), "--render-out", str(self.out)]
        argv += ["--vm-stack", _plain_arg("stack name", self.vm_stack)] if self.vm_stack else []
        for host, minor in sorted(self.held_agents):
            argv += ["--hold-agent",
                     f"{_plain_arg('host name', host)}={_plain_arg('K3s', minor)}"]
        return argv


@dataclass(frozen=True)
class SshSettings:
    """How the project's ssh logs in (the stack's deployUser, sshIdentity, sshKnownHosts)."""

    user: str = "root"
    identity: Path | None = None
    known_hosts: Path | None = None
    # False for a read-only look (status): a host with an unknown key is refused, and no
    # known_hosts file is written (not passed to the tasks: a deploy remembers new keys)
    remember_host_keys: bool = True

    def task_args(self) -> list[str]:
        """The same settings as options of ``python -m k3scluster.components.tasks``."""
        argv = ["--ssh-user", _plain_arg("user", self.user)]
        if self.identity is not None:
            argv += ["--ssh-identity", str(self.identity)]
        if self.known_hosts is not None:
            argv += ["--ssh-known-hosts", str(self.known_hosts)]
        return argv


def deploy_and_check(
    python: str,
    host: str,
    ip: ipaddress.IPv4Address,
    deploy_argv: Sequence[str],
    ssh: SshSettings,
    *,
    timeout: float,
    servers: Sequence[tuple[str, ipaddress.IPv4Address]] = (),
    agents: Sequence[str] = (),
    api: Sequence[str] = (),
    credentials_from: Sequence[ipaddress.IPv4Address] = (),
    render: RenderArgs | None = None,
    gates: bool = True,
    record: str | None = None,
    via: ipaddress.IPv4Address | None = None,
    join_via: Sequence[ipaddress.IPv4Address] = (),
    check_agent_state: bool = False,
    drain: str | None = None,
    drain_timeout: float = 600.0,
    stack: str | None = None,
    rollback: bool = True,
    confirm_timeout: float | None = None,
    reboot_timeout: float | None = None,
) -> list[str]:
    """Run ``deploy_argv`` (colmena), then wait for the host's health gates, then read back
    what the host runs (``/run/current-system`` and its K3s containers). Without ``gates``
    only colmena runs.

    ``render``: before colmena, the task renders the cluster again when the rendered files
    on this machine are not the ones the step was planned with (``components/rendered.py``).

    ``record`` (JSON, ``membership.host_record``) is printed back in the last line when
    the deploy succeeded, with gates or without: what the stack then knows the host as
    (components/deployed.py).
    ``via``: the address the host was last deployed at, when it moves to ``ip`` (deployed
    through it, rebooted, checked at ``ip``). Before colmena: with ``join_via`` (the other
    servers' host addresses, a running cluster) a server host without etcd data gets the
    stale member of its name removed; with ``check_agent_state`` an agent host without a
    node password gets its old Node and node-password secret deleted.
    ``drain``: the host's agent node, cordoned and drained (at most ``drain_timeout`` s)
    before the switch when colmena's dry activation says it would restart the agent, and
    uncordoned after the gates (``k3scluster.drain``); ``stack`` names the stack in the mark
    its cordon carries (a later run of the stack recognises it as its own).
    ``rollback`` False (``--no-rollback``): a host whose switch or gate fails stays on the new
    system; ``confirm_timeout``: the dead-man switch's seconds (0 off; None the task's default,
    ``rollback.CONFIRM_TIMEOUT``): ``k3scluster.rollback``. Only settings other than the
    defaults reach the argv, so a stack with the defaults deploys nothing again for them.
    ``reboot_timeout`` (``k3scluster:reboot auto``): after the gates, a host whose boot
    entries differ from the booted system's is drained, rebooted and gated again within that
    many seconds (``k3scluster.reboot``); None: never rebooted (today's argv, unchanged).

    ``servers``: (K3s name, ip) of the host's K3s server, which must answer ``/readyz``;
    ``agents``: K3s names of its agents, which must be ``Ready`` in the API (``api``: the
    servers' URLs, asked in turn). The cluster's credentials are read over ssh from the first
    of ``credentials_from`` (the server hosts, the init-server's first) that has them.
    The last line of its stdout is ``k3scluster-deployed=<JSON>``.
    """
    argv = [
        python, "-m", TASKS_MODULE, "deploy",
        "--host", _plain_arg("host name", host), "--ip", str(ipaddress.IPv4Address(ip)),
        *ssh.task_args(), "--timeout", f"{timeout:g}",
    ]
    if render is not None:
        argv += render.task_args()
    if not gates:  # colmena alone; the record still (membership knows who was deployed)
        return [*argv, *(["--record", record] if record is not None else []),
                "--no-gates", "--", *deploy_argv]
    for name, sip in servers:
        argv += ["--server", f"{_plain_arg('K3s name', name)}={ipaddress.IPv4Address(sip)}"]
    for name in agents:
        argv += ["--agent", _plain_arg("K3s name", name)]
    if servers or agents:
        if not api or not credentials_from:
            raise K3sClusterError(f"host {host}: health gates need the cluster's servers")
        for url in api:
            argv += ["--api", url]
        for cip in credentials_from:
            argv += ["--credentials-from", str(ipaddress.IPv4Address(cip))]
    if record is not None:
        argv += ["--record", record]
    if via is not None:
        argv += ["--via", str(ipaddress.IPv4Address(via))]
    for j in join_via:
        argv += ["--join-via", str(ipaddress.IPv4Address(j))]
    if check_agent_state:
        argv.append("--check-agent-state")
    if drain is not None:
        if drain not in agents:
            raise K3sClusterError(f"host {host}: {drain} is not its agent")
        argv += ["--drain", _plain_arg("K3s name", drain), "--drain-timeout", f"{drain_timeout:g}"]
        if stack is not None:
            argv += ["--stack", _plain_arg("stack", stack)]
    if not rollback:
        argv.append("--no-rollback")
    if confirm_timeout is not None:
        argv += ["--confirm-timeout", f"{confirm_timeout:g}"]
    if reboot_timeout is not None:
        argv += ["--reboot-timeout", f"{reboot_timeout:g}"]
    return [*argv, "--", *deploy_argv]


def membership_step(
    python: str,
    action: str,
    detail: Sequence[tuple[str, str]],
    ssh: SshSettings,
    *,
    drain_timeout: float,
) -> list[str]:
    """A membership change of ``k3scluster.update_plan`` (``agent-leaves``,
    ``server-leaves``, ``host-leaves``, ``server-joins``) with the phase's detail as JSON
    (names and addresses only: never a secret)."""
    import json

    if action not in ("agent-leaves", "server-leaves", "host-leaves", "server-joins"):
        raise K3sClusterError(f"unknown membership action {action!r}")
    return [
        python, "-m", TASKS_MODULE, "membership", action,
        "--detail", json.dumps(dict(detail), sort_keys=True),
        "--drain-timeout", f"{drain_timeout:g}",
        *ssh.task_args(),
    ]


def etcd_snapshot(
    python: str, stack: str, servers: Sequence[tuple[str, ipaddress.IPv4Address]], ssh: SshSettings
) -> list[str]:
    """``tasks snapshot``: an etcd snapshot on the first of ``servers`` (host, ip) that takes it."""
    argv = [python, "-m", TASKS_MODULE, "snapshot", "--stack", _plain_arg("stack", stack),
            *ssh.task_args()]
    for host, ip in servers:
        argv += ["--server", f"{_plain_arg('host name', host)}={ipaddress.IPv4Address(ip)}"]
    return argv


def observe_host(
    python: str, host: str, ip: ipaddress.IPv4Address, ssh: SshSettings, units: Sequence[str]
) -> list[str]:
    """Read back what a host runs now; prints ``k3scluster-observed=<JSON>`` (refresh)."""
    argv = [
        python, "-m", TASKS_MODULE, "observe",
        "--host", _plain_arg("host name", host), "--ip", str(ipaddress.IPv4Address(ip)),
        *ssh.task_args(),
    ]
    for unit in units:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9@._-]*", unit):
            raise K3sClusterError(f"systemd unit {unit!r} cannot be passed on a command line")
        argv += ["--unit", unit]
    return argv


def fetch_kubeconfig(
    python: str,
    ip: ipaddress.IPv4Address,
    ssh: SshSettings,
    *,
    server: str,
    name: str,
    out: Path,
    also: Sequence[ipaddress.IPv4Address] = (),
    other_servers: Sequence[tuple[str, ipaddress.IPv4Address]] = (),
) -> list[str]:
    """Read K3s's admin kubeconfig from the init-server's host (or, when it cannot be read
    there, from the first of the other server hosts ``also`` that has it), point it at
    ``server``, name it ``name``, add a context ``<name>-<node>`` for each of the other K3s
    servers ``other_servers`` (node name, address), write it to ``out`` (mode 0600) and
    print it (a secret step output)."""
    argv = [
        python, "-m", TASKS_MODULE, "kubeconfig", "--ip", str(ipaddress.IPv4Address(ip)),
        *ssh.task_args(), "--server", server, "--name", _plain_arg("stack name", name),
        "--out", str(out),
    ]
    for other in also:
        argv += ["--also", str(ipaddress.IPv4Address(other))]
    for node, node_ip in other_servers:
        argv += ["--other-server",
                 f"{_plain_arg('K3s node name', node)}={ipaddress.IPv4Address(node_ip)}"]
    return argv
