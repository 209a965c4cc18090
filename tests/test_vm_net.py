"""The lab network's steps (``python -m k3scluster.lab.ctl net-up|net-down``) for real, each
run in a network namespace of its own (``unshare -n``): bridge, gateway, NAT, the refusal of
a subnet in use and of a bridge name that is not the stack's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine import netns_available

from k3scluster.lab import ctl
from k3scluster.lab.spec import NetSpec, bridge_name, link_alias

pytestmark = [pytest.mark.vm, pytest.mark.root]
ROOT = Path(__file__).resolve().parent.parent


def _in_netns(script: str) -> subprocess.CompletedProcess[str]:
    if not netns_available():
        pytest.fail("needs root, unshare and ip (the vm tests run in CI as root)")
    return subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up\n" + script],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )


def _net(nat: bool = False) -> NetSpec:
    return NetSpec("test-vms", bridge_name("test-vms"), "10.0.100.1/24", "10.0.100.0/24", nat,
                   "plans/network.yaml:3")


def _ctl(task: str, net: NetSpec) -> str:
    spec = net.to_json().replace("'", "'\\''")
    return f"{sys.executable} -m k3scluster.lab.ctl {task} --spec '{spec}'"


def test_net_up_makes_the_bridge_with_the_gateway_and_net_down_removes_it() -> None:
    net = _net(nat=True)
    r = _in_netns(
        f"set -e\n{_ctl('net-up', net)}\n{_ctl('net-up', net)}\n"  # twice: the second is a no-op
        f"echo ---; ip -j addr show dev {net.bridge}; echo ---; ip -j -d link show dev {net.bridge}\n"
        f"echo ---; nft list table ip {ctl.nat_table('test-vms')}\n"
        f"echo ---; cat /proc/sys/net/ipv4/ip_forward\n"
        f"{_ctl('net-down', net)}\necho ---; ip -j link; echo ---; nft list tables\n"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    _, addr, link, nat, fwd, after, tables = r.stdout.split("---\n")
    inet = [(a["local"], a["prefixlen"]) for a in json.loads(addr)[0]["addr_info"]
            if a["family"] == "inet"]
    assert inet == [("10.0.100.1", 24)]
    info = json.loads(link)[0]
    assert info["ifalias"] == link_alias("test-vms")
    assert info["linkinfo"]["info_kind"] == "bridge"
    assert "10.0.100.0/24" in nat and "masquerade" in nat
    assert fwd.splitlines()[0] == "1"
    assert f"deleted bridge {net.bridge}" in fwd
    assert [x["ifname"] for x in json.loads(after)] == ["lo"]
    assert ctl.nat_table("test-vms") not in tables


def test_net_up_refuses_a_subnet_in_use_and_creates_nothing() -> None:
    net = _net()
    r = _in_netns(
        "ip link add lan0 type veth peer name lan1\nip addr add 10.0.77.5/16 dev lan0\n"
        "ip link set lan0 up\nip link set lan1 up\n"
        f"{_ctl('net-up', net)}; echo rc=$?\nip -j link\n"
    )
    _, links = r.stdout.split("rc=")
    assert links.startswith("1\n"), r.stdout + r.stderr
    assert "plans/network.yaml:3: the plan's subnet 10.0.100.0/24 overlaps" in r.stderr
    assert "route 10.0.0.0/16 dev lan0" in r.stderr
    assert "address 10.0.77.5/16 on lan0" in r.stderr
    assert net.bridge not in {x["ifname"] for x in json.loads(links.split("\n", 1)[1])}


def test_a_foreign_link_with_the_bridges_name_is_neither_taken_nor_deleted() -> None:
    net = _net()
    r = _in_netns(
        f"ip link add {net.bridge} type bridge\n"
        f"{_ctl('net-up', net)}; echo rc=$?\n{_ctl('net-down', net)}; echo rc=$?\n"
        f"ip -j link show dev {net.bridge}\n"
    )
    assert "rc=1\n" in r.stdout and "is not this stack's lab bridge" in r.stderr
    assert "rc=0\n" in r.stdout and "not this stack's bridge" in r.stdout
    assert json.loads(r.stdout.rsplit("rc=0\n", 1)[1])[0]["ifname"] == net.bridge
