"""Small tasks the Pulumi steps run as ``python -m k3scluster.components.tasks <task> …``.

- ``capture --out FILE -- ARGV…``: run ARGV, write its stdout to FILE atomically; an existing
  FILE is kept (a user's file is never overwritten).
- ``hardware --ip IP [ssh] --out FILE [--wait S]``: once ssh logs in (tries again with growing
  waits, at most S seconds), ``capture`` of the host's hardware-configuration.nix read over
  ssh (the ssh command made here, from the paths resolved here).
- ``iso --result LINK -- ARGV…``: run an ISO build (its log goes to stderr), print ``{"image": …, "sha256": …}`` as the last line.
- ``deploy --host H --ip IP [ssh] --timeout S [--render DIR --render-out OUT [--vm-stack S] [--hold-agent H=MINOR…]]
  [--no-gates | [--server NAME=IP] [--agent NAME] [--api URL…] [--credentials-from IP…]] --
  ARGV…``: render again if the render on this machine is not the planned one (``rendered.py``),
  run the deploy ARGV (colmena), wait for the host's health gates (the API and the credentials:
  each server, host, in turn), read back what the host runs and whether its kernel, initrd or
  kernel parameters differ from the booted system's (``"reboot"``; with ``--reboot-timeout S``
  such a host is first drained, rebooted and gated again: ``k3scluster.reboot``); last line
  ``k3scluster-deployed=<JSON>`` (``--no-gates``: colmena only). colmena's own ssh checks
  host keys against the stack's known_hosts file and logs in with its key (``SSH_CONFIG_FILE``).
  With gates: a switch or gate that fails sends the host back to the system it ran before
  (unless ``--no-rollback``), and a dead-man timer armed before the switch rolls it back unless
  a new ssh login confirms within ``--confirm-timeout`` s of the switch's end (default 120, 0 off):
  ``k3scluster.rollback``.
- ``snapshot --stack S [ssh] --server HOST=IP…``: ``k3s etcd-snapshot save`` in the server
  container of the first server host that answers at IP with its host name and where it
  succeeds (``k3scluster.snapshot``); last line
  ``k3scluster-snapshot=<JSON>``.
- ``observe --host H --ip IP [ssh] [--unit U]``: what the host runs now (``pulumi refresh``);
  last line ``k3scluster-observed=<JSON>``.
- ``kubeconfig --ip IP [--also IP…] [ssh] --server URL --name NAME --out FILE``: K3s's admin
  kubeconfig from the init-server's host (else the first ``--also`` server host that has it),
  rewritten, written to FILE (0600) and printed.

Paths in the arguments are as the stack file writes them (relative to the project directory,
the working directory of every step, or ``~/…``) and are resolved here, on the machine of whoever
runs the step (``k3scluster.stackpaths``); so are paths in the ARGV of ``deploy`` and ``iso``.

Progress lines go to stderr and start with ``k3scluster: `` (the python runner forwards them to
Pulumi's log). Credentials stay in memory: never printed, never in an argv.

Plain library code: pulumi is not imported here (the components package imports it lazily).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from k3scluster import commands
from k3scluster.bootentries import boot_script
from k3scluster.components.rendered import ensure_render
from k3scluster.errors import K3sClusterError
from k3scluster.records import DEPLOYED_PREFIX, SNAPSHOT_PREFIX
from k3scluster.stackpaths import resolve, resolve_args

CAPTURED_PREFIX = "captured-sha256="


def captured_sha256(stdout: str | None) -> str | None:
    """The digest ``capture`` reports on its last line (None before the step has run)."""
    for line in reversed((stdout or "").splitlines()):
        if line.startswith(CAPTURED_PREFIX):
            return line[len(CAPTURED_PREFIX) :].strip()
    return None


def _capture(out: Path, argv: list[str]) -> None:
    _write_captured(out, argv)
    # the digest of what the file now holds: the deploy that imports it takes this as its
    # input, so the next preview agrees with the file and shows no second change
    print(CAPTURED_PREFIX + hashlib.sha256(out.read_bytes()).hexdigest())


def _write_captured(out: Path, argv: list[str]) -> None:
    if out.exists():
        print(f"{out} exists; kept as it is")
        return
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise K3sClusterError(
            f"`{' '.join(argv)}` failed with exit code {proc.returncode}; {out} not written",
            hint="check that the host is up and accepts your ssh key for root",
        )
    if not proc.stdout.strip():
        raise K3sClusterError(f"`{' '.join(argv)}` printed nothing; {out} not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proc.stdout)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, out)  # fails if the file appeared meanwhile: never overwrite it
    except FileExistsError:
        print(f"{out} appeared meanwhile; kept as it is")
    finally:
        os.unlink(tmp)
    print(f"wrote {out} ({len(proc.stdout)} bytes)")


SSH_WAIT = 300.0  # seconds the hardware fetch waits for a freshly booted host's sshd
SSH_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0)  # then every 15 s
# ssh's words for a host key that is not the remembered one: retrying cannot help
_HOST_KEY_REFUSED = ("REMOTE HOST IDENTIFICATION HAS CHANGED", "Host key verification failed")


def wait_for_ssh(
    ssh: commands.SshSettings,
    ip: str,
    timeout: float,
    *,
    backoff: tuple[float, ...] = SSH_BACKOFF,
    clock: Any = time.monotonic,
    sleep: Any = time.sleep,
) -> None:
    """Until ssh logs in to ``ip`` (a host that just booted may still be making its host
    keys): bounded tries, the waits between them growing (``backoff``), a progress line
    for each; raises after ``timeout`` seconds with ssh's last words. A host key other than
    the remembered one fails at once."""
    start = clock()
    tries = 0
    while True:
        tries += 1
        proc = _ssh_run(ssh, ip, ["true"], timeout=10)
        if proc.returncode == 0:
            if tries > 1:
                _progress(f"{ip}: ssh answers after {clock() - start:.0f} s")
            return
        why = _ssh_error(proc)
        if any(words in (proc.stderr or "") for words in _HOST_KEY_REFUSED):
            raise K3sClusterError(
                f"{ip}: ssh refuses the host's key: {why}",
                hint="a reinstalled machine has a new key: remove the old one with "
                f"ssh-keygen -R {ip} -f {ssh.known_hosts or '~/.ssh/known_hosts'}",
            )
        elapsed = clock() - start
        if elapsed >= timeout:
            raise K3sClusterError(
                f"{ip}: no ssh login within {timeout:.0f} s ({tries} tries); last: {why}",
                hint="check that the host is up and accepts your ssh key for root",
            )
        wait = min(backoff[min(tries - 1, len(backoff) - 1)], max(0.0, timeout - elapsed))
        _progress(f"{ip}: no ssh login yet ({why}); trying again in {wait:.0f} s")
        sleep(wait)


def _hardware(args: argparse.Namespace) -> None:
    """The host's hardware configuration into ``--out`` (kept if it exists), once ssh
    answers."""
    out = resolve(args.out)
    ssh = _ssh(args)
    if not out.exists():
        wait_for_ssh(ssh, args.ip, float(args.wait))
    argv = commands.ssh_cat(
        ssh.user,
        ipaddress.IPv4Address(args.ip),
        commands.HARDWARE_CONFIG_ON_HOST,
        identity=ssh.identity,
        known_hosts=ssh.known_hosts,
    )
    _capture(out, argv)


def _iso(result: Path, argv: list[str]) -> None:
    from k3scluster.installer import find_iso
    from k3scluster.progress import run_with_progress

    code = run_with_progress(argv, f"the ISO build ({result.name})", _progress)
    if code != 0:
        raise K3sClusterError(f"the ISO build failed with exit code {code}")
    image = find_iso(result).resolve()
    h = hashlib.sha256()
    with image.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    print(json.dumps({"image": str(image), "sha256": h.hexdigest()}))


OBSERVED_PREFIX = "k3scluster-observed="
PROGRESS_PREFIX = "k3scluster: "
SERVER_UNIT = "container@k3s-server.service"
AGENT_UNIT = "podman-k3s-agent.service"
# what the host runs: the system it activated, then one line per unit "unit=state"
_OBSERVE_SCRIPT = (
    'readlink /run/current-system || echo "-"; for u in {units}; do '
    'printf "%s=%s\\n" "$u" "$(systemctl is-active "$u" 2>/dev/null)"; done'
)


def _progress(message: str) -> None:
    print(PROGRESS_PREFIX + message, file=sys.stderr, flush=True)


def _ssh(args: argparse.Namespace) -> commands.SshSettings:
    if args.ssh_known_hosts:
        # the stack's own file (k3scluster:sshKnownHosts' default): ssh makes the file, not
        # its directory, which a first `up` may not have made yet
        resolve(args.ssh_known_hosts).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return commands.SshSettings(
        user=args.ssh_user,
        identity=resolve(args.ssh_identity) if args.ssh_identity else None,
        known_hosts=resolve(args.ssh_known_hosts) if args.ssh_known_hosts else None,
    )


SSH_SESSION_FACTOR = 3  # a whole ssh session: at most this many times its connect timeout


def _ssh_run(
    ssh: commands.SshSettings, ip: str, remote: list[str], timeout: int = 15,
    *, new_connection: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``remote`` on the host over ssh; ``timeout`` bounds the connection, and three times it
    the whole session (a host that accepts the connection and then hangs is given up, with
    exit code 255 and a message, as ssh gives up a host it cannot reach)."""
    argv = commands.ssh_command(
        ssh.user,
        ipaddress.IPv4Address(ip),
        remote,
        identity=ssh.identity,
        known_hosts=ssh.known_hosts,
        connect_timeout=timeout,
        remember_host_keys=ssh.remember_host_keys,
        new_connection=new_connection,
    )
    limit = SSH_SESSION_FACTOR * timeout
    try:
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
            timeout=limit,
        )
    except subprocess.TimeoutExpired:  # run() killed ssh
        return subprocess.CompletedProcess(
            argv, 255, "", f"ssh to {ip}: no answer within {limit} s\n"
        )


