"""The order of a ``pulumi up``: the cluster, what the stack deployed and the settings, in
ordered phases. Pure: no pulumi, no network.

``plan_update(cluster, deployed, settings)`` returns an ``UpdatePlan``: phases in the order
they run. Each phase is one ``Action`` on some hosts, all of them at once, and says which
earlier phases it waits for (``Phase.after``: indices; by default the one just before for
``Wait.OK``, every one before for ``Wait.SETTLED``) and how (``Wait``):

- ``Wait.OK``: it starts when those phases succeeded; a failure there stops it (the server
  hosts: never restart the next etcd member after one that failed its gate);
- ``Wait.SETTLED``: it starts when those phases have finished, succeeded or not (with
  ``pulumi up --continue-on-error`` the other hosts go on after a failed server host).

Today's phases:

0. ``SNAPSHOT`` (``UpdateSettings.snapshot``, when a server host of the plans was deployed
   before: the cluster runs): an etcd snapshot on a server the stack deployed, at the address
   it was deployed at (``snapshot_servers``), before any server host. Its
   step runs only when a server host's deploy will (its inputs are theirs), and a failed
   snapshot stops every server host;
0. then membership (``leave_phases``, from ``k3scluster.membership``): ``AGENT_LEAVES`` for each
   agent that leaves, then ``SERVER_LEAVES`` for each server that leaves etcd, then
   ``HOST_LEAVES`` for each host with K3s nodes that left the plans, one at a time
   (``Wait.OK``): nothing deploys before they are done; a server that joins a running
   cluster has ``SERVER_JOINS`` right before its host's phase below;
1. each server host alone, the init-server's host first, each after the one before
   (``Wait.OK``): etcd keeps its quorum, never two members restart together. During a K3s
   minor upgrade (``versions``: what the hosts' last deploys ran) a server host that also
   carries an agent on the older release gets ``DEPLOY_SERVER_FIRST``: its server moves,
   its agent keeps the release it runs; otherwise ``DEPLOY``;
2. ``DEPLOY`` the hosts with an agent that are left (agent-only hosts, and the server hosts
   that kept their agent back), at most ``UpdateSettings.max_unavailable`` at a time
   (``k3scluster:maxUnavailable``), each batch after the one before (``Wait.OK``: a failed
   agent host stops the rolling; with ``UpdateSettings.reboot_auto`` one host at a time,
   since a deploy may reboot its host). The first batch waits for the server hosts with
   ``Wait.SETTLED``, except during a K3s minor upgrade: then with ``Wait.OK`` on the last
   server host, so no agent moves to the new release unless every server runs it
   (Kubernetes' version skew policy: no kubelet newer than any API server);
3. ``DEPLOY`` the hosts without a K3s agent that are left (no K3s at all), together, after
   the server hosts (``Wait.SETTLED``), alongside the agent batches.

Every deploy of a host with an agent drains it first when the deploy would restart it
(``drain_node``; the deploy step decides with colmena's dry activation, see tasks.py).

``components/cluster.py`` builds one set of steps per phase and reads as this list.

Adding a phase (for example "leave etcd" or "drain and delete an agent" before the deploys,
"clean a stale member" before a server host's deploy):

1. add an ``Action`` member, named for what it does;
2. emit the ``Phase`` at its place in ``plan_update`` (or in a helper it calls), with the
   hosts it concerns and its ``Wait``; anything it needs to know goes into ``Phase.detail``
   as plain values, decided here from the cluster, ``deployed`` and ``settings``;
3. give ``components/cluster.py`` a builder for the action (``Cluster._builders``): it gets
   the phase and what to wait for and returns the resources it made, which the next phase
   waits for;
4. add table cases to ``tests/test_update_plan.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from k3scluster.errors import K3sClusterError
from k3scluster.membership import Deployed, MembershipPlan, plan_membership
from k3scluster.model import Cluster, K3sType


class Action(enum.Enum):
    """What a phase does to each of its hosts."""

    DEPLOY = "deploy"  # colmena apply for the host, then its health gates
    # the same with the host's agent kept at the K3s release it runs (detail "agent-k3s")
    DEPLOY_SERVER_FIRST = "deploy-server-first"
    # membership (k3scluster/membership.py), before the deploys: one node per phase
    AGENT_LEAVES = "agent-leaves"  # cordon, drain, stop, delete its Node and node password
    SERVER_LEAVES = "server-leaves"  # remove its etcd member (quorum rule), stop it
    HOST_LEAVES = "host-leaves"  # its K3s token set aside: its K3s containers stay stopped
    # in the server chain, right before the host's deploy
    SERVER_JOINS = "server-joins"  # a stale member of its name removed, old data set aside
    # an etcd snapshot on the first of the hosts that takes it (k3scluster.snapshot)
    SNAPSHOT = "snapshot"


class Wait(enum.Enum):
    """How a phase waits for the ones before it (see the module docstring)."""

    OK = "ok"
    SETTLED = "settled"


@dataclass(frozen=True)
class Phase:
    action: Action
    hosts: tuple[str, ...]
    wait: Wait
    label: str  # for people: "server host olaf", "the other hosts"
    detail: tuple[tuple[str, str], ...] = ()  # what the action needs, as plain values
    # the indices of the phases it waits for; None: the one before (OK), all before (SETTLED)
    after: tuple[int, ...] | None = None

    def waits_for(self, index: int) -> tuple[int, ...]:
        """The indices of the phases this one (at ``index``) waits for."""
        if self.after is not None:
            return self.after
        return (index - 1,) if self.wait is Wait.OK and index else tuple(range(index))


@dataclass(frozen=True)
class UpdateSettings:
    """The part of the stack's settings the order depends on."""

    max_unavailable: int = 1  # agent hosts deployed at once (k3scluster:maxUnavailable)
    snapshot: bool = True  # an etcd snapshot before the servers change (snapshotBeforeServers)
    # k3scluster:reboot auto: a deploy may reboot its host, so the agent hosts move one at a
    # time whatever max_unavailable says (two rebooting agent hosts are two nodes down)
    reboot_auto: bool = False

    @property
    def agents_at_once(self) -> int:
        """How many agent hosts one batch holds."""
        return 1 if self.reboot_auto else self.max_unavailable


