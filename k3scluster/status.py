"""``k3scluster status``: the cluster at a glance, host by host (pure: no pulumi, no I/O).

It puts together what the stack recorded at its last ``up`` (``pulumi stack output hosts``:
per host the digest of its deployed configuration, the system its deploy activated, when),
what the plans say now (each host's digest, computed by :func:`planned_digests` with the very
functions the deploy uses: ``render.render_files``, ``render.host_inputs`` and
``render.host_digest``) and, where they could be reached, the hosts themselves (the system
they run now, their K3s units) and the K3s API (each node's ``Ready``, each server's
``/readyz``, versions). :func:`host_statuses` makes the rows, :func:`format_table` the table,
:func:`to_json` the ``--json`` document (:data:`JSON_FIELDS` is its schema). A row needs
attention when :attr:`HostStatus.attention` is not empty; ``status`` then exits 3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k3scluster import render
from k3scluster.lab.spec import vm_render
from k3scluster.model import Cluster

SCHEMA_VERSION = 1

# plan: how the host's deployed configuration compares with the plans now
UP_TO_DATE = "up to date"
CHANGED = "changed"  # `pulumi up` redeploys it
NOT_DEPLOYED = "not deployed"  # in the plans, never deployed by this stack (or its deploy failed)
NOT_IN_PLANS = "not in plans"  # deployed, then removed from hosts.csv: `up` forgets it
# `systemctl is-active` answers that need attention (``activating`` is on its way; ``unknown``:
# the host could not tell, and its nodes' Ready says more)
STOPPED_UNIT_STATES = ("failed", "inactive")


def planned_digests(cluster: Cluster, render_dir: Path, vm_stack: str | None) -> dict[str, str]:
    """host -> the digest ``pulumi up`` would deploy now (``hosts.<host>.digest`` after it).

    ``vm_stack``: the stack's name when it is a VM stack (its render names NICs by the VMs'
    MACs), else None: the same render the Pulumi program makes for that stack."""
    vm = vm_render(cluster, vm_stack, render_dir) if vm_stack else None
    files = render.render_files(cluster, render_dir, vm)
    return {
        h.name: render.host_digest(render.host_inputs(cluster, h.name, files, vm))
        for h in cluster.hosts
    }


@dataclass(frozen=True)
class Observed:
    """What a host runs, read over ssh now (``reachable`` False: why not, in ``error``)."""

    reachable: bool
    system: str | None = None
    units: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    # what differs between the system it booted and the one it runs (kernel, initrd,
    # kernel-params; () nothing: no reboot needed); None: it could not tell
    reboot: tuple[str, ...] | None = None


@dataclass(frozen=True)
class NodeState:
    """A K3s node as the API shows it now. ``ready`` None: not known (API not asked or not
    reachable; ``seen`` says which)."""

    name: str
    role: str
    ready: bool | None
    seen: str
    version: str | None = None


@dataclass(frozen=True)
class HostStatus:
    host: str
    ip: str | None
    roles: tuple[str, ...]
    plan: str  # UP_TO_DATE | CHANGED | NOT_DEPLOYED | NOT_IN_PLANS
    deployed_digest: str | None
    planned_digest: str | None
    system: str | None  # what its last deploy activated
    running: str | None  # what it runs now (None: not read)
    reachable: bool | None  # None: not asked (--offline)
    drift: bool | None  # None: not known
    units: Mapping[str, str] | None
    nodes: tuple[NodeState, ...]
    needs_reboot: bool | None  # None: neither the host nor the stack could tell
    deployed_at: str | None
    health: str | None  # what the last deploy's gates said
    attention: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "ip": self.ip,
            "roles": list(self.roles),
            "plan": self.plan,
            "deployedDigest": self.deployed_digest,
            "plannedDigest": self.planned_digest,
            "system": self.system,
            "running": self.running,
            "reachable": self.reachable,
            "drift": self.drift,
            "units": dict(self.units) if self.units is not None else None,
            "k3s": [
                {"name": n.name, "role": n.role, "ready": n.ready, "seen": n.seen,
                 "version": n.version}
                for n in self.nodes
            ],
            "needsReboot": self.needs_reboot,
            "deployedAt": self.deployed_at,
            "health": self.health,
            "attention": list(self.attention),
        }


# The --json document: top-level keys, and the keys of each entry of "hosts" (README).
JSON_FIELDS: dict[str, tuple[str, ...]] = {
    "document": ("schema", "stack", "clusterDir", "ok", "hosts"),
    "host": (
        "host", "ip", "roles", "plan", "deployedDigest", "plannedDigest", "system", "running",
        "reachable", "drift", "units", "k3s", "needsReboot", "deployedAt", "health", "attention",
    ),
    "k3s": ("name", "role", "ready", "seen", "version"),
}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _plan_state(deployed: Mapping[str, Any] | None, planned: str | None) -> str:
    if planned is None:
        return NOT_IN_PLANS
    if deployed is None or not _str(deployed.get("digest")):
        return NOT_DEPLOYED
    return UP_TO_DATE if deployed.get("digest") == planned else CHANGED


def _attention(
    plan: str,
    drift: bool | None,
    system: str | None,
    running: str | None,
    seen: Observed | None,
    nodes: Iterable[NodeState],
    needs_reboot: bool | None,
) -> tuple[str, ...]:
    why: list[str] = []
    if plan == CHANGED:
        why.append("its plan changed since its last deploy: `pulumi up` redeploys it")
    elif plan == NOT_DEPLOYED:
        why.append("not deployed yet (or its last deploy failed): `pulumi up` deploys it")
    elif plan == NOT_IN_PLANS:
        why.append("no longer in plans/hosts.csv: `pulumi up` forgets it (the machine keeps "
                   "running)")
    if seen is not None and not seen.reachable:
        why.append(f"not reachable over ssh ({seen.error})")
    if drift:
        why.append(f"runs {running}, but its last deploy activated {system}: "
                   "`pulumi up` after `pulumi refresh` redeploys it")
    if seen is not None and seen.reachable:
        for unit, state in sorted(seen.units.items()):
            if state in STOPPED_UNIT_STATES:
                why.append(f"{unit} is {state}")
    for n in nodes:
        if n.ready is False:
            why.append(n.seen)
    if needs_reboot:
        changed = ", ".join(seen.reboot) if seen is not None and seen.reboot else ""
        why.append(
            f"needs a reboot (its {changed} changed since it booted)"
            if changed
            else "needs a reboot (the stack lists it)"
        )
    return tuple(why)


def _needs_reboot(
    host: str, listed: frozenset[str] | None, seen: Observed | None
) -> bool | None:
    """True when the host itself (booted against current system) or the stack's reboot list
    says so; None when neither could tell."""
    own = None if seen is None or not seen.reachable or seen.reboot is None else bool(seen.reboot)
    stack = None if listed is None else host in listed
    if own is None and stack is None:
        return None
    return bool(own) or bool(stack)


def host_statuses(
    cluster: Cluster,
    planned: Mapping[str, str],
    deployed: Mapping[str, Mapping[str, Any]],
    *,
    observed: Mapping[str, Observed] | None = None,
    nodes: Mapping[str, NodeState] | None = None,
    needs_reboot: frozenset[str] | None = None,
) -> list[HostStatus]:
    """One row per host of the plans (in hosts.csv order), then per host the stack still
    records but the plans no longer have. ``observed``/``nodes`` None: not asked (offline);
    a host or node missing from them was not asked either."""
    names = [h.name for h in cluster.hosts] + sorted(set(deployed) - set(planned))
    rows = []
    for name in names:
        rec = deployed.get(name)
        in_plan = name in planned
        plan = _plan_state(rec, planned.get(name))
        system = _str((rec or {}).get("system"))
        seen = (observed or {}).get(name)
        running = seen.system if seen is not None and seen.reachable else None
        drift = (running != system) if (running is not None and system is not None) else None
        k3s_nodes = cluster.k3s_on(name) if in_plan else ()
        states = tuple(
            (nodes or {}).get(n.name)
            or NodeState(n.name, n.type.value, None, "not asked" if nodes is None else "unknown")
            for n in k3s_nodes
        )
        reboot = _needs_reboot(name, needs_reboot, seen)
        rows.append(
            HostStatus(
                host=name,
                ip=str(cluster.host(name).ip) if in_plan else _str((rec or {}).get("ip")),
                roles=tuple(n.type.value for n in k3s_nodes)
                if in_plan
                else tuple((rec or {}).get("roles") or ()),
                plan=plan,
                deployed_digest=_str((rec or {}).get("digest")),
                planned_digest=planned.get(name),
                system=system,
                running=running,
                reachable=None if seen is None else seen.reachable,
                drift=drift,
                units=dict(seen.units) if seen is not None and seen.reachable else None,
                nodes=states,
                needs_reboot=reboot,
                deployed_at=_str((rec or {}).get("deployedAt")),
                health=_str((rec or {}).get("health")),
                attention=_attention(plan, drift, system, running, seen, states, reboot),
            )
        )
    return rows


def needs_attention(rows: Iterable[HostStatus]) -> bool:
    return any(r.attention for r in rows)


def to_json(stack: str, cluster_dir: Path, rows: list[HostStatus]) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "stack": stack,
        "clusterDir": str(cluster_dir),
        "ok": not needs_attention(rows),
        "hosts": [r.to_json() for r in rows],
    }


def short_system(path: str | None) -> str:
    """``/nix/store/<32 chars>-nixos-system-olaf-25.05…`` -> ``<first 8>…``."""
    if not path:
        return "-"
    base = path.rsplit("/", 1)[-1]
    return base[:8] + "…" if len(base) > 8 else base


def _yes_no(value: bool | None, yes: str, no: str) -> str:
    return "?" if value is None else (yes if value else no)


def _ready_cell(row: HostStatus) -> str:
    """``yes`` (every K3s node of the host Ready), ``no (<roles not ready>)``, ``?`` or ``-``."""
    if not row.nodes:
        return "-"
    not_ready = [n.role for n in row.nodes if n.ready is False]
    if not_ready:
        return "no (" + ",".join(not_ready) + ")"
    return "yes" if all(n.ready for n in row.nodes) else "?"


def _version_cell(row: HostStatus) -> str:
    versions = sorted({n.version for n in row.nodes if n.version})
    return ",".join(versions) or "-"


def _deployed_at(value: str | None) -> str:
    """``2026-12-06T07:00:00Z`` -> ``2026-12-06 07:00``."""
    return value.replace("T", " ")[:16] if value else "-"


COLUMNS = (
    "HOST", "IP", "ROLES", "PLAN", "SYSTEM", "DRIFT", "READY", "K3S", "REBOOT", "DEPLOYED (UTC)"
)


def table_rows(rows: Iterable[HostStatus]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for r in rows:
        drift = "unreachable" if r.reachable is False else _yes_no(r.drift, "DRIFT", "no")
        out.append(
            (
                r.host,
                r.ip or "-",
                ",".join(r.roles) or "-",
                r.plan,
                short_system(r.running or r.system),
                drift,
                _ready_cell(r),
                _version_cell(r),
                _yes_no(r.needs_reboot, "yes", "no") if r.needs_reboot is not None else "-",
                _deployed_at(r.deployed_at),
            )
        )
    return out


def format_table(stack: str, rows: list[HostStatus], notes: Iterable[str] = ()) -> str:
    """The table, then one line per thing that needs attention, then a summary line."""
    table = [COLUMNS, *table_rows(rows)]
    widths = [max(len(t[i]) for t in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip() for t in table]
    lines += [f"note: {n}" for n in notes]
    bad = [r for r in rows if r.attention]
    for r in bad:
        for why in r.attention:
            lines.append(f"{r.host}: {why}")
    if bad:
        lines.append(f"stack {stack}: {len(bad)} of {len(rows)} host(s) need attention")
    else:
        lines.append(f"stack {stack}: all {len(rows)} host(s) up to date")
    return "\n".join(lines) + "\n"
