"""Who joins and who leaves: the plans against what the stack last deployed. Pure.

``plan_membership(cluster, deployed)`` compares the planned hosts and K3s nodes with the
``Deployed`` record (what the stack's last deploys reached: each host's address and the
K3s nodes it ran) and says what a ``pulumi up`` must do about membership before and
around the deploys:

- **servers that leave** (row gone, host gone, moved to another host, turned into an
  agent, or given a new address: a member's peer address cannot change, so a re-addressed
  server leaves and joins again): their etcd member is removed from a healthy remaining
  server, one at a time, before any host deploys;
- **servers that join** (a new server row of a running cluster, or one of those above
  coming back): any stale member of the same name is removed before their host deploys;
- **agents that leave**: cordoned, drained, stopped, their Node and node-password secret
  deleted;
- **hosts that are re-addressed**: deployed through the address they were last deployed
  at, gated at the new one;
- **hosts that leave the plans**: their nodes leave as above; the machine is not wiped;
- **hosts that are reinstalled** (a new install disk in the plans): their nodes come back
  with empty state; the deploy removes what the cluster still holds of them.

It refuses (``K3sClusterError``) a change that removes every server of a running cluster.

The quorum rule (``removal_order``) is the one every removal is checked with at ``up``,
from the member list and health that etcd reports then: members go one at a time, each
removal is committed by a quorum of the current members and leaves a quorum of healthy
members behind; a stopped member that is still listed counts against both.

Nothing here imports pulumi or touches the network.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from k3scluster.errors import K3sClusterError
from k3scluster.model import Cluster, Host, K3sNode, K3sType

# -- what the stack recorded ------------------------------------------------------------


@dataclass(frozen=True)
class DeployedNode:
    """A K3s node as its host's last deploy ran it."""

    name: str
    type: K3sType
    ip: ipaddress.IPv4Address

    @property
    def is_server(self) -> bool:
        return self.type.is_server


@dataclass(frozen=True)
class DeployedHost:
    """A host as its last deploy left it: the address it answers at and its K3s nodes.

    ``disk`` and ``boot`` are the install identity the plans had then (hosts.csv ``disk``,
    ``boot``): a new disk serial means the machine was installed again.
    """

    name: str
    ip: ipaddress.IPv4Address
    nodes: tuple[DeployedNode, ...] = ()
    disk: str | None = None
    boot: str = "efi"

    def node(self, name: str) -> DeployedNode | None:
        return next((n for n in self.nodes if n.name == name), None)


@dataclass(frozen=True)
class Deployed:
    """Every host the stack deployed (empty for a new stack)."""

    hosts: tuple[DeployedHost, ...] = ()

    def host(self, name: str) -> DeployedHost | None:
        return next((h for h in self.hosts if h.name == name), None)

    def nodes(self) -> list[tuple[DeployedHost, DeployedNode]]:
        return [(h, n) for h in self.hosts for n in h.nodes]

    @property
    def servers(self) -> list[tuple[DeployedHost, DeployedNode]]:
        return [(h, n) for h, n in self.nodes() if n.is_server]

    @property
    def running(self) -> bool:
        """A cluster runs when at least one server was deployed."""
        return bool(self.servers)


def host_record(cluster: Cluster, host: str) -> dict[str, object]:
    """What the stack records for ``host`` when its deploy succeeds (JSON-ready).

    ``parse_record`` reads it back; the two are each other's inverse.
    """
    h = cluster.host(host)
    return {
        "name": h.name,
        "ip": str(h.ip),
        "nodes": [
            {"name": n.name, "type": n.type.value, "ip": str(n.ip)} for n in cluster.k3s_on(host)
        ],
        "disk": h.disk,
        "boot": h.boot.value,
    }