@dataclass(frozen=True)
class HostVersions:
    """A host the stack deployed, and the K3s minor releases its last deploys ran (None: no
    such node, or not recorded: a deploy by a k3scluster that did not record them).
    ``unknown``: the host may have run K3s, but its state tells no release (``records``)."""

    server: str | None = None
    agent: str | None = None
    unknown: bool = False


def minor_key(minor: str) -> tuple[int, ...]:
    """``1.35`` -> ``(1, 35)``, for ordering minor releases."""
    return tuple(int(x) for x in minor.split("."))


def older(a: str | None, b: str) -> bool:
    """``a`` is a known minor release older than ``b``."""
    return a is not None and minor_key(a) < minor_key(b)


@dataclass(frozen=True)
class UpdatePlan:
    phases: tuple[Phase, ...] = field(default=())
    # who joins and who leaves (its ``describe()`` is what the preview says in words)
    membership: MembershipPlan = field(default_factory=MembershipPlan)
    # what the preview says about the order beyond the phases (one line each)
    notes: tuple[str, ...] = ()

    def hosts_of(self, action: Action) -> list[str]:
        """Every host a phase of ``action`` concerns, in phase order."""
        return [h for p in self.phases if p.action is action for h in p.hosts]

    def describe(self) -> list[str]:
        """One line per phase, in order (for people and tests)."""
        return [f"{p.action.value} {', '.join(p.hosts)} ({p.label})" for p in self.phases]

    def held_agents(self) -> dict[str, str]:
        """host -> the K3s minor its agent keeps while the servers move (DEPLOY_SERVER_FIRST)."""
        return {
            p.hosts[0]: dict(p.detail)["agent-k3s"]
            for p in self.phases
            if p.action is Action.DEPLOY_SERVER_FIRST
        }


def server_chain(cluster: Cluster) -> list[str]:
    """The hosts that carry a K3s server: the init-server's host first, then hosts.csv order."""
    init = cluster.init_server
    chain = [init.host] if init else []
    chain += [
        h.name
        for h in cluster.hosts
        if h.name not in chain and cluster.server_on(h.name) is not None
    ]
    return chain


