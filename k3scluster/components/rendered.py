"""Before a deploy runs colmena: the render on this machine is the one the step was planned with.

The render step writes the rendered tree on the machine of the operator whose ``up`` ran it.
Another operator's ``up`` (same stack, their own clone) does not run it again while its inputs
are unchanged, yet may deploy a host (one left over by an interrupted ``up``, a retry, a drift):
their render directory may then be missing or older than the plan. So the deploy task compares
the rendered files the step names among its inputs (``file:<rel>``: sha256, in the environment
as ``K3SCLUSTER_IN_…=file:<rel>=<sha256>``, set by both runners) with the files on disk, and
renders again, under a lock, when one differs. The rendered files no step names among its
inputs (``cluster.json``, which ``modules/cluster.nix`` reads, and ``hive.nix``: every host's
plan values, which the steps record in clear among their ``inputs`` instead) are compared with a render of the cluster
directory as it is on this machine, so an older render's plan data is never deployed either. A
render again keeps the servers-first hives of a K3s minor upgrade that the render step wrote
(``servers-first/``: only the render step knows which agents are held; the same ``up``'s
servers-first steps deploy from them). If the render still differs, the cluster directory changed after the plan was made:
the step fails instead of deploying something else.

Plain library code: no pulumi here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from k3scluster.commands import render_tree
from k3scluster.errors import K3sClusterError
from k3scluster.records import DIGEST_ENV_PREFIX

INPUT_ENV_PREFIX = DIGEST_ENV_PREFIX
FILE_INPUT = "file:"
MODULES_INPUT = "modules="
MODULES_DIR = "modules/"


def input_env_key(name: str) -> str:
    """``hosts/olaf.nix`` -> ``K3SCLUSTER_IN_hosts_olaf_nix`` (the value keeps the name)."""
    return INPUT_ENV_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", name)


def input_environment(inputs: Mapping[str, str]) -> dict[str, str]:
    """A step's inputs as environment variables ``K3SCLUSTER_IN_…=<name>=<value>`` (two names
    that map to one variable: the later one gets a numeric suffix)."""
    env: dict[str, str] = {}
    for name in sorted(inputs):
        key = base = input_env_key(name)
        n = 2
        while key in env:
            key, n = f"{base}_{n}", n + 1
        env[key] = f"{name}={inputs[name]}"
    return env


def planned_files(environ: Mapping[str, str]) -> dict[str, str]:
    """What a step was planned with, from its inputs: rendered file (rel) -> sha256 (or its
    first digits) for ``file:`` inputs, and ``modules/`` -> ``"<names> @ <digest>"`` for the
    group of shared modules (``render.grouped_inputs``)."""
    found: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith(INPUT_ENV_PREFIX):
            continue
        if value.startswith(FILE_INPUT):
            name, _, sha = value.rpartition("=")
            found[name[len(FILE_INPUT) :]] = sha
        elif value.startswith(MODULES_INPUT):
            found[MODULES_DIR] = value[len(MODULES_INPUT) :]
    return found


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _modules_as_planned(out: Path, entry: str) -> bool:
    from k3scluster.render import group_digest

    names, _, digest = entry.rpartition(" @ ")
    found = {n: _sha(out / MODULES_DIR / n) for n in names.split()}
    if any(sha is None for sha in found.values()):
        return False
    return group_digest("modules", {n: s for n, s in found.items() if s}) == digest


def stale(out: Path, planned: Mapping[str, str]) -> list[str]:
    """The planned files that are missing from ``out`` or differ."""
    differ = []
    for rel, want in planned.items():
        if rel == MODULES_DIR:
            ok = _modules_as_planned(out, want)
        else:  # steps record short digests (a prefix of the sha256)
            ok = (_sha(out / rel) or "-").startswith(want)
        if not ok:
            differ.append(rel)
    return sorted(differ)


# rendered files no deploy step names among its inputs (their content is plan data, recorded
# in clear among each step's ``inputs``): compared with a render of the cluster directory instead
UNPLANNED = ("cluster.json", "hive.nix")


def unplanned_stale(cluster: Path, out: Path) -> list[str]:
    """The ``UNPLANNED`` files of ``out`` that differ from a render of ``cluster`` now (only
    those two files are rendered: a deploy of each host does this)."""
    from k3scluster import render
    from k3scluster.plans import load_or_raise

    c, _ = load_or_raise(cluster)
    files = render.cluster_files(c, out)  # the same in a VM stack
    return sorted(
        rel
        for rel in UNPLANNED
        if _sha(out / rel) != hashlib.sha256(files[rel].encode("utf-8")).hexdigest()
    )


SERVERS_FIRST = "servers-first"


def _servers_first(out: Path) -> dict[str, bytes]:
    """The servers-first hives in ``out`` (rel -> content)."""
    found = sorted((out / SERVERS_FIRST).glob("*.nix")) if (out / SERVERS_FIRST).is_dir() else []
    return {f"{SERVERS_FIRST}/{f.name}": f.read_bytes() for f in found if f.is_file()}


def _restore(out: Path, kept: Mapping[str, bytes]) -> None:
    """Put back the servers-first hives a render without ``--hold-agent`` left out."""
    for rel, data in kept.items():
        target = out / rel
        if target.exists():
            continue
        target.parent.mkdir(mode=0o755, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        tmp.replace(target)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # several hosts' deploys start together
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_render(
    cluster: Path,
    out: Path,
    vm_stack: str | None,
    environ: Mapping[str, str] | None = None,
    progress: object = None,
    held_agents: Mapping[str, str] | None = None,
) -> None:
    """Render ``cluster`` into ``out`` again unless it already holds what the step planned
    and, for the files no step names, what the cluster directory renders now; as the render
    step does (``commands.render_tree``: the same VM stack and held agents)."""
    planned = planned_files(os.environ if environ is None else environ)
    if not planned:
        return

    def differ_now() -> list[str]:
        return stale(out, planned) or unplanned_stale(cluster, out)

    if not differ_now():
        return
    with _locked(out):
        differ = differ_now()
        if differ:
            if callable(progress):
                progress(
                    f"{out}: rendering again ({differ[0]}"
                    f"{f' and {len(differ) - 1} more' if len(differ) > 1 else ''} "
                    "missing or not as planned)"
                )
            kept = _servers_first(out)
            proc = subprocess.run(
                render_tree(sys.executable, cluster, out, vm_stack, held_agents),
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr,
                check=False,
            )
            if proc.returncode != 0:
                raise K3sClusterError(f"rendering {cluster} into {out} failed")
            _restore(out, kept)
        differ = stale(out, planned)
    if differ:
        raise K3sClusterError(
            f"the render of {cluster} differs from what this deploy was planned with "
            f"({', '.join(differ[:3])}): the cluster directory changed after the plan was made",
            hint="run `pulumi up` again: it plans with the cluster directory as it is now",
        )
