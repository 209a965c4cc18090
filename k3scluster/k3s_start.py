"""The start-time decisions of K3s: a server restarts its etcd member, joins, or inits; an
agent registers with the first server that answers.

``hosts/<init>.nix`` used to set ``clusterInit = true`` for good, so a reinstalled (or
disk-swapped) init-server bootstrapped a second one-member cluster beside the running
one. Now no server has --cluster-init or --server in its unit: the script rendered here
(``modules/k3s-server-start.sh``) runs before every start of k3s.service in the server
container and writes the environment file k3s.service reads (K3S_URL or
K3S_CLUSTER_INIT, pkg/cli/cmds/server.go of k3s-io/k3s). ``modules/k3s-server.nix``
passes it this server's role and the other servers' addresses.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from k3scluster.model import Cluster, K3sNode, K3sType

SCRIPT_TEMPLATE = "k3s-server-start.sh.j2"
SCRIPT_PATH = "modules/k3s-server-start.sh"
# where k3s.service finds the decision (a tmpfs: decided again after every boot)
ENV_FILE = "/run/k3scluster/k3s-start.env"
# K3s's own test for "etcd has been brought up here" (pkg/etcd/etcd.go IsInitialized:
# walDir = <data-dir>/server/db/etcd/member/wal)
ETCD_WAL_DIR = "/var/lib/rancher/k3s/server/db/etcd/member/wal"

# How long a K3s node's start may wait for a server that answers: the server container's
# timeoutStartSec (a joining server waits inside it) and the agent's own wait
# (k3s-agent-start.sh). After it the start fails, and so does a deploy waiting for it;
# systemd starts the unit again (Restart=).
START_TIMEOUT_MIN = 10

# the probe of each other server; how often it is repeated before the init-server starts
# a new cluster or a joining server gives up (rounds; systemd then starts it again), and
# for how long an agent asks (start_timeout, seconds)
SCRIPT_VALUES: Mapping[str, int] = {
    "port": 6443,
    "connect_timeout": 3,
    "max_time": 5,
    "rounds": 3,
    "pause": 5,
    "start_timeout": START_TIMEOUT_MIN * 60,
}


def sh_value(v: object) -> str:
    """A template value as one shell word (the Jinja2 filter ``sh``)."""
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise TypeError(f"no shell form for {type(v).__name__}: {v!r}")
    return shlex.quote(str(v))


# The agent's choice (modules/k3s-agent-start.sh, run before each start of its container):
# the first server that answers, written as K3S_URL for `podman run --env-file`
AGENT_SCRIPT_TEMPLATE = "k3s-agent-start.sh.j2"
AGENT_SCRIPT_PATH = "modules/k3s-agent-start.sh"
AGENT_ENV_FILE = "/run/k3scluster/k3s-agent.env"
# The servers it asks, one address a line (the init-server first), as /etc/<this>: a file
# the unit names, not arguments in it, so that a changed server list changes no unit and a
# switch neither restarts nor drains the agent for it (it learns the servers from the
# cluster once joined; its next start reads the new list).
AGENT_SERVERS_ETC = "k3scluster/k3s-agent-servers"

# The /cacerts probe and the env file's handling, included by both scripts above
PROBE_TEMPLATE = "k3s-probe.sh.j2"


# Removes the links of manifests that left the plans (modules/k3s-manifests-prune.sh)
PRUNE_TEMPLATE = "k3s-manifests-prune.sh.j2"
PRUNE_PATH = "modules/k3s-manifests-prune.sh"
# where services.k3s.manifests links the manifests (nixpkgs' k3s module)
MANIFEST_DIR = "/var/lib/rancher/k3s/server/manifests"


def server_order(cluster: Cluster) -> list[K3sNode]:
    """The K3s servers in the order everything asks them: the planned init-server first,
    then plan order (the agents' registration, a joining server, the gates, the kubeconfig)."""
    return sorted(cluster.servers, key=lambda n: n.type is not K3sType.INIT_SERVER)


def registration_servers(cluster: Cluster) -> list[str]:
    """The addresses an agent asks, in ``server_order``."""
    return [str(n.ip) for n in server_order(cluster)]


def other_servers(cluster: Cluster, server: K3sNode) -> list[str]:
    """The addresses the server asks: the other servers, in ``server_order``."""
    return [str(n.ip) for n in server_order(cluster) if n.name != server.name]
