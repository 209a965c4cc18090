"""What the K3s servers are started with beyond the defaults (issue 19, items 1 and 3).

The server container's K3s runs without an agent (services.k3s.disableAgent), so the API
server has no pod network of its own and reaches pods only through the agents' tunnels:
it needs --egress-selector-mode pod (or cluster), which K3s's default `agent` is not
(k3s-io/k3s pkg/cli/server/server.go validateNetworkConfiguration warns about exactly
this combination; pkg/daemons/control/tunnel.go watches Pods only in pod and cluster
mode; the agent's side, pkg/agent/tunnel/tunnel.go, lets a `pod` tunnel reach only the
pods of its own node).

services.k3s.extraFlags is `either str (listOf str)` in every pinned release and is
flattened into k3s.service's ExecStart (services/cluster/k3s/default.nix in 24.11 and
25.05, services/cluster/rancher/default.nix from 25.11; see tests/nixos_options.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nixeval import container_config, rendered

SERVER_HOSTS = ("olaf", "ulf", "rolf")  # the example's three servers


@pytest.fixture
def out(example_dir: Path) -> Path:
    return rendered(example_dir)


def extra_flags(out: Path, host: str) -> list[str]:
    flags = container_config(out, host, ".services.k3s.extraFlags")
    assert isinstance(flags, list)
    return [str(f) for f in flags]


def test_every_server_runs_the_pod_egress_selector(out: Path) -> None:
    for host in SERVER_HOSTS:
        flags = extra_flags(out, host)
        modes = [f for f in flags if f.startswith("--egress-selector-mode")]
        assert modes == ["--egress-selector-mode=pod"], (host, flags)


def test_the_servers_still_run_without_an_agent(out: Path) -> None:
    # the reason for the egress mode: no kubelet, no pod network in the container
    for host in SERVER_HOSTS:
        assert container_config(out, host, ".services.k3s.disableAgent") is True
