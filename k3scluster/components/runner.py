"""The ``python`` step runner: a Pulumi dynamic provider that runs argv lists.

It mirrors pulumi-command's ``local.Command`` (create / update / delete, ``triggers`` that
replace, outputs ``stdout`` / ``stderr``) for machines where the command provider plugin
cannot be had. Differences that matter:

- commands are argv lists run without a shell;
- ``inputs`` (name -> sha256) is a property of its own, so ``pulumi preview --diff`` shows
  which input of a step changed;
- an argv that starts with ``stackpaths.STEP_PYTHON`` runs with this process's own Python;
  without ``dir`` a step runs in the provider's working directory, the project directory;
- a failure raises with the step's host, the argv (secret values masked) and the tail of the
  output;
- stderr lines that start with ``k3scluster: `` (the tasks' progress lines) go to Pulumi's log
  while the step runs (the SDK gives a dynamic provider no log of its own: the runner talks to
  the engine address the engine starts the provider with);
- a step with ``read`` (an argv printing ``k3scluster-observed=<JSON>``) is read back by
  ``pulumi refresh``: the runner compares the ``system`` seen now with the one its last run
  recorded (``k3scluster-deployed=<JSON>`` in its stdout); when they differ the step gets a
  ``drift`` property, so refresh shows it and the next ``up`` runs the step again. A host
  that cannot be read is a warning, and its record is kept.

Pulumi pickles the provider object into the state (with dill). ``StepProvider`` holds no
attribute at all, and the class is pickled by reference (``k3scluster.components.runner``),
so the state carries its module name and nothing else of ours.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pulumi
from pulumi.dynamic import (
    CreateResult,
    DiffResult,
    ReadResult,
    ResourceProvider,
    UpdateResult,
)
from pulumi.runtime.rpc import unwrap_rpc_secret

from k3scluster.components.rendered import input_environment
from k3scluster.components.tasks import OBSERVED_PREFIX, PROGRESS_PREFIX
from k3scluster.records import DEPLOYED_PREFIX, last_json, short_digest
from k3scluster.stackpaths import STEP_PYTHON

TAIL_CHARS = 4000
MASK = "[secret]"

# Properties whose change means an update (runs ``update``, or ``create`` when there is none),
# compared as ``trigger_view`` records them.
RUN_KEYS = (
    "create", "update", "delete", "environment", "secretEnvironment", "dir", "read", "drift",
)
# The values a step was planned with: digests and plan values in clear, one map ``inputs``
# (records.step_values); states of earlier versions hold the plan values in ``plan``.
VALUE_KEYS = ("inputs", "plan")
UPDATE_KEYS = (*RUN_KEYS, *VALUE_KEYS)
_COMMAND_KEYS = ("create", "update", "delete", "read")
# Properties a run or a refresh sets (never inputs of the program).
OUTPUT_KEYS = ("stdout", "stderr", "observed", "drift")

# Properties whose change means a replacement (``delete`` then ``create``).
REPLACE_KEYS = ("triggers",)


def tail(text: str, limit: int = TAIL_CHARS) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def mask(text: str, secrets: list[str]) -> str:
    for value in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


class StepFailed(Exception):
    """A step's command failed; the message names the host, the argv and the output tail."""


def _set(value: Any) -> Any:
    """A property as it counts: plain (no secret wrapper), and None when empty or absent."""
    value = _normal(value)
    return None if value in ({}, [], "") else value


def trigger_view(props: dict[str, Any]) -> dict[str, Any]:
    """What decides whether a step runs again, as one layout for every version of the project.

    How a step shows its values is for the reader of ``pulumi preview --diff``, and it changes
    between versions; the values themselves do not. So: ``inputs`` and ``plan`` count as one
    list of (name, value) pairs (a value moved from one map to the other is the same value,
    and a name ``records.step_values`` renamed counts as it was: ``_value_name``),
    a sha256 counts by the digits a step records (``records.short_digest``: a state written
    with whole digests matches), a command is one line (states of older versions hold argv
    lists), and an empty property counts as an absent one. An ``up`` after an upgrade of the
    project that only shows the same values another way runs no colmena.
    """
    props = _normal(props)
    view: dict[str, Any] = {}
    for key in RUN_KEYS:
        value = props.get(key)
        if key in _COMMAND_KEYS and isinstance(value, list):
            value = shlex.join(str(a) for a in value)
        view[key] = _set(value)
    pairs = []
    for key in VALUE_KEYS:
        values = props.get(key)
        if isinstance(values, dict):
            pairs += [(_value_name(str(k)), short_digest(v) if isinstance(v, str) else v)
                      for k, v in values.items()]
        elif values not in (None, {}, [], ""):  # unknown during a preview
            pairs.append((key, values))
    view["values"] = sorted(pairs, key=repr)
    return view


def command_host(argv: Sequence[str]) -> str | None:
    """The host a command names with ``--host`` (a deploy's), or None."""
    args = list(argv)
    return args[args.index("--host") + 1] if "--host" in args[:-1] else None