def _ssh_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"ssh exit code {proc.returncode}"


def observe(
    ssh: commands.SshSettings,
    ip: str,
    units: list[str],
    timeout: int = 15,
    *,
    boot: bool = False,
) -> dict[str, object]:
    """``{"system": "/nix/store/…", "units": {unit: state}}`` read from the host over ssh;
    with ``boot`` also ``"reboot"``: what changed since the host booted (kernel, initrd,
    kernel-params; [] nothing), or None when it cannot tell."""
    script = _OBSERVE_SCRIPT.format(units=" ".join(units) or "")
    if not units:
        script = 'readlink /run/current-system || echo "-"'
    if boot:
        script += "; " + boot_script()
    proc = _ssh_run(ssh, ip, [script], timeout)
    if proc.returncode != 0:
        raise K3sClusterError(
            f"cannot read what {ip} runs: {_ssh_error(proc)}",
            hint="check that the host is up and accepts your ssh key for root",
        )
    lines = proc.stdout.splitlines()
    system = lines[0].strip() if lines else "-"
    states: dict[str, str] = {}
    for line in lines[1:]:
        unit, _, state = line.partition("=")
        if unit in units:
            states[unit] = state.strip() or "unknown"
    seen: dict[str, object] = {
        "system": system if system.startswith("/nix/store/") else None,
        "units": states,
    }
    if boot:
        changed = [ln[len("reboot:") :] for ln in lines if ln.startswith("reboot:")]
        seen["reboot"] = changed if "reboot-checked" in lines else None
    return seen


