"""What ``pulumi up`` would do, host by host, from ``pulumi preview --json`` (pure).

``k3scluster summary DIR --preview FILE`` (and ``scripts/run-example`` at its end) prints one
line per host of the plans: its address, its K3s roles and what the preview says ``up`` would
do to it, read from the preview's steps by their names (``<host>-deploy``,
``cluster-<host>-hardware``, a VM stack's ``<host>-vm-machine``), then the cluster-wide steps
(the render, a VM stack's lab network). A host the preview does not mention is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k3scluster.lab.spec import LAB_ID_INPUT, VmSettings, net_spec
from k3scluster.model import Cluster
from k3scluster.records import is_digest_name, recorded_inputs

# step op (pulumi preview --json) -> the words for a host's deploy
_DEPLOY = {
    "create": "first deploy",
    "update": "redeploy",
    "replace": "redeploy",
    "create-replacement": "redeploy",
    "delete": "forget it (the machine is not wiped)",
}
_VM = {
    "create": "make its VM, install from its ISO",
    "update": "restart its VM (memory or CPUs)",
    "replace": "reinstall its VM (new disk)",
    "create-replacement": "reinstall its VM (new disk)",
    "delete": "stop its VM, delete its disk",
}
_FETCH_OPS = ("create", "replace", "create-replacement")
_SKIP_OPS = ("same", "read", "refresh", "delete-replaced", "discard")


@dataclass(frozen=True)
class HostPlan:
    host: str
    ip: str
    roles: tuple[str, ...]
    actions: tuple[str, ...]  # empty: nothing happens to it


def _name(step: Mapping[str, Any]) -> str:
    return str(step.get("urn", "")).rsplit("::", 1)[-1]


def _step_values(step: Mapping[str, Any], which: str) -> dict[str, Any]:
    """A step's values in one map: its ``inputs`` (digests and plan values,
    ``records.step_values``) and, in a state of an earlier version, its ``plan``."""
    state = step.get(which) or {}
    props = (state.get("inputs") or {}) if isinstance(state, dict) else {}
    found: dict[str, Any] = {}
    for prop in ("plan", "inputs"):
        nested = props.get(prop)
        found.update(nested if isinstance(nested, dict) else {})
    return found


def changed_inputs(step: Mapping[str, Any]) -> list[str]:
    """What changed in a step, old against new state: plan values a step shows in clear as
    ``name old -> new``, then the inputs whose digests differ (``records.is_digest_name``),
    each named without its kind (``nixConfig:nixConfigs/olaf.nix`` -> ``nixConfigs/olaf.nix``)."""
    old, new = _step_values(step, "oldState"), _step_values(step, "newState")
    changed = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    out = [f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in changed if not is_digest_name(k)]
    out += sorted(k.split(":", 1)[-1] for k in changed if is_digest_name(k))
    return out


def _why(step: Mapping[str, Any], limit: int = 3) -> str:
    names = changed_inputs(step) or [str(r) for r in step.get("diffReasons") or []]
    if not names:
        return ""
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f" ({shown}{more} changed)"


def host_plans(cluster: Cluster, steps: Sequence[Mapping[str, Any]]) -> list[HostPlan]:
    """One entry per host of the plans and per host the preview deletes, in hosts.csv order."""
    by_name = {_name(s): s for s in steps if s.get("op") not in _SKIP_OPS}
    names = [h.name for h in cluster.hosts]
    gone = [
        n.removesuffix("-deploy")
        for n, s in by_name.items()
        if n.endswith("-deploy") and s.get("op") == "delete"
    ]
    out = []
    for host in [*names, *(g for g in gone if g not in names)]:
        actions: list[str] = []
        vm = by_name.get(f"{host}-vm-machine")
        if vm is not None and vm.get("op") in _VM:
            actions.append(_VM[str(vm["op"])])
        hardware = by_name.get(f"cluster-{host}-hardware")
        # a fetch runs only when the step is made; its delete (the file exists now, so the
        # program no longer has the step) only forgets it
        if hardware is not None and hardware.get("op") in _FETCH_OPS:
            actions.append("fetch hardware config (ssh)")
        deploy = by_name.get(f"{host}-deploy")
        if deploy is not None and deploy.get("op") in _DEPLOY:
            op = str(deploy["op"])
            actions.append(_DEPLOY[op] + (_why(deploy) if op != "create" else ""))
        if host in names:
            ip, roles = str(cluster.host(host).ip), tuple(n.type.value for n in cluster.k3s_on(host))
        else:
            ip, roles = "-", ()
        out.append(HostPlan(host, ip, roles, tuple(actions)))
    return out


def _lab_id(step: Mapping[str, Any]) -> str:
    """The lab id the network step records (``LAB_ID_INPUT``; '' when none)."""
    state = step.get("newState") or step.get("oldState") or {}
    inputs = state.get("inputs") if isinstance(state, Mapping) else None
    if not isinstance(inputs, Mapping):
        return ""
    return recorded_inputs(str(state.get("type") or ""), inputs).get(LAB_ID_INPUT, "")


def cluster_actions(
    steps: Iterable[Mapping[str, Any]], cluster: Cluster, stack: str
) -> list[str]:
    """What happens besides the hosts: the lab network of a VM stack (its bridge and gateway
    as the program makes them for this stack, its lab id and the plan,
    ``lab.spec.net_spec``), the render. A new lab's id is drawn when ``up`` makes it: its
    bridge's name is shown up to that id."""
    out = []
    for s in steps:
        name, op = _name(s), s.get("op")
        if op in _SKIP_OPS:
            continue
        if name.endswith("-lab-network"):
            what = {"create": "create", "delete": "remove", "update": "update"}.get(
                str(op), "replace"
            )
            lab_id = _lab_id(s)
            net = net_spec(cluster, VmSettings(stack=stack, lab_dir=Path("."), lab_id=lab_id))
            bridge = net.bridge if op != "create" else net.bridge.rsplit("-", 1)[0] + "-…"
            out.append(
                f"lab network: {what} bridge {bridge} with gateway {net.gateway} on this "
                "machine"
            )
        elif name.endswith("-render"):
            out.append(f"render: {'write' if op == 'create' else 'rewrite'} the NixOS "
                       "configuration (renderDir)")
    return sorted(out, key=lambda line: not line.startswith("lab network"))


def format_summary(stack: str, plans: list[HostPlan], extra: list[str]) -> str:
    rows = [("HOST", "ADDRESS", "ROLES", "WHAT `pulumi up` WOULD DO")]
    for p in plans:
        rows.append(
            (p.host, p.ip, ",".join(p.roles) or "-", "; ".join(p.actions) or "nothing")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"Summary of the preview of stack {stack}:"]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r[:3], widths, strict=True)) + "  "
              + r[3] for r in rows]
    lines += [f"  {e}" for e in extra]
    changing = sum(1 for p in plans if p.actions)
    lines.append(
        f"{changing} of {len(plans)} host(s) would change; nothing has been done yet "
        "(`pulumi up` does it)."
        if changing
        else f"No host would change ({len(plans)} host(s))."
    )
    return "\n".join(lines) + "\n"


def summarize(stack: str, cluster: Cluster, preview: Mapping[str, Any]) -> str:
    steps = preview.get("steps") or []
    return format_summary(stack, host_plans(cluster, steps), cluster_actions(steps, cluster, stack))