def between(a: str, b: str) -> list[str]:
    """The minor releases strictly between ``a`` and ``b`` (same major): 1.33, 1.36 -> 1.34, 1.35."""
    (ma, na), (_, nb) = minor_key(a)[:2], minor_key(b)[:2]
    lo, hi = sorted((na, nb))
    return [f"{ma}.{n}" for n in range(lo + 1, hi)]


def check_k3s_step(cluster: Cluster, versions: Mapping[str, HostVersions]) -> None:
    """Refuse a K3s change of more than one minor release, or back to an older one.

    ``versions``: what the hosts' last deploys ran; the oldest of them is where the cluster
    is (a half-done upgrade counts by its agents). Kubernetes and K3s support an upgrade by one
    minor release at a time, and no downgrade."""
    target = cluster.network.k3s
    where = f"{cluster.network.location.file}"
    chosen = (
        f'k3s: "{target}"'
        if cluster.network.k3s_minor
        else f'no k3s:, so NixOS {cluster.network.nixos_release}\'s default K3s {target}'
    )
    check_unrecorded(cluster, versions, chosen)
    ran = [m for v in versions.values() for m in (v.server, v.agent) if m]
    if not ran:
        return
    oldest = min(ran, key=minor_key)
    newest = max(ran, key=minor_key)
    if minor_key(newest) > minor_key(target):
        raise K3sClusterError(
            f"{where}: {chosen} would move K3s back from {newest} to {target}; K3s has no "
            "downgrade (its datastore may already hold the newer release's data)",
            hint=f'set k3s: "{newest}" in {where}',
        )
    skipped = between(oldest, target)
    if minor_key(target) > minor_key(oldest) and skipped:
        steps = " -> ".join([oldest, *skipped, target])
        raise K3sClusterError(
            f"{where}: {chosen} would move K3s from {oldest} to {target}, past "
            f"{', '.join(skipped)}; Kubernetes supports one minor release at a time",
            hint=f'go {steps}: set k3s: "{skipped[0]}" in {where}, `pulumi up`, then the next'
            + ("" if cluster.network.k3s_minor else
               " (a plan without k3s: takes its NixOS release's default; write k3s: to keep it)"),
        )


def check_unrecorded(cluster: Cluster, versions: Mapping[str, HostVersions], chosen: str) -> None:
    """Refuse a plan without ``k3s:`` over deployed hosts whose K3s release the state does not
    tell (deployed before k3scluster recorded it, or the records were lost): the release
    would then follow the NixOS default, and its step cannot be checked. With ``k3s:`` the
    user names the release; a new stack (nothing deployed) has nothing to check."""
    unknown = sorted(h for h, v in versions.items() if v.unknown)
    if not unknown or cluster.network.k3s_minor or not cluster.k3s:
        return
    where = f"{cluster.network.location.file}"
    raise K3sClusterError(
        f"{where}: {chosen}, but this stack's state records no K3s release for "
        f"{', '.join(unknown)} (deployed before k3scluster recorded it, or the records were "
        "lost), so the change of the K3s minor release cannot be checked (Kubernetes supports "
        "one minor release at a time)",
        hint=f'write the minor release the cluster runs now in {where}: k3s: "1.N" (kubectl '
        "get nodes shows it: VERSION v1.N.x+k3s1); `pulumi up`, then move one minor at a time",
    )


def unrecorded_warning(cluster: Cluster, versions: Mapping[str, HostVersions]) -> str | None:
    """With ``k3s:`` written over deployed hosts whose K3s release the state does not tell
    (``check_unrecorded`` lets it pass): that the step from what they run is not checked."""
    unknown = sorted(h for h, v in versions.items() if v.unknown)
    if not unknown or not cluster.network.k3s_minor or not cluster.k3s:
        return None
    where = f"{cluster.network.location.file}"
    return (
        f'{where}: k3s: "{cluster.network.k3s}" is taken as given for {", ".join(unknown)}: this '
        "stack's state records no K3s release for them, so the step from what they run is not "
        "checked; make sure it is at most one minor release ahead (kubectl get nodes), never "
        "behind. Their next deploy records it."
    )