def parse_record(value: object) -> DeployedHost | None:
    """A ``host_record`` read back from the state (a JSON text or the dict); None when it is
    not one (a state written before the record existed, or damaged)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, Mapping):
        return None
    try:
        nodes = tuple(
            DeployedNode(str(n["name"]), K3sType(n["type"]), ipaddress.IPv4Address(n["ip"]))
            for n in value.get("nodes") or ()
        )
        disk = value.get("disk")
        return DeployedHost(
            name=str(value["name"]),
            ip=ipaddress.IPv4Address(value["ip"]),
            nodes=nodes,
            disk=str(disk) if disk else None,
            boot=str(value.get("boot") or "efi"),
        )
    except (KeyError, TypeError, ValueError):
        return None


def deployed_from_records(records: Iterable[object]) -> Deployed:
    """``Deployed`` from the hosts' records (unreadable ones left out), in name order."""
    hosts = {h.name: h for h in (parse_record(r) for r in records) if h is not None}
    return Deployed(tuple(hosts[n] for n in sorted(hosts)))


# -- what changes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Leaving:
    """A K3s node that leaves: where its host was last reached, and why it leaves."""

    node: str
    host: str
    host_ip: ipaddress.IPv4Address  # the address its host's last deploy reached
    ip: ipaddress.IPv4Address  # the node's own (deployed) address
    why: str
    host_leaves: bool = False


@dataclass(frozen=True)
class Joining:
    """A K3s server that joins a running cluster with no etcd data of its own."""

    node: str
    host: str
    why: str


@dataclass(frozen=True)
class Readdressed:
    host: str
    old: ipaddress.IPv4Address
    new: ipaddress.IPv4Address
    nodes: tuple[str, ...] = ()  # the host's K3s nodes in the plans


@dataclass(frozen=True)
class HostLeaving:
    host: str
    ip: ipaddress.IPv4Address
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class MembershipPlan:
    servers_leaving: tuple[Leaving, ...] = ()
    agents_leaving: tuple[Leaving, ...] = ()
    servers_joining: tuple[Joining, ...] = ()
    readdressed: tuple[Readdressed, ...] = ()
    hosts_leaving: tuple[HostLeaving, ...] = ()
    reinstalled: tuple[str, ...] = ()  # hosts whose install disk changed in the plans
    running: bool = False
    # the init-server moved to another server in this change: (from, to)
    init_moved: tuple[str, str] | None = None
    # host -> the address its deploy goes through (re-addressed hosts only)
    deploy_via: Mapping[str, ipaddress.IPv4Address] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (
            self.servers_leaving
            or self.agents_leaving
            or self.servers_joining
            or self.readdressed
            or self.hosts_leaving
            or self.reinstalled
        )

    def describe(self) -> list[str]:
        """One sentence per change, in the order ``up`` makes them (for the preview)."""
        lines: list[str] = []
        for a in self.agents_leaving:
            lines.append(
                f"{a.node} (agent on {a.host}) leaves: {a.why}; it is cordoned, drained, "
                "stopped, and its Node and node-password secret are deleted"
            )
        for s in self.servers_leaving:
            lines.append(
                f"{s.node} (server on {s.host}) leaves etcd: {s.why}; its member is removed "
                "from a healthy remaining server, then it is stopped"
            )
        for j in self.servers_joining:
            lines.append(
                f"{j.node} (server on {j.host}) joins etcd: {j.why}; a stale member of that "
                "name is removed first"
            )
        for r in self.readdressed:
            lines.append(
                f"{r.host} moves from {r.old} to {r.new}: deployed through {r.old}, "
                f"then checked at {r.new}"
            )
        for h in self.hosts_leaving:
            what = ", ".join(h.nodes) if h.nodes else "no K3s nodes"
            lines.append(
                f"{h.host} ({h.ip}) leaves the plans ({what}): the machine is NOT wiped"
            )
        for host in self.reinstalled:
            lines.append(
                f"{host} has a new install disk: its K3s nodes come back empty; what the "
                "cluster still holds of them is removed before its deploy"
            )
        if self.init_moved:
            old, new = self.init_moved
            lines.append(f"init-server: {old} -> {new} (only a new cluster starts from it)")
        return lines


