"""``k3scluster build``: build every host's system with colmena, contact no host, and say per
host what its next deploy changes.

1. ``colmena build --keep-result --no-build-on-target --on <hosts> -f <render>/hive.nix``, its
   progress passed through line by line. Each built system becomes an indirect GC root
   ``<render>/.gcroots/node-<host>`` (colmena's ``nix-store --indirect --add-root``); a host
   counts as built when colmena made that link anew during this run, and its system is the
   link's target. A render keeps the links (``render.GC_ROOTS``), so ``pulumi up``'s own
   render does not drop them and its ``colmena apply`` finds the system already in the store.
2. Per built host whose deployed system the stack records (its output ``hosts``: ``system``,
   read by ``stackinfo.read_outputs``) and the local store holds: ``nix store diff-closures
   <deployed> <built>``, summarised (``closures``), and whether the kernel, initrd or kernel
   parameters differ (then the host needs a reboot to run the new system).

Nothing here imports pulumi; the ``pulumi`` CLI is run only to read the stack's outputs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from k3scluster import closures, commands, stackinfo
from k3scluster.bootentries import boot_changes
from k3scluster.errors import K3sClusterError
from k3scluster.render import GC_ROOTS

LOG_TAIL = 12

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# colmena's plain progress line: "<label right-aligned> | <text>" (src/progress/plain.rs)
_LABELLED = re.compile(r"^\s*(?P<label>[^|\s][^|]*?) \| (?P<text>.*)$")


@dataclass(frozen=True)
class HostBuild:
    """One host's result: its system store path when built, else the end of its log."""

    host: str
    system: str | None
    log_tail: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.system is not None


def gc_root(render_dir: Path, host: str) -> Path:
    """Where colmena --keep-result keeps a host's built system (``.gcroots/node-<host>``)."""
    return render_dir / GC_ROOTS / f"node-{host}"


def _link_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_ctime_ns)


