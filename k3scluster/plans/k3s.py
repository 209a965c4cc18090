"""k3s.csv: the K3s nodes (host, name, type, ip): one init-server, servers and agents."""

from __future__ import annotations

from dataclasses import dataclass, field

from k3scluster.model import K3sNode, K3sType, Location
from k3scluster.plans.files import HOSTS_CSV, K3S_CSV
from k3scluster.plans.names import Names
from k3scluster.plans.table import Table, Tables

K3S_REQUIRED = ("host", "name", "type", "ip")


@dataclass
class _Tally:
    """What the rows so far hold: the cluster-wide K3s rules are checked against it."""

    slots: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    inits: list[int] = field(default_factory=list)
    servers: int = 0
    agents: int = 0
    first_agent: int = 0


class K3sReader(Tables, Names):
    def read_k3s(self) -> tuple[list[K3sNode], tuple[str, ...]]:
        rel = K3S_CSV
        text = self.read_text(rel, required=False)
        if text is None:
            self.k3s_complete = not (self.root / rel).exists()
            return [], ()
        table = self.read_table(rel, text, K3S_REQUIRED)
        if table is None or not self._check_host_column(rel, table):
            return [], ()
        self.k3s_complete = True
        # nixConfigs/<name>.nix is used for servers; agents run in podman, not NixOS
        agent_names = {v["name"] for _, v, _ in table.rows if v["type"] == "agent"}
        self.k3s_rows.update(n for n in table.names if n not in agent_names)
        nodes: list[K3sNode] = []
        tally = _Tally()
        for line, v, columns in table.rows:
            node = self._k3s_row(rel, line, v, columns, tally)
            if node is not None:
                nodes.append(node)
        if table.rows:
            self._check_roles(rel, table, tally)
        return nodes, table.header

    def _check_host_column(self, rel: str, table: Table) -> bool:
        """False (one error at the header) when host and name are swapped in the header: no row's
        host is a host, but every row's name is (else every row would fail twice: an unknown
        host, and a K3s name that is a host's)."""
        rows = [v for _, v, _ in table.rows]
        hosts = self.host_rows
        if not self.hosts_complete or len(rows) < 2:
            return True
        if any(v["host"] in hosts for v in rows) or not all(v["name"] in hosts for v in rows):
            return True
        self.error(
            "csv-header",
            rel,
            table.header_line,
            f"column 'host' names no host of {HOSTS_CSV}, but column 'name' names one in every row",
            "swap host and name in the header: host is the machine of hosts.csv, name the K3s "
            "node's own name",
        )
        return False

    def _k3s_row(
        self,
        rel: str,
        line: int,
        v: dict[str, str],
        columns: tuple[tuple[str, str], ...],
        tally: _Tally,
    ) -> K3sNode | None:
        """The node of one row; None when any of its checks fails (reported)."""
        ok = self.check_name("k3s-name", rel, line, "K3s node", v["name"])
        host = v["host"]
        if self.hosts_complete and host not in self.host_rows:
            ok = False
            self.error(
                "k3s-host-unknown",
                rel,
                line,
                f"host {host!r} is not in {HOSTS_CSV}",
                f"add the host to {HOSTS_CSV} or fix the name",
            )
        ktype: K3sType | None
        try:
            ktype = K3sType(v["type"])
        except ValueError:
            ktype = None
            ok = False
            self.error(
                "k3s-type",
                rel,
                line,
                f"unknown type {v['type']!r}",
                "write init-server (exactly one), server or agent",
            )
        if ktype is not None and not self._count_role(rel, line, v, ktype, tally):
            ok = False
        ip = self.check_ip(rel, line, f"K3s node {v['name']}", v["ip"])
        if not ok or ip is None or ktype is None:
            return None
        return K3sNode(
            host=host,
            name=v["name"],
            type=ktype,
            ip=ip,
            columns=columns,
            location=Location(rel, line),
        )

    def _count_role(
        self, rel: str, line: int, v: dict[str, str], ktype: K3sType, tally: _Tally
    ) -> bool:
        """Count the row's role; False when its host already has one of that role."""
        host = v["host"]
        role = "agent" if ktype is K3sType.AGENT else "server"
        if role == "agent":
            tally.agents += 1
            tally.first_agent = tally.first_agent or line
        else:
            tally.servers += 1
        if ktype is K3sType.INIT_SERVER:
            tally.inits.append(line)
            if len(tally.inits) > 1:
                self.error(
                    "k3s-init-server",
                    rel,
                    line,
                    f"a second init-server (the first is at {rel}:{tally.inits[0]})",
                    "keep one init-server; make the others server",
                )
        earlier = tally.slots.get((host, role))
        if earlier is not None:
            self.error(
                "k3s-host-slot",
                rel,
                line,
                f"host {host!r} already has a K3s {role} ({earlier[0]} at {rel}:{earlier[1]})",
                "a host runs at most one server and one agent",
            )
            return False
        tally.slots[(host, role)] = (v["name"], line)
        return True

    def _check_roles(self, rel: str, table: Table, tally: _Tally) -> None:
        """The rules over all rows: one init-server, servers for agents, agents, quorum."""
        servers, agents = tally.servers, tally.agents
        if not tally.inits:
            self.error(
                "k3s-init-server",
                rel,
                table.header_line,
                "no init-server",
                "make exactly one row type init-server: the server that starts the cluster",
            )
        if agents and not servers:
            self.error(
                "k3s-no-server",
                rel,
                tally.first_agent,
                "agents but no server",
                "add an init-server row: agents join a server",
            )
        if servers and not agents:
            self.warn(
                "k3s-no-agent",
                rel,
                table.header_line,
                "servers but no agent: nothing can run pods (the servers run no kubelet)",
                "add an agent row (type agent) on one or more hosts",
            )
        if servers and servers % 2 == 0:
            self.warn(
                "k3s-server-count",
                rel,
                table.header_line,
                f"{servers} servers: an even number adds no fault tolerance to etcd"
                + (" (with 2, its quorum is both: a deploy or reboot that restarts either "
                   "server stops the Kubernetes API until it is back)" if servers == 2 else ""),
                "use 1, 3 or 5 servers (init-server counts)",
            )