def refuse_without_gates(plan: MembershipPlan) -> None:
    """``k3scluster:waitReady false`` turns off what the membership steps and the deploys'
    clean-ups need (the cluster's credentials read over ssh, etcd's health, a re-addressed
    host's deploy through its old address): a change of who is in the cluster is refused
    then, naming each change, rather than made without them or left undone. A host without
    K3s nodes that leaves the plans or moves to a new address is no such change (its step
    only asks the machine; a move reboots it through its old address over ssh alone,
    ``tasks._readdressed_deploy``). A host with K3s nodes that moves stays refused: its
    reboot would go undrained and unchecked (a server's etcd member down with no look at the
    others' health), and a VM stack's moved VM is a new install whose stale member or Node
    nothing would clean up."""
    changes = replace(
        plan,
        hosts_leaving=tuple(h for h in plan.hosts_leaving if h.nodes),
        readdressed=tuple(r for r in plan.readdressed if r.nodes),
    ).describe()
    if not changes:
        return
    raise K3sClusterError(
        "waitReady false: membership changes need the gates, and this change has "
        f"{len(changes)}: " + "; ".join(changes),
        hint="pulumi config set k3scluster:waitReady true, then `pulumi up` (set it back "
        "afterwards if you must); nothing was changed",
    )


def _kinds(roles: Iterable[object]) -> list[str]:
    """K3s roles as membership sees them: a server (init or not) or an agent."""
    return sorted("agent" if r == K3sType.AGENT.value else "server" for r in roles)


def refuse_unrecorded_changes(
    cluster: Cluster, unrecorded: Mapping[str, Mapping[str, object]], deployed: Deployed
) -> None:
    """Hosts the stack deployed whose state holds no record (``unrecorded``: host -> its
    entry of the last run's stack output ``hosts``, ``ip`` and ``roles``): deployed by a
    version that recorded nothing with ``waitReady`` false. ``plan_membership`` cannot see
    what changes for them, so a change of who is in the cluster would go unseen (a server
    row removed: a dead etcd voter). What the last outputs tell is compared instead (the
    host left the plans with K3s nodes, its address or its K3s roles changed; with no host
    recorded at all, a server added to a running cluster), and such a change is refused
    until each of those hosts has been deployed once and recorded itself."""
    changes = []
    planned = {h.name: h for h in cluster.hosts}
    for name in sorted(unrecorded):
        was = unrecorded[name]
        roles = _kinds(was.get("roles") or ())  # type: ignore[arg-type]
        host = planned.get(name)
        if host is None:
            if roles:
                changes.append(f"{name} (K3s {', '.join(roles)}) leaves the plans")
            continue
        if was.get("ip") is not None and str(was.get("ip")) != str(host.ip):
            changes.append(f"{name} moves from {was.get('ip')} to {host.ip}")
        now = _kinds(n.type.value for n in cluster.k3s_on(name))
        if now != roles:
            changes.append(f"{name}'s K3s nodes change from [{', '.join(roles)}] to "
                           f"[{', '.join(now)}]")
    had_server = any("server" in _kinds(w.get("roles") or ())  # type: ignore[arg-type]
                     for w in unrecorded.values())
    if had_server and not deployed.hosts:
        for n in cluster.k3s:
            if n.type.is_server and n.host not in unrecorded:
                changes.append(f"{n.name} (server on {n.host}) joins the running cluster")
    if not changes:
        return
    raise K3sClusterError(
        f"the state holds no record of who is in the cluster for {', '.join(sorted(unrecorded))} "
        "(deployed with waitReady false by an earlier version), and this change has "
        f"{len(changes)} that membership would have to handle: " + "; ".join(changes),
        hint="first `pulumi up` with the plans as they were last deployed (every host is "
        "deployed once and records itself; nothing restarts where its system is unchanged), "
        "then make this change (with k3scluster:waitReady true); nothing was changed",
    )


