"""What a stack's state records of its deploy steps, read back. No pulumi import.

Every deploy step records its inputs (``inputs_digest``: name -> digest or plain value) in its
state: the python runner as the property ``inputs``, pulumi-command's ``local.Command`` as
environment variables ``K3SCLUSTER_IN_<name>`` whose value is ``<name>=<value>``
(``components/steps.py``). Two readers hand the state's resources here: the Pulumi program
(``components/deployed.py``, through the engine) and ``k3scluster check --stack``
(``read_export``: ``pulumi stack export`` run in the project; no secret is decrypted).

From them: the K3s minor releases each host's last deploys carried (``host_versions``; a
state written before they were recorded: from the digest it kept, or unknown).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from k3scluster import commands
from k3scluster.errors import K3sClusterError
from k3scluster.membership import Deployed, deployed_from_records
from k3scluster.pulumicli import run_stack_command
from k3scluster.update_plan import HostVersions, minor_key

# local.Command has no free-form input: each digest is an environment variable with this prefix
DIGEST_ENV_PREFIX = "K3SCLUSTER_IN_"
# hex digits of a sha256 a step records: enough to see a change, short to read
SHORT = 12
_SHA256 = re.compile(r"[0-9a-f]{64}")


def short_digest(value: str) -> str:
    """A sha256 as a step records it (its first ``SHORT`` hex digits); anything else as is."""
    return value[:SHORT] if _SHA256.fullmatch(value) else value

# the entries of a deploy step's inputs that group files (``render.GROUPS``): digests too
DIGEST_GROUPS = ("modules", "manifests")


def is_digest_name(name: str) -> bool:
    """Whether a deploy step's input ``name`` is a digest (``<kind>:<name>``, a group of
    files, a K3s release ``k3s:server``) rather than a plan value shown in clear."""
    return ":" in name or name in DIGEST_GROUPS


def step_values(digests: Mapping[str, Any], plan: Mapping[str, str]) -> dict[str, Any]:
    """A deploy step's ``inputs``: its digests and its plan values in clear, one map (one
    block of ``pulumi preview --diff``, where two maps took two lines more per host). A
    plan value named like a digest (a hosts.csv column ``modules`` or ``zone:a``) is renamed
    ``<name> (plan)``, ``:`` made ``_``: both stay, each change still shows, and no plan
    value is read as a rendered file's digest (``rendered.planned_files``)."""
    out = dict(digests)
    for name, value in plan.items():
        shown = name
        if is_digest_name(shown) or shown in out:
            shown = f"{name.replace(':', '_')} (plan)"
            while shown in out or shown in plan:
                shown += "'"
        out[shown] = value
    return dict(sorted(out.items()))


COMMAND_TYPE = "command:local:Command"
PYTHON_STEP_TYPE = "pulumi-python:dynamic/k3scluster:Step"
STEP_TYPES = (COMMAND_TYPE, PYTHON_STEP_TYPE)
K3S_SERVER_INPUT = "k3s:server"
K3S_AGENT_INPUT = "k3s:agent"
# the steps that deploy a host: <host>-deploy, and <host>-servers-first during a K3s upgrade
DEPLOY_SUFFIX = "-deploy"
SERVERS_FIRST_SUFFIX = "-servers-first"


def recorded_inputs(type_: str, outputs: Mapping[str, Any]) -> dict[str, str]:
    """A step's ``inputs_digest`` as its state records it (either runner)."""
    if type_ == PYTHON_STEP_TYPE:
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


def step_inputs(resources: Iterable[tuple[str, str, Mapping[str, Any]]]) -> dict[str, dict[str, str]]:
    """step name -> its recorded inputs, from (urn, type, outputs) of a state's resources."""
    found: dict[str, dict[str, str]] = {}
    for urn, type_, outputs in resources:
        if type_ in STEP_TYPES and isinstance(outputs, Mapping):
            found[urn.rsplit("::", 1)[-1]] = recorded_inputs(type_, outputs)
    return found


def step_triggers(
    resources: Iterable[tuple[str, str, Mapping[str, Any]]],
) -> dict[str, list[str]]:
    """step name -> the triggers its state records (either runner keeps them as outputs)."""
    found: dict[str, list[str]] = {}
    for urn, type_, outputs in resources:
        got = outputs.get("triggers") if isinstance(outputs, Mapping) else None
        if type_ in STEP_TYPES and isinstance(got, list):
            found[urn.rsplit("::", 1)[-1]] = [str(t) for t in got]
    return found


