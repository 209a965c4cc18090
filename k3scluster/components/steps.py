"""One function for every command step, with two runners behind it.

``runner="command"``: pulumi-command's ``local.Command`` (the default on a normal machine).
``runner="python"``: this project's dynamic provider (``k3scluster.components.runner``), for
machines where the ``pulumi-resource-command`` plugin cannot be had.

Both take argv lists (never shell text made from user data), a non-secret environment and a
secret environment (``Output.secret`` values, passed only through the environment), and a map
``inputs_digest`` (name -> sha256) whose change runs ``update``; ``triggers`` replace
(delete, then create). Both report a failure with the host, the argv and the output tail.

With ``command``, a secret in the environment makes local.Command's whole ``environment``
map secret, digests included (a diff then shows ``[secret]``); the ``python`` runner keeps
the secret environment in a property of its own. No step of the cluster needs one today:
colmena reads the key files itself.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import pulumi
import pulumi_command

from k3scluster.components.rendered import input_env_key
from k3scluster.components.runner import Step, command_host
from k3scluster.records import short_digest, step_values

RUNNERS = ("command", "python")
# local.Command has no free-form input; each digest becomes an environment variable with this
# prefix (k3scluster.records reads them back), so `pulumi preview --diff` names the input that
# changed (environment.K3SCLUSTER_IN_…).


def digest_environment(inputs_digest: Mapping[str, pulumi.Input[str]]) -> dict[str, Any]:
    """``{"hosts/olaf.nix": "ab…"}`` -> ``{"K3SCLUSTER_IN_hosts_olaf_nix": "hosts/olaf.nix=ab…"}``.

    The value keeps the original name, so two names that map to one variable stay distinct
    (the later one gets a numeric suffix).
    """
    env: dict[str, Any] = {}
    for name in sorted(inputs_digest):
        key = input_env_key(name)
        base, n = key, 2
        while key in env:
            key, n = f"{base}_{n}", n + 1
        value = inputs_digest[name]
        env[key] = f"{name}={value}" if isinstance(value, str) else pulumi.Output.concat(
            name, "=", value
        )
    return env


def _short(value: pulumi.Input[str]) -> pulumi.Input[str]:
    if isinstance(value, str):
        return short_digest(value)
    return pulumi.Output.from_input(value).apply(short_digest)  # type: ignore[arg-type]


def step(
    name: str,
    *,
    runner: str,
    host: str,
    create: Sequence[str],
    update: Sequence[str] | None = None,
    delete: Sequence[str] | None = None,
    environment: Mapping[str, str] | None = None,
    secret_environment: Mapping[str, pulumi.Output[str]] | None = None,
    triggers: Sequence[Any] = (),
    inputs_digest: Mapping[str, pulumi.Input[str]] | None = None,
    dir: str | None = None,
    output_may_hold_secrets: bool = False,
    read: Sequence[str] | None = None,
    plan: Mapping[str, str] | None = None,
    opts: pulumi.ResourceOptions | None = None,
) -> pulumi.CustomResource:
    """A command step named ``name`` for ``host`` (``-`` for cluster-wide steps).

    Returns a resource with ``stdout`` and ``stderr`` outputs. ``output_may_hold_secrets``
    marks stdout secret, keeps it whole and never logs it (stderr, the progress, still is).
    ``read`` is the argv ``pulumi refresh`` runs to read the host back (``python`` runner
    only: pulumi-command's local.Command has no read; see runner.py).

    What a preview shows: ``plan`` (name -> value, never a secret) in clear, among the digests
    of ``inputs_digest`` (short: ``short_digest``) in one map, ``inputs`` (``step_values``);
    commands as one line each.
    """
    environment = dict(environment or {})
    secret_environment = {k: pulumi.Output.secret(v) for k, v in (secret_environment or {}).items()}
    clash = set(environment) & set(secret_environment)
    if clash:
        raise ValueError(f"environment and secret_environment both set {sorted(clash)}")
    digests = {k: _short(v) for k, v in sorted((inputs_digest or {}).items())}
    plan = dict(plan or {})
    secret_outputs = ["stdout"] if output_may_hold_secrets else []

    if runner == "command":
        cmd = pulumi_command.local
        env: dict[str, Any] = {
            **digest_environment(digests),
            **{input_env_key("plan " + k): f"{k}={v}" for k, v in plan.items()},
            **environment,
            **secret_environment,
            "K3SCLUSTER_HOST": host,
        }
        return cmd.Command(
            name,
            create=shlex.join(create),
            update=shlex.join(update) if update else None,
            delete=shlex.join(delete) if delete else None,
            environment=env,
            dir=dir,
            triggers=list(triggers) or None,
            logging=cmd.Logging.STDERR if output_may_hold_secrets else cmd.Logging.STDOUT_AND_STDERR,
            # Keep output of earlier runs out of the next run's environment.
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions.merge(
                opts, pulumi.ResourceOptions(additional_secret_outputs=secret_outputs)
            ),
        )
    if runner == "python":
        # Only what is set: every property is serialized, diffed and stored for every step,
        # which is most of what a large preview costs beyond the engine's floor (bench/).
        props: dict[str, Any] = {
            "create": shlex.join(create),
            "inputs": step_values(digests, plan),  # plan values among the digests, one map
        }
        # a cluster-wide step has none; a deploy names it in its command (runner.step_host)
        if host != "-" and command_host(create) != host:
            props["host"] = host
        if update and list(update) != list(create):  # the runner runs create when update is unset
            props["update"] = shlex.join(update)
        optional = {
            "delete": shlex.join(delete) if delete else None,
            "environment": environment,
            "secretEnvironment": secret_environment,
            "triggers": list(triggers),
            "dir": dir,
            "read": shlex.join(read) if read else None,
            "wholeOutput": output_may_hold_secrets,
        }
        props.update({k: v for k, v in optional.items() if v})
        return Step(
            name,
            props,
            pulumi.ResourceOptions.merge(
                opts,
                pulumi.ResourceOptions(
                    additional_secret_outputs=[
                        *(["secretEnvironment"] if secret_environment else []),
                        *secret_outputs,
                    ]
                ),
            ),
        )
    raise ValueError(f"unknown runner {runner!r} (one of {', '.join(RUNNERS)})")