def run_colmena(argv: Sequence[str], progress: TextIO) -> tuple[int, list[str]]:
    """Run colmena with its output (stdout and stderr, in order) passed on to ``progress``
    line by line as it comes; its exit status and the lines, without colour codes."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
    except FileNotFoundError:
        raise K3sClusterError(
            f"{argv[0]}: not found",
            hint="install colmena, or name it in the stack: "
            "pulumi config set k3scluster:colmena /path/to/colmena",
        ) from None
    lines: list[str] = []
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            progress.write(line)
            progress.flush()
            lines.append(_ANSI.sub("", line.rstrip("\n")))
    return proc.wait(), lines


def host_log(lines: Sequence[str], host: str, n: int = LOG_TAIL) -> tuple[str, ...]:
    """The last ``n`` lines colmena labelled with ``host``, else the last ``n`` of all (an
    evaluation failure is labelled with the whole chunk of hosts it evaluated)."""
    own = []
    for line in lines:
        m = _LABELLED.match(line)
        if m and m.group("label").strip() == host:
            own.append(line.strip())
    tail = own or [ln.strip() for ln in lines if ln.strip()]
    return tuple(tail[-n:])


def build_hosts(
    colmena: str,
    render_dir: Path,
    hosts: Sequence[str],
    progress: TextIO = sys.stderr,
) -> tuple[int, list[HostBuild]]:
    """Build ``hosts`` from ``<render_dir>/hive.nix``: colmena's exit status and one result
    per host, in the order given."""
    argv = commands.colmena_build(colmena, render_dir / "hive.nix", hosts)
    before = {h: _link_id(gc_root(render_dir, h)) for h in hosts}
    code, lines = run_colmena(argv, progress)
    results = []
    for h in hosts:
        link = gc_root(render_dir, h)
        now = _link_id(link)
        if now is not None and now != before[h]:
            results.append(HostBuild(h, os.readlink(link)))
        else:
            results.append(HostBuild(h, None, host_log(lines, h)))
    return code, results


def result_lines(results: Sequence[HostBuild], code: int, render_dir: Path) -> list[str]:
    """One line per host (built and its system, or FAILED and the end of its log below it),
    then where the GC roots are."""
    width = max((len(r.host) for r in results), default=0)
    lines = []
    for r in results:
        if r.ok:
            lines.append(f"built   {r.host.ljust(width)}  {r.system}")
        else:
            lines.append(f"FAILED  {r.host.ljust(width)}  the end of its log:")
            lines.extend(f"          {line}" for line in r.log_tail)
    if code != 0 and all(r.ok for r in results):
        lines.append(f"colmena exited with status {code} although every host was built")
    if any(r.ok for r in results):
        lines.append(f"GC roots: {render_dir / GC_ROOTS}/node-<host> (the next deploy finds "
                     "these systems in the store)")
    return lines


# -- what the stack deployed ---------------------------------------------------


@dataclass(frozen=True)
class Deployed:
    """What the stack records per host (``system``: None when it recorded none), or why the
    records could not be read (``reason``)."""

    systems: Mapping[str, str | None]
    reason: str | None = None


def recorded_systems(hosts: object) -> dict[str, str | None]:
    """The stack output ``hosts`` → host → the system its last deploy activated (None when
    that deploy recorded none)."""
    if not isinstance(hosts, Mapping):
        raise K3sClusterError("the stack output `hosts` is not a JSON object")
    out: dict[str, str | None] = {}
    for host, rec in hosts.items():
        system = rec.get("system") if isinstance(rec, Mapping) else None
        out[str(host)] = system if isinstance(system, str) and system.startswith("/") else None
    return out


def deployed_systems(project_dir: Path, stack: str) -> Deployed:
    """The stack's records (``stackinfo.read_outputs``: ``pulumi stack output --json``)."""
    try:
        outputs = stackinfo.read_outputs(stack, project_dir)
        if "hosts" not in outputs:
            return Deployed({}, f"stack {stack} records no hosts: it was never deployed")
        return Deployed(recorded_systems(outputs["hosts"]))
    except K3sClusterError as exn:
        return Deployed({}, str(exn).splitlines()[0])


# -- what changes ------------------------------------------------------------------------

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )


def host_changes(
    nix: str, host: str, deployed: str | None, built: str, run: Runner = _run
) -> list[str]:
    """The lines that say what deploying ``built`` changes on ``host``."""
    if deployed is None:
        return [(f"{host}: the stack records no deployed system (not deployed yet, or "
                "waitReady false): nothing to compare with")]
    if deployed == built:
        return [f"{host}: already runs this system (no change)"]
    if run(commands.nix_path_info(nix, deployed)).returncode != 0:
        return [(f"{host}: its deployed system {deployed} is not in the local store: "
                "no package diff")]
    proc = run(commands.nix_diff_closures(nix, deployed, built))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return [f"{host}: nix store diff-closures failed: {last}"]
    summary = closures.summarise(host, closures.parse_diff_closures(proc.stdout))
    lines = summary.lines()
    unread = closures.unread_lines(proc.stdout)
    if unread:  # never a silent "no package changes" from output this cannot read
        lines.append(f"  {len(unread)} line(s) of nix store diff-closures not understood, "
                     f"so changes may be missing above; the first: {unread[0]}")
    boot = boot_changes(deployed, built)
    if boot and summary.kernel is None:  # e.g. boot.kernelParams, or the initrd's modules
        lines[0] += f"; its {', '.join(boot)} change: needs a reboot"
    return lines


def changes_lines(
    nix: str, built: Sequence[tuple[str, str]], deployed: Deployed, run: Runner = _run
) -> list[str]:
    """What the next deploy changes on each built (host, system), or why it is not known."""
    if deployed.reason is not None:
        return [f"the deployed systems are not known: {deployed.reason}"]
    return [
        line
        for host, system in built
        for line in host_changes(nix, host, deployed.systems.get(host), system, run)
    ]