def _credentials(
    ssh: commands.SshSettings, ips: list[str], deadline: float, what: str
) -> dict[str, Any] | None:
    """K3s's admin kubeconfig (kept in memory) from the first host of ``ips`` (the server
    hosts, the init-server's first) that has it, asking each in turn until one has."""
    from k3scluster import kube

    last, where = "", ""

    def poll() -> kube.Check:
        nonlocal last, where
        missing = []
        for ip in ips:
            proc = _ssh_run(ssh, ip, ["cat", "--", kube.KUBECONFIG_ON_HOST])
            if proc.returncode == 0 and proc.stdout.strip():
                last, where = proc.stdout, ip
                return kube.Check(True, f"admin kubeconfig read from {ip}")
            missing.append(f"{ip}: {_ssh_error(proc)}")
        return kube.Check(False, "no admin kubeconfig yet (" + "; ".join(missing) + ")")

    check = kube.wait_until(what, poll, max(0.0, deadline - time.monotonic()), _progress)
    if not check.ready:
        return None
    return kube.parse_kubeconfig(last, f"{where}:{kube.KUBECONFIG_ON_HOST}")


def first_answering(apis: list[str], read: Any) -> tuple[Any, list[str]]:
    """``read(url)`` (a ``kube.NodeSeen``) of each API URL in turn: the first that answered
    about the node (they share one datastore, so its answer is the cluster's) and ``[]``, or,
    when none answers, None and what each said. A server that is down (the init-server's
    host, say) so hides nothing."""
    seen = []
    for url in apis:
        got = read(url)
        if got.answered:
            return got, []
        seen.append(f"{url}: {got.check.seen}")
    return None, seen


def first_answer(apis: list[str], read: Any) -> Any:
    """:func:`first_answering`'s check; when none answers, not ready, with what each said."""
    from k3scluster import kube

    got, seen = first_answering(apis, read)
    return got.check if got is not None else kube.Check(False, "; ".join(seen))


def _host_name(ssh: commands.SshSettings, ip: str) -> str | None:
    """The host name the machine at ``ip`` answers with (NixOS sets it from the plan); None
    when it does not answer."""
    proc = _ssh_run(ssh, ip, ["cat", "/proc/sys/kernel/hostname"], timeout=10)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _answers_as(ssh: commands.SshSettings, ip: str, host: str) -> bool:
    """Proof of target: the machine at ``ip`` says it is ``host`` (its host name)."""
    return _host_name(ssh, ip) == host


def _readdressed_deploy(args: argparse.Namespace, ssh: commands.SshSettings,
                        argv: list[str], deadline: float) -> bool:
    """A host that moves to a new address (``--via OLD``): when it still answers at OLD,
    colmena installs the new system as the boot default through OLD (a switch would take the
    address away under colmena's own ssh connection), the host reboots into it, and the
    deploy waits until it answers at its new address. Returns False when the host is not at
    OLD but already at its new address (an earlier run moved it): the ordinary deploy."""
    if not _answers_as(ssh, args.via, args.host):
        if _answers_as(ssh, args.ip, args.host):
            _progress(f"{args.host}: already at its new address {args.ip}")
            return False
        raise K3sClusterError(
            f"{args.host} answers neither at {args.via} (where it was last deployed) nor at "
            f"{args.ip} (its new address in the plans) as {args.host}",
            hint="check that the host is up; the deploy is tried again by the next `pulumi up`",
        )
    boot = list(argv)
    if boot[1:3] == ["apply", "switch"]:
        boot[2] = "boot"
    _progress(f"{args.host}: deployed through {args.via}, its address until it reboots")
    code = _colmena(args.host, boot, env={**os.environ, commands.via_env(args.host): args.via})
    if code != 0:
        raise K3sClusterError(f"`{' '.join(boot)}` failed with exit code {code}")
    _ssh_run(ssh, args.via, ["systemctl", "--no-block", "reboot"], timeout=10)
    _progress(f"{args.host}: rebooting into its new address {args.ip}")
    from k3scluster import kube

    check = kube.wait_until(
        f"{args.host}: at {args.ip}",
        lambda: kube.Check(_answers_as(ssh, args.ip, args.host), f"ssh at {args.ip}"),
        max(0.0, deadline - time.monotonic()),
        _progress,
        interval=5.0,
    )
    if not check.ready:
        raise K3sClusterError(
            f"{args.host} rebooted but does not answer at its new address {args.ip}",
            hint=f"look at its console; it may still answer at {args.via}",
        )
    return True


def _before_deploy(args: argparse.Namespace, ssh: commands.SshSettings,
                   servers: list[list[str]], agents: list[str], deadline: float) -> None:
    """What the cluster still holds of this host's K3s nodes when the host comes back empty
    (a reinstall, a new disk): a stale etcd member of its server (asked at ``--join-via``,
    the other servers of the plans, and at the servers the stack deployed on other hosts,
    ``k3scluster.deployedservers``), its agent's old Node and node-password secret
    (``--check-agent-state``). A server with no data that none of them answers is refused
    when the stack deployed other servers (a running cluster: its start would init a second
    one); on a stack that deployed none (a first ``up``) the init-server goes on and inits."""
    from k3scluster import agentmembers, etcdmembers

    run = etcdmembers.ssh_runner(ssh)
    address = args.via or args.ip
    # the other servers: those of the plans (--join-via) and those the stack deployed (a
    # reinstalled server whose peers all leave the plans in this run is asked about too)
    recorded = _other_deployed_servers(args)
    for name, _sip in servers if args.join_via or recorded else []:
        state = etcdmembers.read_server_state(run, address)
        if state.has_data:
            continue
        asked = list(dict.fromkeys([*args.join_via, *(s.ip for s in recorded or [])]))
        try:
            etcdmembers.remove_stale(run, asked, name, _progress)
        except K3sClusterError as err:
            if "no K3s server that stays answered" not in err.message:
                raise
            if recorded:
                raise _refuse_new_cluster(args.host, name, recorded, asked) from None
            why = ("the stack deployed no other server (a new cluster)" if recorded == []
                   else "the servers the stack deployed are not known here (no list)")
            _progress(f"{name}: no other server answers and {why}; no stale member to look for")
    for name in agents if args.check_agent_state else []:
        if agentmembers.has_node_password(run, address):
            continue
        # asked once: no admin kubeconfig on any server host means no cluster yet (a first
        # deploy), so nothing it could still hold of this agent
        creds = _credentials(ssh, args.credentials_from, time.monotonic(), args.host)
        if creds is None:
            _progress(f"{name}: no cluster credentials yet; no old Node to look for")
            continue
        for k, url in enumerate(args.api):  # the servers in turn, as the gates ask them
            try:
                agentmembers.clean_reinstalled_agent(creds, url, name, address, run, _progress)
                break
            except agentmembers.AgentStillReady:
                raise  # the cluster's answer (they share one datastore): no other server's
            except K3sClusterError:
                if k == len(args.api) - 1:
                    raise


