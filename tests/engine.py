"""Run the real Pulumi engine (.tools/bin/pulumi) in tests, offline.

Every call gets the defaults of scripts/env.sh, but with its own PULUMI_HOME, file backend and
passphrase file under ``<cwd>/.engine/`` (see :func:`engine_dirs`), and by default runs inside a
fresh network namespace with only loopback up (``unshare -n``), so nothing it starts can
reach another machine. Build the engine first with ``scripts/bootstrap-pulumi``.

    from engine import run_pulumi, require_engine   # tests/ is on sys.path under pytest
    require_engine()                       # skips the test when .tools/bin/pulumi is missing
    r = run_pulumi(["preview", "--json"], cwd=project_dir)
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".tools" / "bin"
PULUMI = BIN / "pulumi"
VERSION = "v3.259.0"

# The same offline defaults as scripts/env.sh.
OFFLINE_ENV = {
    "PULUMI_SKIP_UPDATE_CHECK": "true",
    "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
    "PULUMI_DISABLE_REGISTRY_RESOLVE": "true",
}

# Settings from the caller's shell that must not steer a test's engine.
_SCRUBBED = (
    "PULUMI_ACCESS_TOKEN",
    "PULUMI_BACKEND_URL",
    "PULUMI_CONFIG_PASSPHRASE",
    "PULUMI_CONFIG_PASSPHRASE_FILE",
    "PULUMI_HOME",
    "PULUMI_STACK",
    "PULUMI_DEBUG_LANGUAGES",
    "PULUMI_DEBUG_PROVIDERS",
)


@dataclass(frozen=True)
class EngineDirs:
    """Where a test's engine keeps its things: all under ``<cwd>/.engine/``."""

    home: Path  # PULUMI_HOME
    state: Path  # the file backend: PULUMI_BACKEND_URL=file://<state>
    passphrase: Path  # PULUMI_CONFIG_PASSPHRASE_FILE

    def stack_file(self, project: str, stack: str) -> Path:
        """The state file of one stack in the file backend."""
        return self.state / ".pulumi" / "stacks" / project / f"{stack}.json"


def engine_dirs(cwd: Path | str) -> EngineDirs:
    """The engine's directories for runs in ``cwd``, which must be outside the repository
    (tests work on copies under tmp_path, never in the checkout)."""
    where = Path(cwd).resolve()
    if where == ROOT or ROOT in where.parents:
        raise ValueError(f"run the engine in a copy under tmp_path, not in the checkout ({where})")
    base = where / ".engine"
    return EngineDirs(home=base / "home", state=base / "state", passphrase=base / "passphrase")


def have_engine() -> bool:
    return PULUMI.is_file() and os.access(PULUMI, os.X_OK)


def require_engine() -> None:
    """Skips the calling test when the engine has not been built."""
    if not have_engine():
        import pytest

        pytest.skip(f"{PULUMI.relative_to(ROOT)} is missing: run scripts/bootstrap-pulumi first")


def netns_available() -> bool:
    """True when loopback-only network namespaces can be made here (root, unshare, ip)."""
    return os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("ip"))


def host_python() -> str | None:
    """The Python named in the installed language host's shebang (it also runs dynamic providers)."""
    host = BIN / "pulumi-language-python"
    try:
        first = host.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    if first.startswith("#!/") and " " not in first:
        return first[2:]
    return None


