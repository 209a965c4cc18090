"""The ``python`` step runner: a Pulumi dynamic provider that runs argv lists.

It mirrors pulumi-command's ``local.Command`` (create / update / delete, ``triggers`` that
replace, outputs ``stdout`` / ``stderr``) for machines where the command provider plugin
cannot be had. Differences that matter:

- commands are argv lists run without a shell;
- ``inputs`` (name -> sha256) is a property of its own, so ``pulumi preview --diff`` shows
  which input of a step changed;
- a failure raises with the step's host, the argv (secret values masked) and the tail of the
  output.

Pulumi pickles the provider object into the state (with dill). ``StepProvider`` holds no
attribute at all, and the class is pickled by reference (``k3scluster.components.runner``),
so the state carries its module name and nothing else of ours.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pulumi
from pulumi.dynamic import (
    CreateResult,
    DiffResult,
    ResourceProvider,
    UpdateResult,
)
from pulumi.runtime.rpc import unwrap_rpc_secret

TAIL_CHARS = 4000
MASK = "[secret]"

# Properties whose change means an update (runs ``update``, or ``create`` when there is none).
UPDATE_KEYS = ("create", "update", "delete", "environment", "secretEnvironment", "inputs", "dir")
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


def _normal(value: Any) -> Any:
    """Plain values: secret wrappers removed (olds come from the state, news from the program)."""
    value = unwrap_rpc_secret(value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def run_argv(props: dict[str, Any], which: str) -> dict[str, str]:
    """Run ``props[which]`` (an argv list); return ``stdout`` / ``stderr`` tails or raise."""
    props = _normal(props)
    argv = [str(a) for a in props[which]]
    secret_env = {k: str(v) for k, v in (props.get("secretEnvironment") or {}).items()}
    env = dict(os.environ)
    env.update({k: str(v) for k, v in (props.get("environment") or {}).items()})
    env.update(secret_env)
    secrets = list(secret_env.values())
    host = props.get("host") or "-"
    shown = mask(" ".join(argv), secrets)
    try:
        proc = subprocess.run(
            argv,
            cwd=props.get("dir") or None,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as exn:
        raise StepFailed(f"host {host}: cannot run {shown}: {exn.strerror or exn}") from None
    out = mask(proc.stdout, secrets)
    err = mask(proc.stderr, secrets)
    if proc.returncode != 0:
        output = tail((out + ("\n" if out and err else "") + err).strip())
        raise StepFailed(
            f"host {host}: {which} failed with exit code {proc.returncode}: {shown}\n"
            f"--- last output ---\n{output}"
        )
    return {"stdout": tail(out), "stderr": tail(err)}


class StepProvider(ResourceProvider):
    """create/update/delete/diff for ``Step``; stateless and secret-free (it is pickled)."""

    serialize_as_secret_always = False

    def create(self, props: dict[str, Any]) -> CreateResult:
        outs = run_argv(props, "create")
        return CreateResult(id_=str(props.get("name") or "step"), outs={**props, **outs})

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = [k for k in UPDATE_KEYS if _normal(olds.get(k)) != _normal(news.get(k))]
        replaces = [k for k in REPLACE_KEYS if _normal(olds.get(k)) != _normal(news.get(k))]
        return DiffResult(
            changes=bool(changed or replaces),
            replaces=replaces,
            stables=[],
            delete_before_replace=True,
        )

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        outs = run_argv(news, "update" if news.get("update") else "create")
        return UpdateResult(outs={**news, **outs})

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        if props.get("delete"):
            run_argv(props, "delete")


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
            {"name": name, "stdout": None, "stderr": None, **props},
            opts,
        )