def step_host(props: dict[str, Any]) -> str:
    """The host a step runs for, for its messages: its ``host`` property, else the host its
    ``create`` names (``command_host``: a deploy step records no ``host``, which would only
    repeat it in every preview), else ``-`` (a cluster-wide step)."""
    host = _normal(props.get("host"))
    if host:
        return str(host)
    create = _normal(props.get("create"))
    argv = shlex.split(create) if isinstance(create, str) else [str(a) for a in create or []]
    return command_host(argv) or "-"


def _id_prefix(props: dict[str, Any]) -> str:
    host = step_host(props)
    return "cluster" if host == "-" else host


def _value_name(name: str) -> str:
    """A value's name as ``trigger_view`` counts it: without the renaming of
    ``records.step_values`` (a plan value named like a digest is ``<name> (plan)``, ``:``
    made ``_``), so that a state of the two maps of older versions, where such a value kept
    its name in ``plan``, matches (a hosts.csv column ``modules`` or ``zone:a``)."""
    return name.rstrip("'").removesuffix(" (plan)").replace("_", ":")


def _normal(value: Any) -> Any:
    """Plain values: secret wrappers removed (olds come from the state, news from the program)."""
    value = unwrap_rpc_secret(value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


_ENGINE: list[Any] = []  # [EngineStub] once connected
_ENGINE_LOCK = threading.Lock()


def engine_log(message: str, severity: str = "info") -> None:
    """A line in Pulumi's own output (``pulumi up`` shows it under the stack), or on stderr
    when there is no engine to talk to (the mock tests)."""
    from pulumi.runtime.proto import engine_pb2

    level = {"info": engine_pb2.INFO, "warning": engine_pb2.WARNING}[severity]
    with _ENGINE_LOCK:
        if not _ENGINE:
            # the engine starts every provider plugin with its own address as an argument
            addr = next(
                (a for a in sys.argv[1:] if re.fullmatch(r"(127\.0\.0\.1|localhost):\d+", a)),
                None,
            )
            stub = None
            if addr:
                import grpc
                from pulumi.runtime.proto import engine_pb2_grpc

                stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(addr))
            _ENGINE.append(stub)
        stub = _ENGINE[0]
    if stub is None:
        print(message, file=sys.stderr, flush=True)
        return
    try:
        stub.Log(engine_pb2.LogRequest(severity=level, message=message), timeout=10)
    except Exception:  # noqa: BLE001 - a lost log line must not fail a deploy
        print(message, file=sys.stderr, flush=True)


def run_argv(props: dict[str, Any], which: str, *, check: bool = True) -> dict[str, Any]:
    """Run ``props[which]`` (an argv list); return ``stdout`` / ``stderr`` (tails unless the
    step keeps its whole output) and ``code``, or raise when it fails and ``check``."""
    props = _normal(props)
    # one line in the state and the preview (steps.py); a list in states of older versions
    cmd = props[which]
    argv = shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]
    if argv and argv[0] == STEP_PYTHON:
        # the Python of this provider process (it imports k3scluster): resolved here, on the
        # machine that runs the step, never recorded (stackpaths.py)
        argv[0] = sys.executable
    secret_env = {k: str(v) for k, v in (props.get("secretEnvironment") or {}).items()}
    env = dict(os.environ)
    # the inputs as the command runner passes them (K3SCLUSTER_IN_…): the deploy task checks
    # the render on this machine against them (rendered.py)
    inputs = props.get("inputs") or {}
    env.update(input_environment({k: str(v) for k, v in inputs.items() if isinstance(v, str)}))
    env.update({k: str(v) for k, v in (props.get("environment") or {}).items()})
    env.update(secret_env)
    secrets = list(secret_env.values())
    host = step_host(props)
    shown = mask(" ".join(argv), secrets)
    # The command runs in a session of its own and writes to files, not pipes: a Ctrl-C of
    # `pulumi up` (SIGINT to the terminal's process group) or a killed engine never stops a
    # colmena activation half-way; it finishes on its own, and the next `up` runs the step
    # again if its end was not recorded (README, "An interrupted up").
    with tempfile.TemporaryDirectory(prefix="k3scluster-step-") as tmp:
        out_path, err_path = Path(tmp, "stdout"), Path(tmp, "stderr")
        with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=props.get("dir") or None,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out_f,
                    stderr=err_f,
                    start_new_session=True,
                )
            except OSError as exn:
                raise StepFailed(
                    f"host {host}: cannot run {shown}: {exn.strerror or exn}"
                ) from None
        err_lines: list[str] = []
        with err_path.open("r", errors="replace") as err_r:
            pending = ""
            while True:  # progress lines while the step runs
                done = proc.poll() is not None
                pending += err_r.read()
                *lines, pending = pending.split("\n")
                for line in lines:
                    err_lines.append(line + "\n")
                    if line.startswith(PROGRESS_PREFIX):
                        engine_log(mask(line[len(PROGRESS_PREFIX) :], secrets))
                if done:
                    break
                try:  # returns as soon as the command ends: no step waits out a tick
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            if pending:
                err_lines.append(pending)
        code = proc.returncode
        out_parts = [out_path.read_text(errors="replace")]
    out = mask("".join(out_parts), secrets)
    err = mask("".join(err_lines), secrets)
    if code != 0 and check:
        output = tail((out + ("\n" if out and err else "") + err).strip())
        raise StepFailed(
            f"host {host}: {which} failed with exit code {code}: {shown}\n"
            f"--- last output ---\n{output}"
        )
    whole = bool(props.get("wholeOutput"))
    return {"stdout": out if whole else tail(out), "stderr": tail(err), "code": code}