def plan_membership(cluster: Cluster, deployed: Deployed) -> MembershipPlan:
    """What ``up`` must do about membership (see the module's docstring)."""
    if not deployed.hosts:
        return MembershipPlan()
    planned_nodes = {n.name: n for n in cluster.k3s}
    planned_hosts = {h.name: h for h in cluster.hosts}

    servers_leaving: list[Leaving] = []
    agents_leaving: list[Leaving] = []
    rejoin: list[Joining] = []
    for dh, dn in deployed.nodes():
        why = _leave_reason(dh, dn, planned_hosts, planned_nodes)
        if why is None:
            continue
        leaving = Leaving(dn.name, dh.name, dh.ip, dn.ip, why, dh.name not in planned_hosts)
        (servers_leaving if dn.is_server else agents_leaving).append(leaving)
        now = planned_nodes.get(dn.name)
        if dn.is_server and now is not None and now.type.is_server:
            rejoin.append(Joining(now.name, now.host, f"it {why} and joins again"))

    deployed_servers = {n.name for _, n in deployed.servers}
    leaving_servers = {s.node for s in servers_leaving}
    staying = deployed_servers - leaving_servers
    if deployed.running and not staying:
        names = ", ".join(sorted(deployed_servers))
        raise K3sClusterError(
            f"this change removes every K3s server of the running cluster ({names}): "
            "nothing would be left to hand the cluster's data on",
            hint="keep at least one of them in plans/k3s.csv (and its host in hosts.csv) "
            "in this change; add the new servers first, `pulumi up`, then remove the old "
            "ones in a second change",
        )

    joining = list(rejoin)
    if deployed.running:
        rejoining = {j.node for j in rejoin}
        for n in cluster.k3s:
            if n.type.is_server and n.name not in deployed_servers and n.name not in rejoining:
                joining.append(Joining(n.name, n.host, "a new server of the running cluster"))

    readdressed = []
    for h in cluster.hosts:
        was = deployed.host(h.name)
        if was is not None and was.ip != h.ip:
            readdressed.append(Readdressed(h.name, was.ip, h.ip,
                                           tuple(n.name for n in cluster.k3s_on(h.name))))

    hosts_leaving = tuple(
        HostLeaving(dh.name, dh.ip, tuple(n.name for n in dh.nodes))
        for dh in deployed.hosts
        if dh.name not in planned_hosts
    )
    reinstalled = tuple(h.name for h in cluster.hosts if _new_disk(h, deployed.host(h.name)))

    init_was = next(
        (n.name for _, n in deployed.servers if n.type is K3sType.INIT_SERVER), None
    )
    init_now = cluster.init_server.name if cluster.init_server else None
    init_moved = (
        (init_was, init_now)
        if init_was and init_now and init_was != init_now
        else None
    )

    return MembershipPlan(
        servers_leaving=tuple(servers_leaving),
        agents_leaving=tuple(agents_leaving),
        servers_joining=tuple(joining),
        readdressed=tuple(readdressed),
        hosts_leaving=hosts_leaving,
        reinstalled=reinstalled,
        running=deployed.running,
        init_moved=init_moved,
        deploy_via={r.host: r.old for r in readdressed},
    )


def _new_disk(planned: Host, was: DeployedHost | None) -> bool:
    """The plans name another install disk than the last deploy's: a new machine install."""
    return bool(was and planned.disk and was.disk and planned.disk != was.disk)


def _leave_reason(
    dh: DeployedHost,
    dn: DeployedNode,
    planned_hosts: Mapping[str, Host],
    planned_nodes: Mapping[str, K3sNode],
) -> str | None:
    """Why the deployed node ``dn`` on ``dh`` leaves, or None when it stays."""
    if dh.name not in planned_hosts:
        return f"its host {dh.name} left the plans"
    now = planned_nodes.get(dn.name)
    if now is None:
        return "its row left plans/k3s.csv"
    if now.host != dh.name:
        return f"it moved from {dh.name} to {now.host}"
    if now.type.is_server != dn.is_server:
        return f"it became {'a server' if now.type.is_server else 'an agent'}"
    if dn.is_server and now.ip != dn.ip:
        return f"its address changed from {dn.ip} to {now.ip}"
    return None