def plan_update(
    cluster: Cluster,
    deployed: Deployed,
    settings: UpdateSettings | None = None,
    versions: Mapping[str, HostVersions] | None = None,
) -> UpdatePlan:
    """The phases of a ``pulumi up`` of ``cluster`` over what ``deployed`` records and the
    K3s releases the hosts' last deploys ran (``versions``, host -> ``HostVersions``)."""
    membership = plan_membership(cluster, deployed)  # refuses removing every server
    settings = settings or UpdateSettings()
    versions = versions or {}
    check_k3s_step(cluster, versions)
    target = cluster.network.k3s
    chain = server_chain(cluster)
    upgrading = any(older(v.server, target) for v in versions.values())
    phases: list[Phase] = []
    running = membership.running or any(h in versions for h in chain)
    if settings.snapshot and running:
        phases.append(
            Phase(
                Action.SNAPSHOT, tuple(chain), Wait.OK, "etcd snapshot before the servers change",
                (("servers", snapshot_servers(cluster, deployed, versions, chain)),),
            )
        )
    phases += leave_phases(cluster, deployed, membership)
    joins = {j.host: j for j in membership.servers_joining}
    held: list[str] = []
    for h in chain:
        if h in joins:
            phases.append(join_phase(cluster, deployed, membership, joins[h].node))
        agent_k3s = versions.get(h, HostVersions()).agent
        if cluster.agent_on(h) is not None and older(agent_k3s, target):
            assert agent_k3s is not None
            held.append(h)
            phases.append(
                Phase(
                    Action.DEPLOY_SERVER_FIRST,
                    (h,),
                    Wait.OK,
                    f"server host {h}: its server to K3s {target}, its agent kept at "
                    f"{agent_k3s} until every server runs {target}",
                    (("agent-k3s", agent_k3s),),
                )
            )
        else:
            phases.append(Phase(Action.DEPLOY, (h,), Wait.OK, f"server host {h}"))
    servers = tuple(range(len(phases)))
    rest = [h.name for h in cluster.hosts if h.name not in chain or h.name in held]
    agents = [h for h in rest if cluster.agent_on(h) is not None]
    n = settings.agents_at_once
    notes = []
    if settings.reboot_auto and agents:
        notes.append(
            "k3scluster:reboot auto: the hosts with an agent move one at a time"
            + (f" (k3scluster:maxUnavailable {settings.max_unavailable} is not used)"
               if settings.max_unavailable > 1 else "")
            + "; a host whose kernel, initrd or kernel parameters changed is drained, "
            "rebooted and checked by its gates before the next one starts"
        )
    batches = [tuple(agents[i : i + n]) for i in range(0, len(agents), n)]
    strict = (upgrading or bool(held)) and bool(servers)
    after, wait = (servers[-1:], Wait.OK) if strict else (servers, Wait.SETTLED)
    for k, batch in enumerate(batches, 1):
        label = f"agent hosts {k} of {len(batches)}, at most {n} at a time"
        if settings.reboot_auto:
            label += " (k3scluster:reboot auto)"
        if strict:
            label += f", after every server runs K3s {target}"
        phases.append(Phase(Action.DEPLOY, batch, wait, label, after=after))
        after, wait = (len(phases) - 1,), Wait.OK
    # alongside the agent batches, not after them: they wait for the server hosts only
    others = tuple(h for h in rest if cluster.agent_on(h) is None)
    if others:
        phases.append(
            Phase(Action.DEPLOY, others, Wait.SETTLED, "the hosts without an agent", after=servers)
        )
    return UpdatePlan(tuple(phases), membership, tuple(notes))


