"""What this stack deployed before the run: read from the stack's own state by the program.

``read_stack_resources(stack)`` asks the engine for the outputs of every resource of the
stack's last checkpoint (the builtin ``pulumi:pulumi:readStackResourceOutputs``, which
``StackReference`` uses too; synchronous, during preview and up alike, and empty for a new
stack). Only what the program reads next leaves this module: each deploy step's recorded
inputs (``step_inputs``). The state is the stack's own: nothing depends on where the
checkout lives.

A step's state is written by the engine when the step succeeds, so a run that failed half
way still records each host it deployed. ``host_versions`` reads the K3s minor releases a
host's last deploys carried (the ``k3s:server``/``k3s:agent`` inputs of ``<host>-deploy``
and ``<host>-servers-first``); a state written before these inputs existed gives None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pulumi

from k3scluster.components.steps import DIGEST_ENV_PREFIX
from k3scluster.update_plan import HostVersions, minor_key

K3S_SERVER_INPUT = "k3s:server"
K3S_AGENT_INPUT = "k3s:agent"
# the suffixes of the steps that deploy a host: <host>-deploy, <host>-servers-first
DEPLOY_SUFFIX = "-deploy"
SERVERS_FIRST_SUFFIX = "-servers-first"
STEP_TYPES = ("command:local:Command", "pulumi-python:dynamic/k3scluster:Step")


def stack_name(organization: str | None, project: str, stack: str) -> str:
    """This stack's fully qualified name (the file backend's organization is
    ``organization``; Pulumi's mocks have none)."""
    return f"{organization or 'organization'}/{project}/{stack}"


def read_stack_resources(stack: str) -> dict[str, dict[str, Any]]:
    """urn -> {"type", "outputs"} of the stack's last checkpoint ({} for a new stack).

    ``stack`` is ``<organization>/<project>/<stack>``."""
    result = pulumi.runtime.invoke("pulumi:pulumi:readStackResourceOutputs", {"stackName": stack})
    value = result.value if result is not None else None
    outputs = (value or {}).get("outputs") if isinstance(value, Mapping) else None
    return dict(outputs) if isinstance(outputs, Mapping) else {}


def recorded_inputs(type_: str, outputs: Mapping[str, Any]) -> dict[str, str]:
    """A step's ``inputs_digest`` as its state records it (either runner)."""
    if type_ == STEP_TYPES[1]:
        got = outputs.get("inputs")
        return {str(k): str(v) for k, v in got.items()} if isinstance(got, Mapping) else {}
    env = outputs.get("environment")
    if not isinstance(env, Mapping):
        return {}
    found: dict[str, str] = {}
    for key, value in env.items():
        if str(key).startswith(DIGEST_ENV_PREFIX) and isinstance(value, str) and "=" in value:
            name, _, digest = value.partition("=")
            found[name] = digest
    return found


def step_inputs(resources: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """step name -> its recorded inputs, for every command step of the state."""
    found: dict[str, dict[str, str]] = {}
    for urn, res in resources.items():
        type_ = str(res.get("type") or "")
        if type_ not in STEP_TYPES:
            continue
        outputs = res.get("outputs")
        if isinstance(outputs, Mapping):
            found[urn.rsplit("::", 1)[-1]] = recorded_inputs(type_, outputs)
    return found


def _newest(*minors: str | None) -> str | None:
    known = [m for m in minors if m]
    return max(known, key=minor_key) if known else None


def host_versions(
    steps: Mapping[str, Mapping[str, str]], hosts: list[str]
) -> dict[str, HostVersions]:
    """host -> the K3s releases its last deploys carried (the newer of its two steps: the
    servers-first step runs before the deploy of the same run, and a failed step keeps the
    inputs of its last success)."""
    found: dict[str, HostVersions] = {}
    for host in hosts:
        recs = [steps.get(host + DEPLOY_SUFFIX) or {}, steps.get(host + SERVERS_FIRST_SUFFIX) or {}]
        server = _newest(*(r.get(K3S_SERVER_INPUT) for r in recs))
        agent = _newest(*(r.get(K3S_AGENT_INPUT) for r in recs))
        if server or agent:
            found[host] = HostVersions(server=server, agent=agent)
    return found