# -- the quorum rule ------------------------------------------------------------------


def node_of_member(name: str) -> str:
    """The K3s node name of etcd member ``name`` (K3s names members ``<node>-<8 hex
    digits>``; its own rule: cut at the last '-'). Never a prefix test: the member
    ``srv-1-0a1b2c3d`` is node ``srv-1``'s, not ``srv``'s."""
    cut = name.rfind("-")
    return name[:cut] if cut > 1 else name


@dataclass(frozen=True)
class Member:
    """An etcd member as ``etcdctl member list`` and ``endpoint health`` report it."""

    id: int
    name: str  # K3s names members <node name>-<8 hex digits>
    healthy: bool
    peer_urls: tuple[str, ...] = ()
    client_urls: tuple[str, ...] = ()
    learner: bool = False

    @property
    def node(self) -> str:
        return node_of_member(self.name)

    @property
    def hex_id(self) -> str:
        return f"{self.id:x}"


def quorum(members: int) -> int:
    """How many members a change needs: a majority."""
    return members // 2 + 1


class QuorumError(K3sClusterError):
    """A removal that would not keep a quorum; names the unhealthy members."""

    def __init__(self, message: str, unhealthy: Sequence[str], hint: str = "") -> None:
        super().__init__(message, hint)
        self.unhealthy = tuple(unhealthy)


def members_of(members: Sequence[Member], node: str) -> list[Member]:
    """The members that belong to K3s node ``node`` (usually one; a stale one beside it)."""
    return [m for m in members if m.node == node]


def removal_order(members: Sequence[Member], leaving: Iterable[str]) -> list[Member]:
    """The members of the ``leaving`` nodes in the order they can be removed, one at a time.

    Unhealthy ones first (each such removal raises the share of healthy members), then the
    healthy ones; the whole sequence is checked (``check_removals``) before it is returned,
    so a refusal comes before anything is removed.
    """
    names = set(leaving)
    going = sorted((m for m in members if m.node in names), key=lambda m: (m.healthy, m.name))
    check_removals(members, going)
    return going


def check_removals(members: Sequence[Member], sequence: Sequence[Member]) -> None:
    """Raises ``QuorumError``, naming the unhealthy members, when removing ``sequence`` one
    at a time from ``members`` would not keep a quorum at some step: the current members
    must have a quorum of healthy ones to commit the change, and the members left must keep
    a quorum of healthy ones. Removing the last member is refused too."""
    current = list(members)
    for m in sequence:
        after = [x for x in current if x.id != m.id]
        if not after:
            raise QuorumError(
                f"removing {m.name} would leave etcd without members",
                [],
                hint="keep at least one server in plans/k3s.csv",
            )
        healthy_now = sum(1 for x in current if x.healthy)
        healthy_after = sum(1 for x in after if x.healthy)
        if healthy_now < quorum(len(current)) or healthy_after < quorum(len(after)):
            unhealthy = sorted(x.name for x in after if not x.healthy)
            if not m.healthy:
                unhealthy = sorted({*unhealthy, m.name})
            raise QuorumError(
                f"removing etcd member {m.name} would not keep a quorum: "
                f"{healthy_after} of the {len(after)} members left would be healthy "
                f"(a quorum is {quorum(len(after))}), {healthy_now} of {len(current)} "
                f"are now (it needs {quorum(len(current))}); unhealthy: "
                + (", ".join(unhealthy) or "none"),
                unhealthy,
                hint="bring the unhealthy members back (or remove them first) and run "
                "`pulumi up` again; nothing was removed",
            )
        current = after