def snapshot_servers(
    cluster: Cluster, deployed: Deployed, versions: Mapping[str, HostVersions], chain: list[str]
) -> str:
    """Where the snapshot may be taken, ``host=ip,…``: the servers the stack deployed, at the
    address their host's last deploy reached (a re-addressed host is still there: the
    snapshot comes before any deploy), the deploy order first. Never a server that joins in
    this run (it has no etcd data yet) or a host at an address it has not been deployed at.
    A server host deployed before the deploys recorded their hosts (no record, but a deploy
    step): at its plan address. The snapshot task asks each machine's host name first."""
    found: dict[str, str] = {h.name: str(h.ip) for h, _ in deployed.servers}
    for h in chain:
        if h not in found and deployed.host(h) is None and h in versions:
            found[h] = str(cluster.host(h).ip)
    order = [h for h in chain if h in found] + sorted(h for h in found if h not in chain)
    return ",".join(f"{h}={found[h]}" for h in order)


def what_may_happen(
    cluster: Cluster,
    plan: UpdatePlan,
    changing: Collection[str],
    deployed_before: Collection[str],
    gates: bool,
    reboot_auto: bool = False,
) -> list[str]:
    """What the preview says besides the steps, in words, at most one line per host (and one
    for the snapshot), where the program can know it: ``changing``, the hosts whose system
    differs from what their last deploy installed (their deploy runs). A changing host with
    an agent that ran before (``deployed_before``; gates on) may be drained; with
    ``reboot_auto`` (``k3scluster:reboot auto``, gates on) a changing host may be rebooted
    (whether its kernel, initrd or kernel parameters change is known only on the host, after
    the switch; a host that moves to a new address reboots anyway); a server host that
    changes takes the etcd snapshot first (when the plan has that phase)."""
    lines = []
    snap = next((p for p in plan.phases if p.action is Action.SNAPSHOT), None)
    if snap is not None and any(h in changing for h in snap.hosts):
        on = [x.partition("=")[0] for x in dict(snap.detail)["servers"].split(",") if x]
        lines.append(
            f"etcd snapshot first, on the first of {', '.join(on)} that takes it, before any "
            "server host changes"
        )
    lines += _two_members_warning(plan, changing, deployed_before, server_chain(cluster))
    moving = {r.host for r in plan.membership.readdressed}
    for h in cluster.hosts:
        if not gates or h.name not in changing:
            continue
        node = drain_node(cluster, h.name)
        said = []
        if node is not None and h.name in deployed_before:
            why = (
                ": it reboots into its new address" if h.name in moving
                else " if the switch restarts its agent"
            )
            said.append(f"drain possible ({node} is drained first{why})")
        if reboot_auto and h.name not in moving:
            said.append(
                "reboot possible (k3scluster:reboot auto: when its kernel, initrd or kernel "
                "parameters change, it is " + ("drained, " if node is not None else "")
                + "rebooted and checked by its gates again)"
            )
        if said:
            lines.append(f"{h.name}: " + "; ".join(said))
    return lines


def _two_members_warning(
    plan: UpdatePlan, changing: Collection[str], deployed_before: Collection[str],
    chain: Sequence[str],
) -> list[str]:
    """With two etcd members while the server hosts deploy, etcd's quorum is both: a deploy
    that restarts either one stops the Kubernetes API until it is back, in any order. The
    members then are the planned servers but those that join in this ``up`` (they join after
    their host's deploy; the servers that leave are gone before the deploys). Said whenever a
    server host that runs (``deployed_before``), and whose server does not join now, changes
    (``chain``: the server hosts in deploy order), gates or not."""
    joining = {j.host for j in plan.membership.servers_joining}
    if len(chain) - len(joining) != 2:
        return []
    hosts = [h for h in chain if h in changing and h in deployed_before and h not in joining]
    if not hosts:
        return []
    return [
        f"etcd has 2 members, and its quorum is both: while {', then '.join(hosts)} "
        + ("restarts its K3s server" if len(hosts) == 1 else "restart their K3s servers")
        + " (when the switch restarts one), etcd has no quorum and the Kubernetes API stops "
        "until it is back; no order avoids that with 2 servers (plan 3 to keep the API up "
        "through a deploy)"
    ]