def _run(props: dict[str, Any], which: str) -> dict[str, str]:
    result = run_argv(props, which)
    return {"stdout": result["stdout"], "stderr": result["stderr"]}


class StepProvider(ResourceProvider):
    """create/update/delete/diff for ``Step``; stateless and secret-free (it is pickled)."""

    serialize_as_secret_always = False

    def create(self, props: dict[str, Any]) -> CreateResult:
        outs = _run(props, "create")
        # the id is not an input (a preview shows inputs only): unique, and never diffed
        return CreateResult(id_=f"{_id_prefix(props)}-{uuid.uuid4().hex[:12]}", outs={**props, **outs})

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        """Whether the step runs again (its ``trigger_view`` differs) or is replaced
        (``REPLACE_KEYS``).

        A step that runs again is answered with ``changes=None`` ("unknown"), not ``True``:
        the SDK's dynamic provider server sends no detailed diff (pulumi/dynamic/__main__.py
        fills only changes, replaces and deleteBeforeReplace), and without one the engine
        prints every input of an updated step, unchanged plan values and digests included
        (backend/display getResourcePropertiesDetails). Told "unknown", the engine diffs the
        step's old and new inputs itself and keeps that as the step's detailed diff
        (resource/deploy/step_generator.go diffResource, pulumi 3.259), so ``preview --diff``
        prints only the inputs that changed. An unchanged step is answered ``changes=False``
        before the engine diffs anything. A changed one runs only when the engine's diff of the
        *recorded inputs* agrees (step_generator.go: an empty input diff is DIFF_NONE), while
        this method compares the recorded *outputs*: so every write of a step's state keeps the
        two equal as ``trigger_view`` reads them (create and update record ``news``; a
        DIFF_NONE keeps outputs that read as the new inputs; ``read`` returns the inputs with
        its ``drift``, which the engine records, also for ``up --refresh``). A ``read`` that
        set ``drift`` in its outputs alone would make the next ``up`` deploy nothing
        (test_health's refresh test).
        """
        was, now = trigger_view(olds), trigger_view(news)
        changed = [k for k in now if was[k] != now[k]]
        replaces = [k for k in REPLACE_KEYS if _set(olds.get(k)) != _set(news.get(k))]
        return DiffResult(
            changes=None if changed or replaces else False,
            replaces=replaces,
            stables=[],
            delete_before_replace=True,
        )

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        outs = _run(news, "update" if news.get("update") else "create")
        return UpdateResult(outs={**news, **outs})

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        if props.get("delete"):
            _run(props, "delete")

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """``pulumi refresh``: read the host back (steps with ``read``; others as they are)."""
        if not props.get("read"):
            return ReadResult(id_, props)
        host = step_host(props)
        deployed = last_json(_normal(props.get("stdout")), DEPLOYED_PREFIX)
        result = run_argv(props, "read", check=False)
        observed = last_json(result["stdout"], OBSERVED_PREFIX)
        if result["code"] != 0 or observed is None:
            lines = [ln for ln in str(result["stderr"]).splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"exit code {result['code']}"
            engine_log(
                f"{host}: not reachable during refresh ({why}); its record is kept as it was",
                "warning",
            )
            return ReadResult(id_, props)
        outs = {k: v for k, v in props.items() if k != "drift"}
        outs["observed"] = observed
        was = (deployed or {}).get("system")
        now = observed.get("system")
        if was and now != was:
            outs["drift"] = f"{host} runs {now}, but its last deploy activated {was}"
            engine_log(f"{host}: drift: {outs['drift']}", "warning")
        # the inputs for the next diff: the program's, plus the drift (which the program
        # never sets, so the next `up` sees a change and runs the step again)
        inputs = {k: v for k, v in props.items() if k not in OUTPUT_KEYS}
        inputs.update({"stdout": None, "stderr": None})
        if "drift" in outs:
            inputs["drift"] = outs["drift"]
        return ReadResult(id_, outs, inputs)


class Step(pulumi.dynamic.Resource, module="k3scluster", name="Step"):
    """A command step run by ``StepProvider`` (type ``pulumi-python:dynamic/k3scluster:Step``)."""

    stdout: pulumi.Output[str]
    stderr: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        props: dict[str, Any],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(
            StepProvider(),
            name,
            {"stdout": None, "stderr": None, **props},
            opts,
        )