def engine_env(cwd: Path | str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for one engine run in ``cwd``; ``env`` entries win over the defaults."""
    dirs = engine_dirs(cwd)
    dirs.home.mkdir(parents=True, exist_ok=True)
    dirs.state.mkdir(parents=True, exist_ok=True)
    if not dirs.passphrase.exists():
        fd = os.open(dirs.passphrase, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    out = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '/usr/bin:/bin')}"
    out.update(OFFLINE_ENV)
    out["PULUMI_HOME"] = str(dirs.home)
    out["PULUMI_BACKEND_URL"] = f"file://{dirs.state}"
    out["PULUMI_CONFIG_PASSPHRASE_FILE"] = str(dirs.passphrase)
    py = host_python()
    if py and "PULUMI_PYTHON_CMD" not in out:
        out["PULUMI_PYTHON_CMD"] = py
    if env:
        out.update(env)
    return out


# The shell around the engine when a test prepares its namespace (run_pulumi's ``setup``):
# loopback up, the caller's setup, then the engine as a child (not exec'd) so that the EXIT trap
# runs the caller's teardown when it ends.
_SETUP_SCRIPT = """set -e
ip link set lo up
trap '{teardown}' EXIT
{setup}
set +e
"$@"
exit $?
"""


def run_pulumi(
    args: Sequence[str],
    cwd: Path | str,
    env: Mapping[str, str] | None = None,
    netns: bool = True,
    *,
    timeout: float = 600,
    setup: str | None = None,
    teardown: str = ":",
) -> subprocess.CompletedProcess[str]:
    """Runs ``.tools/bin/pulumi ARGS`` in ``cwd`` and returns the finished process (text
    stdout/stderr; the return code is not checked). With ``netns`` (the default) it runs in a
    new network namespace with only loopback up, which needs root.

    ``setup`` (shell text, needs ``netns``) runs first, as root, inside namespaces of the run's
    own: network (only loopback, up), mount (private propagation: its mounts are seen by the
    engine and what it starts, and by nothing outside) and PID. There it may add addresses to
    ``lo``, bind-mount prepared directories and start servers in the background; when it fails
    the engine does not run and its exit status is returned. ``teardown`` (shell text) runs
    when the engine ends, in an EXIT trap. Whatever ``setup`` started dies with the PID
    namespace at the latest, even when the run is killed (``unshare --kill-child``).
    """
    cmd = _command(args, netns, setup, teardown)
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=engine_env(cwd, env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_in_namespace(
    argv: Sequence[str],
    cwd: Path | str,
    env: Mapping[str, str] | None = None,
    *,
    timeout: float = 600,
    setup: str | None = None,
    teardown: str = ":",
) -> subprocess.CompletedProcess[str]:
    """Like :func:`run_pulumi`, but runs ``argv`` (any command: one that calls ``pulumi`` finds
    the engine on PATH, with the same environment) in the namespaces ``setup`` prepared."""
    return subprocess.run(
        _wrap(list(argv), True, setup, teardown),
        cwd=cwd,
        env=engine_env(cwd, env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _command(
    args: Sequence[str], netns: bool, setup: str | None, teardown: str
) -> list[str]:
    return _wrap([str(PULUMI), *args], netns, setup, teardown)


def _wrap(cmd: list[str], netns: bool, setup: str | None, teardown: str) -> list[str]:
    if netns:
        if not netns_available():
            raise RuntimeError(
                "run_pulumi(netns=True) needs root, unshare and ip (iproute2) to make a "
                "loopback-only network namespace"
            )
        if setup is None:
            cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
        else:
            if "'" in teardown:
                raise ValueError("teardown runs in a single-quoted trap: no ' in it")
            script = _SETUP_SCRIPT.format(setup=setup, teardown=teardown)
            cmd = [
                "unshare", "--net", "--mount", "--propagation", "private",
                "--pid", "--kill-child", "--mount-proc",
                "sh", "-c", script, "sh", *cmd,
            ]
    elif setup is not None:
        raise ValueError("run_pulumi(setup=...) needs netns=True")
    return cmd


def start_pulumi(
    args: Sequence[str],
    cwd: Path | str,
    env: Mapping[str, str] | None = None,
    *,
    setup: str | None = None,
    teardown: str = ":",
    out: Path,
) -> subprocess.Popen[bytes]:
    """Like :func:`run_pulumi` (with ``netns``), but returns at once: the running process
    (its stdout and stderr go to ``out``), in a session of its own. :func:`engine_pid`
    finds the engine in it."""
    f = open(out, "wb")  # noqa: SIM115 - closed with the process
    try:
        return subprocess.Popen(
            _command(args, True, setup, teardown),
            cwd=cwd,
            env=engine_env(cwd, env),
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        f.close()


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d))
    return children


def engine_pid(proc: subprocess.Popen[bytes]) -> int | None:
    """The pid of the ``pulumi`` engine process below ``proc`` (None until it runs)."""
    children = _children()
    todo = [proc.pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() == "pulumi":
                    return pid
        except OSError:
            pass
        todo.extend(children.get(pid, []))
    return None


def changes(preview: Mapping[str, Any]) -> dict[str, str]:
    """Resource name -> op, for every step of a ``pulumi preview --json`` that is not ``same``."""
    return {s["urn"].split("::")[-1]: s["op"] for s in preview["steps"] if s["op"] != "same"}