def _other_deployed_servers(args: argparse.Namespace) -> list[Any] | None:
    """The K3s servers the stack deployed on other hosts before this run (the file ``up``
    writes beside the render directory, ``k3scluster.deployedservers``); None when there is
    none to read."""
    from k3scluster import deployedservers

    if not args.render_out:
        return None
    listed = deployedservers.read(deployedservers.file_for(resolve(args.render_out)))
    return None if listed is None else [s for s in listed if s.host != args.host]


def _refuse_new_cluster(host: str, name: str, recorded: list[Any],
                        asked: list[str]) -> K3sClusterError:
    """A server host with no etcd data whose peers are all down: its start would init a new
    cluster beside the one the stack runs (k3s-server-start.sh), a split brain when they
    come back. Refused before anything is deployed."""
    peers = ", ".join(f"{s.name} on {s.host} ({s.ip})" for s in recorded)
    return K3sClusterError(
        f"{host}: its server {name} has no etcd data (reinstalled or a new disk), and none of "
        f"the servers this stack deployed answers ({peers}; asked at {', '.join(asked)}): "
        f"deployed now, {name} would start a NEW cluster beside the running one, two clusters "
        "once they come back; nothing was deployed",
        hint="bring those servers back up (enough for etcd's quorum: in a cluster of three, "
        "both others), then `pulumi up` again: the host then joins them; to start over from "
        "the cluster's etcd snapshot on purpose, follow the README (\"Operating the cluster\": "
        "a reinstalled server refused; \"The etcd snapshot\", Restoring it)",
    )


def _colmena_uses_stack_ssh(ssh: commands.SshSettings) -> None:
    """Point colmena's own ssh (every colmena this task runs) at the stack's known_hosts file
    and identity: an ssh_config beside the known_hosts file, named by ``SSH_CONFIG_FILE``.
    Without it a VM stack's deploy would remember the VMs' host keys for the plan's addresses
    in ~/.ssh/known_hosts, and the real machines' keys would be refused there later."""
    text = commands.colmena_ssh_config(ssh)
    if text is None or ssh.known_hosts is None:
        return
    config = ssh.known_hosts.with_name(ssh.known_hosts.name + ".colmena-ssh_config")
    fd, tmp = tempfile.mkstemp(prefix=f".{config.name}.", dir=config.parent)
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp: 0600, as ssh wants its configuration
            f.write(text)
        os.replace(tmp, config)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.environ[commands.COLMENA_SSH_CONFIG_ENV] = str(config)