def from_export(text: str) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(urn, type, outputs) of every resource in ``pulumi stack export`` output."""
    try:
        data = json.loads(text)
    except ValueError as exn:
        raise K3sClusterError(f"`pulumi stack export` printed no JSON: {exn}") from None
    deployment = data.get("deployment") if isinstance(data, dict) else None
    resources = (deployment or {}).get("resources") or []
    return [
        (str(r.get("urn", "")), str(r.get("type", "")), r.get("outputs") or {})
        for r in resources
        if isinstance(r, dict)
    ]


def read_export(pulumi: str | None, project_dir: Path, stack: str) -> list[tuple[str, str, Mapping[str, Any]]]:
    """The resources of ``stack`` (``pulumi stack export``, secrets left encrypted)."""
    out = run_stack_command(
        pulumi,
        lambda exe: commands.pulumi_stack_export(exe, stack),
        project_dir,
        f"pulumi stack export --stack {stack}",
        hint=f"is the stack's name right (pulumi stack ls in {project_dir})?",
    )
    return from_export(out)


def _newest(*minors: str | None) -> str | None:
    known = [m for m in minors if m]
    return max(known, key=minor_key) if known else None


# before the deploys recorded k3s:server/k3s:agent, they recorded the sha256 of the plan's
# K3s release as this input (render.host_inputs, on hosts with K3s only): of the minor
# release ("1.33", from c09897f on), before that of the whole release tag network.yaml's
# k3s: named ("v1.31.12+k3s1", the default then), whose minor is what counts
K3S_DIGEST_INPUT = "version:k3s"
# the minor releases such a digest is matched against: 1.0 to 1.99
_MINOR_CANDIDATES = tuple(f"1.{n}" for n in range(100))
# the release tags: v1.N.P+k3sK, P up to 59 and K up to 9 (K3s's own have stayed far below)
_TAG_PATCHES, _TAG_BUILDS = 60, 10


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def _tag_digests() -> dict[str, str]:
    """sha256 hex -> minor of every release tag ``_TAG_*`` spans (made once: ~54,000)."""
    return {
        _sha(f"v{m}.{p}+k3s{k}"): m
        for m in _MINOR_CANDIDATES
        for p in range(_TAG_PATCHES)
        for k in range(1, _TAG_BUILDS)
    }


def minor_of_digest(digest: str | None) -> str | None:
    """The K3s minor release whose sha256 (hex, whole or its start) is ``digest``: of the
    minor itself, or of one of its release tags (a state older than minor releases)."""
    d = (digest or "").strip().lower()
    if len(d) < 8:
        return None
    minor = next((m for m in _MINOR_CANDIDATES if _sha(m).startswith(d)), None)
    if minor is not None:
        return minor
    tags = _tag_digests()
    if len(d) == 64:
        return tags.get(d)
    return next((m for h, m in tags.items() if h.startswith(d)), None)


def host_versions(
    steps: Mapping[str, Mapping[str, str]],
    hosts: Iterable[str],
    deployed: Deployed | None = None,
) -> dict[str, HostVersions]:
    """host -> the K3s releases its last deploys carried (the newer of its two steps: the
    servers-first step runs before the deploy of the same run, and a failed step keeps the
    inputs of its last success). Every host with a deploy step in the state is there; hosts
    never deployed are left out.

    A deploy of a k3scluster that did not record the releases recorded the digest of the
    plan's release (``version:k3s``): that release, for the host's nodes. A host whose
    state tells neither is ``unknown`` unless its last deploy's record (``deployed``) shows
    it ran no K3s node."""
    found: dict[str, HostVersions] = {}
    for host in hosts:
        deploy, first = steps.get(host + DEPLOY_SUFFIX), steps.get(host + SERVERS_FIRST_SUFFIX)
        if deploy is None and first is None:
            continue
        recs = [deploy or {}, first or {}]
        server = _newest(*(r.get(K3S_SERVER_INPUT) for r in recs))
        agent = _newest(*(r.get(K3S_AGENT_INPUT) for r in recs))
        if server or agent:
            found[host] = HostVersions(server=server, agent=agent)
            continue
        record = deployed.host(host) if deployed is not None else None
        old = _newest(*(minor_of_digest(r.get(K3S_DIGEST_INPUT)) for r in recs))
        if old is not None:  # the nodes its record names, or both when there is none
            kinds = {n.is_server for n in record.nodes} if record else {True, False}
            found[host] = HostVersions(
                server=old if True in kinds else None, agent=old if False in kinds else None
            )
            continue
        ran = [r for r in (deploy, first) if r is not None]
        without_k3s = (record is not None and not record.nodes) or not any(map(_ran_k3s, ran))
        found[host] = HostVersions(unknown=not without_k3s)
    return found


# the shared module every host with a K3s node imports (render.host_inputs records it: as
# "file:modules/k3s-common.nix", or in the "modules" line of the grouped inputs)
K3S_MODULE = "k3s-common.nix"


def _ran_k3s(recorded: Mapping[str, str]) -> bool:
    """May the deploy these inputs are of have run K3s? Only the record of the shared modules
    without the K3s one says no; an empty record (lost) may have."""
    modules = [f"{k} {v}" for k, v in recorded.items() if k == "modules" or "modules/" in k]
    return not modules or any(K3S_MODULE in m for m in modules)


# the line a deploy step prints last, with what the host runs (components/tasks.py writes
# it; the state keeps the step's stdout, read back here and by the components)
DEPLOYED_PREFIX = "k3scluster-deployed="


def last_json(stdout: str | None, prefix: str) -> dict[str, object] | None:
    """The JSON object on the last line of ``stdout`` that starts with ``prefix``."""
    for line in reversed((stdout or "").splitlines()):
        if line.startswith(prefix):
            try:
                value = json.loads(line[len(prefix) :])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


# the line the snapshot step prints last (components/tasks.py writes it)
SNAPSHOT_PREFIX = "k3scluster-snapshot="


def last_snapshot(
    resources: Iterable[tuple[str, str, Mapping[str, Any]]], step_name: str
) -> tuple[dict[str, str], str | None]:
    """The snapshot step ``step_name``'s recorded inputs and when it last took a snapshot
    (``takenAt``; None: no such step, or no record of one)."""
    for urn, type_, outputs in resources:
        mine = urn.rsplit("::", 1)[-1] == step_name
        if mine and type_ in STEP_TYPES and isinstance(outputs, Mapping):
            stdout = outputs.get("stdout")
            record = last_json(stdout if isinstance(stdout, str) else None, SNAPSHOT_PREFIX)
            taken = record.get("takenAt") if record else None
            return recorded_inputs(type_, outputs), str(taken) if taken else None
    return {}, None


def deployed_hosts_of(resources: Iterable[tuple[str, str, Mapping[str, Any]]]) -> Deployed:
    """What the hosts' last successful deploys recorded of them (``membership.Deployed``):
    each deploy step prints ``k3scluster-deployed=<JSON>`` with the host's record
    (``membership.host_record``) as ``"host"`` when it succeeds, and its state keeps it (a
    failed deploy keeps the record of its last success)."""
    found: list[object] = []
    for urn, type_, outputs in resources:
        stdout = outputs.get("stdout") if isinstance(outputs, Mapping) else None
        if type_ not in STEP_TYPES or not isinstance(stdout, str):
            continue
        if not urn.rsplit("::", 1)[-1].endswith(DEPLOY_SUFFIX):
            continue
        record = last_json(stdout, DEPLOYED_PREFIX)
        if record and "host" in record:
            found.append(record["host"])
    return deployed_from_records(found)


STACK_TYPE = "pulumi:pulumi:Stack"


def unrecorded_hosts(
    resources: Iterable[tuple[str, str, Mapping[str, Any]]], deployed: Deployed
) -> dict[str, Mapping[str, Any]]:
    """Hosts with a deploy step in the state but no record of theirs (deployed with waitReady
    false by a version that recorded nothing): host -> its entry of the last run's stack
    output ``hosts`` (``ip``, ``roles``; empty when the output has none)."""
    resources = list(resources)
    recorded = {h.name for h in deployed.hosts}
    hosts = [h for h in deployed_hosts(step_inputs(resources)) if h not in recorded]
    if not hosts:
        return {}
    output: Mapping[str, Any] = {}
    for _urn, type_, outputs in resources:
        value = outputs.get("hosts") if isinstance(outputs, Mapping) else None
        if type_ == STACK_TYPE and isinstance(value, Mapping):
            output = value
    found: dict[str, Mapping[str, Any]] = {}
    for h in hosts:
        entry = output.get(h)
        found[h] = entry if isinstance(entry, Mapping) else {}
    return found


HOST_TYPE = "k3scluster:index:Host"


def host_digests(resources: Iterable[tuple[str, str, Mapping[str, Any]]]) -> dict[str, str]:
    """host -> the digest of the system its last deploy installed (``render.host_digest``, the
    ``Host`` component's output ``digest``; hosts without one are left out)."""
    found: dict[str, str] = {}
    for urn, type_, outputs in resources:
        digest = outputs.get("digest") if isinstance(outputs, Mapping) else None
        if type_ == HOST_TYPE and isinstance(digest, str):
            found[urn.rsplit("::", 1)[-1]] = digest
    return found


def deployed_hosts(steps: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Every host a deploy step of the state is for (hosts that left the plans included)."""
    return sorted({n[: -len(DEPLOY_SUFFIX)] for n in steps if n.endswith(DEPLOY_SUFFIX)})