def no_snapshot_warning(
    cluster: Cluster, changing: Collection[str], deployed_before: Collection[str]
) -> str | None:
    """With ``k3scluster:snapshotBeforeServers`` true but ``waitReady`` false the plan has no
    ``SNAPSHOT`` phase (it goes over ssh as the gates do): the warning that the server hosts
    the stack deployed before, which change now (``changing``), change without one."""
    hosts = [h for h in server_chain(cluster) if h in changing and h in deployed_before]
    if not hosts:
        return None
    return (
        f"no etcd snapshot is taken before {', '.join(hosts)} change: k3scluster:waitReady is "
        "false, and the snapshot goes over ssh as the gates do. Take one by hand first (ssh "
        "root@<server host> nixos-container run k3s-server -- k3s etcd-snapshot save), or "
        "pulumi config set k3scluster:waitReady true; pulumi config set "
        "k3scluster:snapshotBeforeServers false says no snapshot is wanted"
    )


def drain_node(cluster: Cluster, host: str) -> str | None:
    """The K3s agent a deploy of ``host`` drains first (when the deploy would restart it)."""
    agent = cluster.agent_on(host)
    return agent.name if agent is not None else None


def _staying_servers(deployed: Deployed, membership: MembershipPlan) -> list[tuple[str, str]]:
    """(host address as last deployed, server address) of the deployed servers that stay,
    the init-server first: the servers the membership steps talk to."""
    leaving = {s.node for s in membership.servers_leaving}
    staying = [(h, n) for h, n in deployed.servers if n.name not in leaving]
    staying.sort(key=lambda hn: (hn[1].type is not K3sType.INIT_SERVER, hn[0].name))
    return [(str(h.ip), str(n.ip)) for h, n in staying]


def _via(cluster: Cluster, deployed: Deployed, membership: MembershipPlan) -> str:
    """The staying servers' host addresses: as last deployed, then as planned (a host
    re-addressed earlier in this run answers at its new one)."""
    out: list[str] = []
    for host_ip, _ in _staying_servers(deployed, membership):
        out.append(host_ip)
    for h, n in deployed.servers:
        if n.name in {s.node for s in membership.servers_leaving}:
            continue
        planned = next((x for x in cluster.hosts if x.name == h.name), None)
        if planned is not None:
            out.append(str(planned.ip))
    return ",".join(dict.fromkeys(out))


def leave_phases(
    cluster: Cluster, deployed: Deployed, membership: MembershipPlan
) -> list[Phase]:
    """One phase per node that leaves, before any deploy: the agents first (the cluster is
    whole while they drain), then the servers one at a time, then each host that left the
    plans (its token set aside once its nodes are gone)."""
    staying = _staying_servers(deployed, membership)
    api = f"https://{staying[0][1]}:6443" if staying else ""
    creds = staying[0][0] if staying else ""
    phases = []
    for a in membership.agents_leaving:
        phases.append(Phase(
            Action.AGENT_LEAVES, (a.host,), Wait.OK, f"{a.node} leaves the cluster",
            (("node", a.node), ("host_ip", str(a.host_ip)), ("why", a.why), ("api", api),
             ("credentials_from", creds)),
        ))
    leaving = ",".join(s.node for s in membership.servers_leaving)
    via = _via(cluster, deployed, membership)
    for s in membership.servers_leaving:
        phases.append(Phase(
            Action.SERVER_LEAVES, (s.host,), Wait.OK, f"{s.node} leaves etcd",
            (("node", s.node), ("host_ip", str(s.host_ip)), ("why", s.why),
             ("leaving", leaving), ("via", via)),
        ))
    for h in membership.hosts_leaving:
        if h.nodes:
            phases.append(Phase(
                Action.HOST_LEAVES, (h.host,), Wait.OK, f"{h.host} leaves the plans",
                (("host_ip", str(h.ip)), ("nodes", ",".join(h.nodes))),
            ))
    return phases


def join_phase(
    cluster: Cluster, deployed: Deployed, membership: MembershipPlan, node: str
) -> Phase:
    """Right before the host of a server that joins a running cluster deploys."""
    n = next(x for x in cluster.k3s if x.name == node)
    host_ip = membership.deploy_via.get(n.host) or cluster.host(n.host).ip
    return Phase(
        Action.SERVER_JOINS, (n.host,), Wait.OK, f"{node} joins etcd",
        (("node", node), ("host_ip", str(host_ip)),
         ("via", _via(cluster, deployed, membership))),
    )