def _colmena(host: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run one of the deploy's colmenas (its output is the step's own), saying every
    ``progress.PROGRESS_EVERY`` seconds that it still runs: with waitReady false nothing
    else is said while it builds and switches, for minutes; its exit status."""
    from k3scluster.progress import heartbeat

    with heartbeat(f"{host}: colmena", _progress):
        return subprocess.run(argv, stdin=subprocess.DEVNULL, check=False, env=env).returncode


def _deploy(args: argparse.Namespace) -> None:

    # the hive sends a host to K3SCLUSTER_VIA_<host> when it is set: only this task sets it,
    # for the one host it moves (_readdressed_deploy); one left in the environment that ran
    # `pulumi up` would send every deploy of that host, and its drain, to that address
    for name in [k for k in os.environ if k.startswith(commands.VIA_ENV_PREFIX)]:
        del os.environ[name]
    ssh = _ssh(args)
    _colmena_uses_stack_ssh(ssh)
    if args.render:
        held = dict(item.split("=", 1) for item in args.hold_agent)
        ensure_render(resolve(args.render), resolve(args.render_out), args.vm_stack, None,
                      _progress, held)
    servers = [s.split("=", 1) for s in args.server]
    agents = list(args.agent)
    timeout = float(args.timeout)
    deadline = time.monotonic() + timeout
    health = "ready"
    creds: dict[str, Any] | None = None  # the gates' credentials
    from k3scluster import kube

    # the kubernetes client's temporary files (credentials) stay in a private directory
    with kube.private_tempdir():
        if not args.no_gates:  # the clean-ups need the cluster's credentials, as the gates do
            _before_deploy(args, ssh, servers, agents, deadline)
        drained = _drain_before(args, ssh) if args.drain and not args.no_gates else None
        guard = _rollback_guard(args, ssh)
        argv = resolve_args(args.argv)
        try:  # the system to go back to, the dead-man switch armed; nothing deployed yet
            if guard:
                guard.before(lambda: _colmena_goal(args.host, argv, "push"))
        except K3sClusterError as err:
            raise drained.undo(err) if drained else err from None
        try:
            if not (args.via and _readdressed_deploy(args, ssh, argv, deadline)):
                code = _colmena(args.host, argv)
                if guard:
                    guard.after_switch()
                if code != 0:
                    raise K3sClusterError(
                        f"`{' '.join(args.argv)}` failed with exit code {code}"
                    )
            if args.no_gates:  # waitReady false: nothing waits, nothing is read back;
                # what the stack knows the host as is printed still (membership)
                if args.record:
                    print(DEPLOYED_PREFIX + json.dumps({
                        "host": json.loads(args.record),
                        "deployedAt": datetime.datetime.now(datetime.UTC).strftime(
                            "%Y-%m-%dT%H:%M:%SZ"),
                    }, sort_keys=True), flush=True)
                return
            deadline = time.monotonic() + timeout
            if servers or agents:
                creds = _gates(args, ssh, servers, agents, timeout, deadline)
            else:
                health = "no K3s"
        except K3sClusterError as err:
            if guard:  # back to the system it ran before, and its gates again
                err = guard.failed(err, lambda: _gates_again(args, ssh, servers, agents))
            raise drained.left_cordoned(err) if drained else err from None
        if args.reboot_timeout is not None:  # k3scluster:reboot auto (never rolled back)
            drained = _reboot_if_needed(args, ssh, servers, agents, drained)
        if drained:
            drained.after(args.host)
        elif args.drain and creds is not None:  # a cordon an earlier run left
            _undo_own_cordon(args, creds)
    # "reboot": the boot entries that differ from the booted system's (the stack output
    # needsReboot, k3scluster.bootentries)
    seen = observe(ssh, args.ip, _units(servers, agents), boot=True)
    record = {
        **seen,
        **({"host": json.loads(args.record)} if args.record else {}),
        "health": health,
        "deployedAt": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    print(DEPLOYED_PREFIX + json.dumps(record, sort_keys=True), flush=True)


def _drain_before(args: argparse.Namespace, ssh: commands.SshSettings) -> Any:
    """``--drain NODE``: the drain a deploy starts with; the ``Drain`` to undo after it, or
    None. A host that moves (``--via OLD``) and still answers at OLD reboots into its new
    address (``_readdressed_deploy``), which restarts its agent whatever the switch would
    do: drained before its new system is installed. One an earlier run moved already is
    deployed as any host; one found at neither address is not drained (its deploy fails)."""
    if not args.via:
        return _drain_if_restarting(args, ssh)
    if _answers_as(ssh, args.via, args.host):
        return _drain_now(args, ssh, f"it reboots into its new address {args.ip}")
    if _answers_as(ssh, args.ip, args.host):
        return _drain_if_restarting(args, ssh)
    return None


def _drain_if_restarting(args: argparse.Namespace, ssh: commands.SshSettings) -> Any:
    """``--drain NODE``: when colmena's dry activation says the switch would stop or restart
    the agent's unit, cordon and drain NODE (``k3scluster.drain``); the ``Drain`` to undo
    after the deploy, or None when the switch leaves the agent running."""
    from k3scluster import drain

    output = drain.dry_activate(resolve_args(args.argv), _progress)
    if not drain.recognised(output):
        _progress(
            f"{args.host}: the dry activation printed no '{drain.DRY_ACTIVATION_MARK}' line "
            f"(not switch-to-configuration's output as k3scluster knows it): the switch may "
            f"restart {drain.AGENT_UNIT}, so {args.drain} is drained as if it did"
        )
    if not drain.agent_restarts(output):
        _progress(f"{args.host}: the switch leaves {drain.AGENT_UNIT} running: no drain")
        return None
    return _drain_now(args, ssh, f"the switch restarts {drain.AGENT_UNIT}")


def _drain_now(args: argparse.Namespace, ssh: commands.SshSettings, why: str,
               done: str | None = None) -> Any:
    """Cordon and drain NODE (``--drain``) through the first server that answers about it,
    saying ``why``; the ``Drain`` to undo after the deploy (None: not registered yet).
    ``done``: what became of the host when this fails (default: nothing was deployed)."""
    from k3scluster import drain, kube

    done = done or drain.NOTHING_DEPLOYED
    deadline = time.monotonic() + float(args.timeout)
    creds = _credentials(ssh, list(args.credentials_from), deadline, args.host)
    if creds is None:
        raise K3sClusterError(
            f"{args.host}: cannot drain {args.drain}: no admin kubeconfig at "
            f"{kube.KUBECONFIG_ON_HOST} on any server host ({', '.join(args.credentials_from)});"
            f" {done}; node {args.drain} was not cordoned",
            hint=f"look at: ssh root@{args.credentials_from[0]} journalctl -M k3s-server -u k3s",
        )
    # the first server that answers about the node (the init-server's host may be down)
    said = []
    for url in args.api:
        seen = kube.read_node(creds, url, args.drain)
        if seen.answered:
            break
        said.append(f"{url}: {seen.check.seen}")
    else:
        raise K3sClusterError(
            f"{args.host}: cannot drain {args.drain}: no server answered ({'; '.join(said)}); "
            f"{done}; node {args.drain} was not cordoned"
        )
    if not seen.registered:
        _progress(f"{args.host}: node {args.drain} is not registered yet: nothing to drain")
        return None
    d = drain.Drain(creds, url, args.drain, float(args.drain_timeout), _progress,
                    owner=args.stack, done=done)
    _progress(f"{args.host}: {why}: draining {args.drain} first")
    d.before()
    return d


def _rollback_guard(args: argparse.Namespace, ssh: commands.SshSettings) -> Any:
    """The ``rollback.Guard`` of this deploy (``--no-rollback``, ``--confirm-timeout``), or
    None: gates off (nothing of the host is read back), a re-addressed host (``--via``: it
    reboots into its new system at another address, where no timer armed through the old one
    could be confirmed, and a rollback would take it back to an address the plans no longer
    have), or both turned off."""
    from k3scluster import rollback

    confirm = rollback.CONFIRM_TIMEOUT if args.confirm_timeout is None else args.confirm_timeout
    if args.no_gates or args.via or (args.no_rollback and confirm <= 0):
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")

    def run(script: str, new_connection: bool) -> tuple[int, str, str]:
        proc = _ssh_run(ssh, args.ip, [script], timeout=10, new_connection=new_connection)
        return proc.returncode, proc.stdout or "", proc.stderr or ""

    return rollback.Guard(args.host, run, _progress, rollback=not args.no_rollback,
                          confirm_timeout=confirm, wait=float(args.timeout),
                          unit_id=f"{args.host}-{stamp}-{os.getpid()}")


def _colmena_goal(host: str, argv: list[str], goal: str) -> None:
    """``colmena apply <goal>`` of the deploy ``argv`` (the same hive and host); ``push``:
    build and copy the new system to the host, activating nothing."""
    from k3scluster import drain

    other = drain.colmena_goal_argv(argv, goal)
    _progress(f"the new system to the host first: {' '.join(other)}")
    code = _colmena(host, other)
    if code != 0:
        raise K3sClusterError(
            f"`{' '.join(other)}` failed with exit code {code}; nothing was deployed")


def _undo_own_cordon(args: argparse.Namespace, creds: dict[str, Any]) -> None:
    """After a healthy deploy that drained nothing: when an earlier run of this stack left the
    node cordoned (its mark, ``kube.CORDONED_BY``: a deploy that failed after its drain, or an
    uncordon that failed), uncordon it (``creds``: the gates'). A mark of this stack on a node
    that is not cordoned (uncordoned by hand) is removed, so that a cordon made by hand later
    is never taken for this stack's. Asked of the first server that answers, once: no answer
    means nothing to undo now (the next run asks again)."""
    from k3scluster import drain, kube

    if not args.stack:
        return
    for url in args.api:
        try:
            mark, cordoned = kube.mark_of(creds, url, args.drain)
        except K3sClusterError:
            continue  # this server does not answer: the next one may
        if mark == args.stack and cordoned:
            _progress(f"{args.drain}: cordoned by an earlier run of stack {args.stack}")
            drain.Drain(creds, url, args.drain, float(args.drain_timeout), _progress,
                        cordoned=True, owner=args.stack).after(args.host)
        elif mark == args.stack:
            try:
                if kube.forget_stale_mark(creds, url, args.drain, args.stack):
                    _progress(f"{args.drain}: uncordoned by hand since an earlier run of stack "
                              f"{args.stack} cordoned it: its mark {kube.CORDONED_BY} removed")
            except K3sClusterError as err:  # the deploy is done; the next run tries again
                _progress(f"{args.drain}: {err.message}")
        return


def _reboot_if_needed(args: argparse.Namespace, ssh: commands.SshSettings,
                      servers: list[list[str]], agents: list[str], drained: Any) -> Any:
    """``--reboot-timeout S``: when the host's boot entries changed, drain its agent node,
    reboot it, wait for a new boot id and its gates (``k3scluster.reboot``); the drain to undo
    after (the switch's, or the one made for the reboot). A server host reboots only while
    every other etcd member is healthy (``etcdctl`` through its own server, which passed its
    gate: ``etcdmembers.read_members``)."""
    from k3scluster import etcdmembers, reboot

    timeout = float(args.reboot_timeout)

    def may_reboot() -> None:
        if servers:
            reboot.refuse_unless_other_members_healthy(
                args.host, [name for name, _sip in servers],
                lambda: etcdmembers.read_members(etcdmembers.ssh_runner(ssh), [args.ip]).members,
                args.drain if drained is None else None)

    _rebooted, undo = reboot.reboot_if_needed(
        args.host,
        args.ip,
        lambda words, t: _ssh_run(ssh, args.ip, words, timeout=t),
        timeout=timeout,
        drained=drained,
        drain=lambda: _drain_now(args, ssh, "it reboots", reboot.not_rebooted(args.host))
        if args.drain else None,
        gates=lambda deadline, booted: _gates(args, ssh, servers, agents, timeout, deadline,
                                              booted=booted) if servers or agents else None,
        progress=_progress,
        may_reboot=may_reboot,
    )
    return undo




def _snapshot(args: argparse.Namespace) -> None:
    from k3scluster import snapshot

    ssh = _ssh(args)

    def run(ip: str, words: list[str]) -> tuple[int, str]:
        proc = _ssh_run(ssh, ip, words)
        return proc.returncode, (proc.stdout or "") + (proc.stderr or "")

    servers = [tuple(s.split("=", 1)) for s in args.server]
    now = datetime.datetime.now(datetime.UTC)
    name = snapshot.snapshot_name(args.stack, now)
    taken = snapshot.take(
        servers, name, run, _progress, lambda ip: _host_name(ssh, ip)  # type: ignore[arg-type]
    )
    record = {"name": taken.name, "file": taken.file, "host": taken.host,
              "path": taken.path_on_host, "takenAt": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    print(SNAPSHOT_PREFIX + json.dumps(record, sort_keys=True), flush=True)


def _gates(
    args: argparse.Namespace,
    ssh: commands.SshSettings,
    servers: list[list[str]],
    agents: list[str],
    timeout: float,
    deadline: float,
    *,
    booted: str | None = None,
) -> dict[str, Any]:
    """Waits for the host's gates; the cluster's credentials they used. ``booted``: the boot id
    the host came back with from a reboot; an agent's Node counts as Ready only when its
    kubelet reports that boot (``nodeInfo.bootID``): right after a reboot the API still shows
    the Node Ready as the kubelet of the boot before left it, until the node controller's
    grace period marks it otherwise."""
    from k3scluster import kube

    creds = _credentials(ssh, list(args.credentials_from), deadline, args.host)
    if creds is None:
        asked = ", ".join(args.credentials_from)
        raise K3sClusterError(
            f"{args.host}: no admin kubeconfig at {kube.KUBECONFIG_ON_HOST} on any server "
            f"host ({asked}) after {kube.duration(timeout)}: K3s did not start on any server",
            hint=f"look at: ssh root@{args.credentials_from[0]} journalctl -M k3s-server -u k3s",
        )
    for name, sip in servers:
        url = kube.server_url(sip)

        def ready(url: str = url) -> kube.Check:
            return kube.check_readyz(creds, url)

        check = kube.wait_until(
            f"{args.host}: {name}",
            ready,
            max(0.0, deadline - time.monotonic()),
            _progress,
        )
        if not check.ready:
            raise K3sClusterError(
                f"{args.host}: K3s server {name} ({sip}) not ready after "
                f"{kube.duration(timeout)}; last seen: {check.seen}",
                hint=f"look at: ssh root@{args.ip} journalctl -M k3s-server -u k3s",
            )
    for name in agents:

        def node_ready(name: str = name) -> kube.Check:
            # asked of each server in turn: the init-server's host may be the one down
            got, seen = first_answering(list(args.api),
                                        lambda url: kube.read_node(creds, url, name))
            if got is None:
                return kube.Check(False, "; ".join(seen))
            if booted and got.boot_id and got.boot_id != booted:
                return kube.Check(False, f"node {name}: its kubelet has not reported since the "
                                  f"reboot (boot id {got.boot_id}, the host's is {booted})")
            return got.check

        check = kube.wait_until(
            f"{args.host}: {name}",
            node_ready,
            max(0.0, deadline - time.monotonic()),
            _progress,
        )
        if not check.ready:
            raise K3sClusterError(
                f"{args.host}: K3s agent {name} not Ready after {kube.duration(timeout)}; "
                f"last seen: {check.seen}",
                hint=f"look at: ssh root@{args.ip} podman logs k3s-agent",
            )
    return creds


def _gates_again(args: argparse.Namespace, ssh: commands.SshSettings,
                 servers: list[list[str]], agents: list[str]) -> None:
    """The host's gates, with a new ``--timeout`` (after a rollback)."""
    if servers or agents:
        timeout = float(args.timeout)
        _gates(args, ssh, servers, agents, timeout, time.monotonic() + timeout)


def _units(servers: list[list[str]] | list[str], agents: list[str]) -> list[str]:
    return [*([SERVER_UNIT] if servers else []), *([AGENT_UNIT] if agents else [])]


def _observe(args: argparse.Namespace) -> None:
    seen = observe(_ssh(args), args.ip, list(args.unit))
    print(OBSERVED_PREFIX + json.dumps(seen, sort_keys=True), flush=True)


def _kubeconfig(args: argparse.Namespace) -> None:
    from k3scluster import kube

    ssh = _ssh(args)
    failed = []
    for ip in [args.ip, *args.also]:  # the init-server's host, then the other server hosts
        proc = _ssh_run(ssh, ip, ["cat", "--", kube.KUBECONFIG_ON_HOST])
        if proc.returncode == 0 and proc.stdout.strip():
            break
        failed.append(f"{ip}: {_ssh_error(proc)}")
        _progress(f"cannot read {kube.KUBECONFIG_ON_HOST} from {ip}; asking the next server host")
    else:
        raise K3sClusterError(
            f"cannot read {kube.KUBECONFIG_ON_HOST} from any server host ({'; '.join(failed)})",
            hint=f"look at: ssh root@{args.ip} journalctl -M k3s-server -u k3s",
        )
    others = [(node, kube.server_url(node_ip)) for node, _, node_ip in
              (o.partition("=") for o in args.other_server)]
    text = kube.rewrite_kubeconfig(
        proc.stdout, args.server, args.name, f"{ip}:{kube.KUBECONFIG_ON_HOST}", others
    )
    write_private(resolve(args.out), text)
    _progress(f"kubeconfig for {args.server} written to {args.out} (mode 0600)")
    sys.stdout.write(text)
    sys.stdout.flush()


def write_private(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` with mode 0600 from its first byte on, replacing it atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


MEMBERSHIP_PREFIX = "k3scluster-membership="


def _refuse_another_machine(ssh: commands.SshSettings, ip: str, host: str) -> None:
    """Proof of target before a leaving node's host is changed (its agent or server stopped,
    its database or K3s token moved aside): the machine that answers at ``ip``, where the
    host's last deploy reached it, must say it is ``host`` (its host name, which NixOS sets
    from the plan). One that does not answer passes: nothing runs on it then."""
    proc = _ssh_run(ssh, ip, ["cat", "/proc/sys/kernel/hostname"], timeout=10)
    if proc.returncode == 255:
        return
    name = proc.stdout.strip() if proc.returncode == 0 else ""
    if name != host:
        raise K3sClusterError(
            f"the machine at {ip}, where {host} was last deployed, answers as "
            f"{name or '(no host name: ' + (proc.stderr.strip() or 'exit ' + str(proc.returncode)) + ')'}"
            f", not as {host}: nothing is changed on it",
            hint=f"another machine has that address now? If {host} is gone, remove its "
            "deploy step from the state (`pulumi state delete`) and run `pulumi up` again",
        )


def _membership(args: argparse.Namespace) -> None:
    """One membership change of the update plan (k3scluster/update_plan.py), on the hosts
    over ssh and in the API; the last line says what was done."""
    from k3scluster import agentmembers, etcdmembers

    d = json.loads(args.detail)
    ssh = _ssh(args)
    run = etcdmembers.ssh_runner(ssh)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    via = [v for v in str(d.get("via", "")).split(",") if v]
    done: dict[str, object] = {"action": args.action}
    if args.action != "server-joins":  # a joining server's host may be new (not named yet)
        _refuse_another_machine(ssh, d["host_ip"], d.get("host", ""))
    if args.action == "server-leaves":
        node = d["node"]
        done["removed"] = etcdmembers.remove_leaving(
            run, via, node, [n for n in d["leaving"].split(",") if n], _progress
        )
        try:
            etcdmembers.stop_and_set_aside(run, d["host_ip"], node, stamp, _progress)
            done["stopped"] = True
        except K3sClusterError as err:
            if "cannot read" not in err.message:
                raise
            # its member is gone; a host that does not answer runs no server either
            _progress(f"{node}: not stopped ({err.message}); its etcd member is removed")
            done["stopped"] = False
    elif args.action == "server-joins":
        done["done"] = etcdmembers.prepare_join(
            run, via, d["node"], d["host_ip"], stamp, _progress
        )
    elif args.action == "agent-leaves":
        from k3scluster import kube

        node = d["node"]
        if not d.get("credentials_from"):
            raise K3sClusterError(f"{node}: no K3s server stays to drain and delete it through")
        deadline = time.monotonic() + 60
        creds = _credentials(ssh, [d["credentials_from"]], deadline, node)
        if creds is None:
            raise K3sClusterError(
                f"{node}: no admin kubeconfig at {kube.KUBECONFIG_ON_HOST} on "
                f"{d['credentials_from']}",
                hint=f"look at: ssh root@{d['credentials_from']} journalctl -M k3s-server -u k3s",
            )
        done["done"] = agentmembers.agent_leaves(
            creds, d["api"], node, d["host_ip"], run, float(args.drain_timeout), _progress
        )
    else:  # host-leaves
        host = d.get("host", "-")
        done["tokenSetAside"] = agentmembers.set_token_aside(
            run, d["host_ip"], host, stamp, _progress
        )
        _progress(
            f"{host} ({d['host_ip']}) left the plans: its K3s nodes ({d.get('nodes', '')}) "
            "left the cluster first"
            + (", its K3s token is set aside so they stay stopped" if done["tokenSetAside"]
               else "")
            + "; the machine was NOT wiped and keeps running its last configuration"
        )
    print(MEMBERSHIP_PREFIX + json.dumps(done, sort_keys=True), flush=True)


def _add_ssh_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ssh-user", default="root")
    p.add_argument("--ssh-identity")
    p.add_argument("--ssh-known-hosts")


def _add_ssh(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip", required=True)
    p.add_argument("--ssh-user", default="root")
    p.add_argument("--ssh-identity")
    p.add_argument("--ssh-known-hosts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k3scluster.components.tasks")
    sub = parser.add_subparsers(dest="task", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--out", required=True)
    c.add_argument("argv", nargs="+")
    hw = sub.add_parser("hardware")
    _add_ssh(hw)
    hw.add_argument("--out", required=True)
    hw.add_argument("--wait", type=float, default=SSH_WAIT)
    i = sub.add_parser("iso")
    i.add_argument("--result", type=Path, required=True)
    i.add_argument("argv", nargs="+")
    d = sub.add_parser("deploy")
    d.add_argument("--host", required=True)
    _add_ssh(d)
    d.add_argument("--timeout", type=float, required=True)
    d.add_argument("--server", action="append", default=[])
    d.add_argument("--agent", action="append", default=[])
    d.add_argument("--api", action="append", default=[])
    d.add_argument("--credentials-from", action="append", default=[])
    d.add_argument("--render")
    d.add_argument("--render-out")
    d.add_argument("--vm-stack")
    d.add_argument("--hold-agent", action="append", default=[])
    d.add_argument("--no-gates", action="store_true")
    d.add_argument("--record")
    d.add_argument("--via")
    d.add_argument("--join-via", action="append", default=[])
    d.add_argument("--check-agent-state", action="store_true")
    d.add_argument("--drain")  # the host's agent node: drained when the switch restarts it
    d.add_argument("--drain-timeout", type=float, default=600.0)
    # k3scluster:reboot auto: reboot after the gates when the boot entries changed
    d.add_argument("--reboot-timeout")
    d.add_argument("--stack")  # the stack whose mark a cordon of this deploy carries
    d.add_argument("--no-rollback", action="store_true")  # k3scluster:rollback false
    d.add_argument("--confirm-timeout", type=float)  # k3scluster:confirmTimeout (0: off)
    d.add_argument("argv", nargs="+")
    sn = sub.add_parser("snapshot")
    sn.add_argument("--stack", required=True)
    sn.add_argument("--server", action="append", default=[])  # HOST=IP, in order
    sn.add_argument("--ssh-user", default="root")
    sn.add_argument("--ssh-identity")
    sn.add_argument("--ssh-known-hosts")
    o = sub.add_parser("observe")
    o.add_argument("--host", required=True)
    _add_ssh(o)
    o.add_argument("--unit", action="append", default=[])
    k = sub.add_parser("kubeconfig")
    _add_ssh(k)
    k.add_argument("--also", action="append", default=[])
    k.add_argument("--server", required=True)
    k.add_argument("--name", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--other-server", action="append", default=[], metavar="NODE=IP")
    mb = sub.add_parser("membership")
    mb.add_argument("action", choices=["agent-leaves", "server-leaves", "host-leaves",
                                       "server-joins"])
    mb.add_argument("--detail", required=True)
    mb.add_argument("--drain-timeout", type=float, default=600.0)
    _add_ssh_options(mb)
    args = parser.parse_args(argv)
    try:
        if args.task == "capture":
            _capture(resolve(args.out), resolve_args(args.argv))
        elif args.task == "hardware":
            _hardware(args)
        elif args.task == "iso":
            _iso(resolve(args.result), resolve_args(args.argv))
        elif args.task == "deploy":
            _deploy(args)
        elif args.task == "snapshot":
            _snapshot(args)
        elif args.task == "observe":
            _observe(args)
        elif args.task == "membership":
            _membership(args)
        else:
            _kubeconfig(args)
    except K3sClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
