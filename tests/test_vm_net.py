"""The lab network's steps (``python -m k3scluster.lab.ctl net-up|net-down``) for real, each
run in a network namespace of its own (``unshare -n``): bridge, gateway, NAT, the refusal of
a subnet in use and of a bridge name that is not the stack's."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from engine import netns_available

from k3scluster.lab import network
from k3scluster.lab.spec import NetSpec, VmSpec, bridge_name, link_alias

pytestmark = [pytest.mark.vm, pytest.mark.root]
ROOT = Path(__file__).resolve().parent.parent


def _in_netns(script: str) -> subprocess.CompletedProcess[str]:
    if not netns_available():
        pytest.fail("needs root, unshare and ip (the vm tests run in CI as root)")
    return subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up\n" + script],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )


def _net(nat: bool = False, lab_dir: Path | None = None, gateway: str = "10.0.100.1/24") -> NetSpec:
    subnet = str(ipaddress.IPv4Interface(gateway).network)
    return NetSpec("test-vms", bridge_name("test-vms"), gateway, subnet, nat,
                   "plans/network.yaml:3", str(lab_dir or ""))


def _ctl(task: str, net: NetSpec) -> str:
    spec = net.to_json().replace("'", "'\\''")
    return f"{sys.executable} -m k3scluster.lab.ctl {task} --spec '{spec}'"


def test_net_up_makes_the_bridge_with_the_gateway_and_net_down_removes_it(
    tmp_path: Path,
) -> None:
    net = _net(nat=True, lab_dir=tmp_path / "lab")
    r = _in_netns(
        "echo 0 > /proc/sys/net/ipv4/ip_forward\n"
        f"set -e\n{_ctl('net-up', net)}\n{_ctl('net-up', net)}\n"  # twice: the second is a no-op
        f"echo ---; ip -j addr show dev {net.bridge}; echo ---; ip -j -d link show dev {net.bridge}\n"
        f"echo ---; nft list table ip {network.nat_table('test-vms')}\n"
        f"echo ---; cat /proc/sys/net/ipv4/ip_forward\n"
        f"{_ctl('net-down', net)}\necho ---; ip -j link; echo ---; nft list tables\n"
        "cat /proc/sys/net/ipv4/ip_forward\n"
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
    assert f"deleted bridge {net.bridge}" in r.stderr
    assert [x["ifname"] for x in json.loads(after)] == ["lo"]
    assert network.nat_table("test-vms") not in tables
    # IP forwarding is back as net-up found it, and the lab's record is gone
    assert "IP forwarding back to 0" in r.stderr
    assert tables.rstrip().splitlines()[-1] == "0"
    assert not (tmp_path / "lab" / "network.json").exists()
    assert (tmp_path / "lab").stat().st_mode & 0o777 == 0o700


def test_forwarding_stays_on_while_another_labs_nat_needs_it(tmp_path: Path) -> None:
    """Two VM stacks with NAT on one machine: the second finds forwarding on (the first
    turned it on). The first one's net-down must not turn it off under the second's VMs,
    and the last one's puts back what the first found."""
    a = _net(nat=True, lab_dir=tmp_path / "a")
    b = NetSpec("test-vms-2", bridge_name("test-vms-2"), "10.0.101.1/24", "10.0.101.0/24",
                True, "plans/network.yaml:3", str(tmp_path / "b"))
    fwd = "echo ---; cat /proc/sys/net/ipv4/ip_forward\n"
    r = _in_netns(
        "echo 0 > /proc/sys/net/ipv4/ip_forward\n"
        f"set -e\n{_ctl('net-up', a)}\n{_ctl('net-up', b)}\n{fwd}"
        f"{_ctl('net-down', a)}\n{fwd}echo ---; nft list tables\n"
        f"{_ctl('net-down', b)}\n{fwd}"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    _, both, after_a, tables, after_b = r.stdout.split("---\n")
    assert both.strip() == "1"
    assert after_a.strip() == "1", r.stderr  # b's VMs still reach out
    assert network.nat_table("test-vms-2") in tables
    assert network.nat_table("test-vms") not in tables
    assert after_b.strip() == "0", r.stderr  # as the first net-up found it


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
    assert "rc=1\n" in r.stdout and "is not this lab's bridge" in r.stderr
    assert "it is no k3scluster lab's link; nothing was changed" in r.stderr
    assert "rc=0\n" in r.stdout and "no k3scluster lab's link; not deleted" in r.stderr
    assert json.loads(r.stdout.rsplit("rc=0\n", 1)[1])[0]["ifname"] == net.bridge


def test_net_up_puts_the_stacks_taps_back_into_a_new_bridge(tmp_path: Path) -> None:
    """Another gateway (or a bridge deleted by a reboot) makes the bridge again; net-up
    puts every tap of the stack (by its alias) into it, and no other link; a NAT change
    keeps the bridge."""
    net = _net(lab_dir=tmp_path / "lab")
    moved = _net(lab_dir=tmp_path / "lab", gateway="10.0.101.1/24")
    r = _in_netns(
        f"set -e\n{_ctl('net-up', net)}\n"
        "ip tuntap add dev k3t-olaf mode tap; ip link set dev k3t-olaf alias k3scluster:test-vms:olaf\n"
        "ip tuntap add dev k3t-other mode tap; ip link set dev k3t-other alias k3scluster:other:x\n"
        f"ip link set dev k3t-olaf master {net.bridge}\n"
        f"{_ctl('net-down', net)}\n{_ctl('net-up', moved)}\n"
        f"echo ---; ip -j link; echo ---; ip -j addr show dev {net.bridge}\n"
        f"echo ---; ip link delete {net.bridge}\n{_ctl('net-up', _net(True, tmp_path / 'lab'))}\n"
        "ip -j link show dev k3t-olaf\n"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    _, links, addrs, rest = r.stdout.split("---\n")
    master = {x["ifname"]: x.get("master") for x in json.loads(links)}
    assert master["k3t-olaf"] == net.bridge and master["k3t-other"] is None
    inet = [a["local"] for a in json.loads(addrs)[0]["addr_info"] if a["family"] == "inet"]
    assert inet == ["10.0.101.1"]
    assert f"tap k3t-olaf back in {net.bridge}" in r.stderr
    assert json.loads(rest)[0]["master"] == net.bridge


def test_the_overlap_check_reads_every_routing_table_and_the_rules() -> None:
    """WireGuard and Tailscale keep their routes in tables of their own and steer to them
    with policy rules: a subnet there is in use, too."""
    net = _net()
    r = _in_netns(
        "ip link add wg0 type veth peer name wg1; ip link set wg0 up; ip link set wg1 up\n"
        "ip route add 10.0.0.0/16 dev wg0 table 52\n"
        "ip rule add to 10.0.100.0/25 lookup 52 priority 5270\n"
        f"{_ctl('net-up', net)}; echo rc=$?\n"
    )
    assert "rc=1" in r.stdout, r.stdout + r.stderr
    assert "route 10.0.0.0/16 dev wg0 table 52" in r.stderr
    assert "rule 5270: to 10.0.100.0/25 lookup 52" in r.stderr


def test_without_root_the_lab_says_what_it_needs(example_dir: Path) -> None:
    """`sudo -E pulumi up`, then `pulumi destroy` without sudo: each step says what it
    needs (no traceback) and changes nothing."""
    import shutil
    import tempfile

    from k3scluster.lab import machine
    from k3scluster.lab import spec as lab
    from k3scluster.plans import load_or_raise

    cluster, _ = load_or_raise(example_dir)
    base = Path(tempfile.mkdtemp(prefix="k3scluster-noroot-"))  # others may look in
    base.chmod(0o755)
    try:
        vs = lab.VmSettings(stack="test-vms", lab_dir=base / "test-vms-lab")
        vm = lab.vm_specs(cluster, vs, {h.name: "/iso" for h in cluster.hosts})[0]
        machine.claim(vm)  # root's, 0700
        net = _net(lab_dir=vs.lab_dir)
        nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups"
        vm_json = vm.to_json().replace("'", "'\\''")
        r = _in_netns(
            f"{_ctl('net-up', net)}\n"
            f"{nobody} {_ctl('net-down', net)}; echo rc=$?\n"
            f"{nobody} {sys.executable} -m k3scluster.lab.ctl vm-delete --spec '{vm_json}';"
            " echo rc=$?\n"
            f"ip -j link show dev {net.bridge}\n"
        )
        assert r.stdout.count("rc=1") == 2, r.stdout + r.stderr
        assert r.stderr.count("need root or CAP_NET_ADMIN") == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert json.loads(r.stdout.rsplit("rc=1\n", 1)[1])[0]["ifname"] == net.bridge
        assert machine.read_manifest(vm.path) is not None  # nothing deleted
    finally:
        shutil.rmtree(base)


def _tap_script(vm: VmSpec, action: str) -> str:
    """``network.ensure_tap`` / ``delete_tap`` of ``vm`` in the test's namespace (what
    ``vm-up`` / ``vm-delete`` run around QEMU)."""
    code = (f"from k3scluster.lab import network; from k3scluster.lab.spec import VmSpec; "
            f"network.{action}(VmSpec.from_json({vm.to_json()!r}))")
    return f"{sys.executable} -c {shlex.quote(code)}"


def test_two_labs_of_stacks_with_the_same_name_coexist(example_dir: Path, tmp_path: Path) -> None:
    """Two cluster directories (or Pulumi projects) with a stack ``test-vms`` each: their
    labs have ids of their own, so neither adopts the other's bridge or taps, and the
    destroy of one (net-down, the taps deleted) leaves the other's bridge, gateway, taps
    and NAT as they were. A lab whose bridge name another lab's bridge has is refused,
    naming that lab, and deletes nothing."""
    from k3scluster.lab import spec as lab
    from k3scluster.plans import load_or_raise

    cluster, _ = load_or_raise(example_dir)
    first = lab.VmSettings(stack="test-vms", lab_dir=tmp_path / "a" / "test-vms-lab",
                           lab_id=lab.new_lab_id())
    second = lab.VmSettings(stack="test-vms", lab_dir=tmp_path / "b" / "test-vms-lab",
                            lab_id=lab.new_lab_id(), nat=True)
    net_a = lab.net_spec(cluster, first)
    # the second cluster's plan has a subnet of its own (two labs cannot share one)
    net_b = dataclasses.replace(lab.net_spec(cluster, second), gateway="10.0.101.1/24",
                                subnet="10.0.101.0/24")
    vm_a = lab.vm_specs(cluster, first, {h.name: "/iso" for h in cluster.hosts})[0]
    vm_b = lab.vm_specs(cluster, second, {h.name: "/iso" for h in cluster.hosts})[0]
    assert vm_a.host == vm_b.host
    assert net_a.bridge != net_b.bridge and vm_a.tap != vm_b.tap and vm_a.name != vm_b.name
    # a third lab whose bridge would have the first one's name
    clash = dataclasses.replace(net_b, bridge=net_a.bridge, lab_dir=str(tmp_path / "c"),
                                lab_id=lab.new_lab_id(), gateway="10.0.102.1/24",
                                subnet="10.0.102.0/24")
    show = "echo ---; ip -j -d link; echo ---; ip -j addr; echo ---; nft list tables\n"
    r = _in_netns(
        f"set -e\n{_ctl('net-up', net_a)}\n{_tap_script(vm_a, 'ensure_tap')}\n"
        f"{_ctl('net-up', net_b)}\n{_tap_script(vm_b, 'ensure_tap')}\n"
        f"{_ctl('net-up', net_a)}\n{_ctl('net-up', net_b)}\n"  # each up again: its own only
        f"{show}"
        f"echo ---; set +e; {_ctl('net-up', clash)}; echo rc=$?; {_ctl('net-down', clash)}; echo rc=$?\n"
        f"set -e\n{_tap_script(vm_a, 'delete_tap')}\n{_ctl('net-down', net_a)}\n{show}"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    _, links, addrs, tables, rcs, links_after, addrs_after, tables_after = r.stdout.split("---\n")

    def state(links_json: str, addrs_json: str) -> dict[str, tuple[Any, ...]]:
        inet = {
            x["ifname"]: [f"{a['local']}/{a['prefixlen']}" for a in x["addr_info"]
                          if a["family"] == "inet"]
            for x in json.loads(addrs_json)
        }
        return {x["ifname"]: (x.get("ifalias"), x.get("master"), inet.get(x["ifname"]))
                for x in json.loads(links_json)}

    both = state(links, addrs)
    assert both[net_a.bridge] == (net_a.alias, None, ["10.0.100.1/24"])
    assert both[net_b.bridge] == (net_b.alias, None, ["10.0.101.1/24"])
    assert both[vm_a.tap][:2] == (vm_a.tap_alias, net_a.bridge)
    assert both[vm_b.tap][:2] == (vm_b.tap_alias, net_b.bridge)
    assert network.nat_table(net_b.owner) in tables
    # the clash: refused, naming the owner; its net-down deletes nothing of the first lab
    assert rcs.splitlines()[0] == "rc=1" and rcs.splitlines()[-1] == "rc=0", r.stderr
    assert f"a link named {net_a.bridge} exists and is not this lab's bridge" in r.stderr
    assert f"it belongs to lab {net_a.owner!r}; nothing was changed" in r.stderr
    assert "not deleted" in r.stderr
    # the first lab destroyed: the second's bridge, gateway, tap and NAT as they were
    after = state(links_after, addrs_after)
    assert net_a.bridge not in after and vm_a.tap not in after
    assert after[net_b.bridge] == both[net_b.bridge]
    assert after[vm_b.tap][:2] == (vm_b.tap_alias, net_b.bridge)
    assert network.nat_table(net_b.owner) in tables_after


def test_a_failed_net_up_leaves_no_bridge(tmp_path: Path) -> None:
    """net-up fails after it made the bridge (here nft refuses the NAT table): the bridge it
    made is deleted, so nothing is left that the state does not know (the next up would
    find the subnet in use on it), and IP forwarding, which it turned on for the NAT, is
    back as it found it (the machine routes nothing for a lab that does not exist)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nft").write_text("#!/bin/sh\necho 'nft: refused (test)' >&2\nexit 1\n")
    (fake / "nft").chmod(0o755)
    net = _net(nat=True, lab_dir=tmp_path / "lab")
    r = _in_netns(
        "echo 0 > /proc/sys/net/ipv4/ip_forward\n"
        f"PATH={fake}:$PATH {_ctl('net-up', net)}; echo rc=$?\n"
        "cat /proc/sys/net/ipv4/ip_forward\nip -j link\n"
    )
    rc, fwd, links = r.stdout.split("\n", 2)
    assert rc == "rc=1", r.stdout + r.stderr
    assert "nft could not add the lab's NAT" in r.stderr
    assert [x["ifname"] for x in json.loads(links)] == ["lo"]
    assert fwd == "0", r.stderr


def test_a_lab_directory_keeps_the_network_record_of_its_own_lab(tmp_path: Path) -> None:
    """Two labs of stack ``test-vms`` (two Pulumi projects or backends on one cluster
    directory) share a lab directory: the second's net-up is refused, naming the first lab,
    before it makes anything, and its net-down (its destroy) neither deletes nor rewrites
    the first's ``network.json``, which the first needs to make its bridge again after a
    reboot and to put IP forwarding back."""
    lab_dir = tmp_path / "lab"
    first = dataclasses.replace(_net(nat=True, lab_dir=lab_dir), lab_id="0123abcd",
                                bridge=bridge_name("test-vms", "0123abcd"))
    second = dataclasses.replace(first, lab_id="4567cdef", bridge=bridge_name("test-vms", "4567cdef"),
                                 gateway="10.0.101.1/24", subnet="10.0.101.0/24")
    r = _in_netns(
        "echo 0 > /proc/sys/net/ipv4/ip_forward\n"
        f"set -e\n{_ctl('net-up', first)}\ncp {lab_dir}/network.json {tmp_path}/before.json\n"
        f"set +e\n{_ctl('net-up', second)}; echo rc=$?\n{_ctl('net-down', second)}; echo rc=$?\n"
        "ip -j link\n"
    )
    up, down, links = r.stdout.split("\n", 2)
    assert (up, down) == ("rc=1", "rc=0"), r.stdout + r.stderr
    assert f"records the network of lab {first.owner!r}, not of {second.owner!r}" in r.stderr
    assert second.bridge not in {x["ifname"] for x in json.loads(links)}
    assert (lab_dir / "network.json").read_text() == (tmp_path / "before.json").read_text()
    assert network.recorded_net(lab_dir) == first


def test_two_net_ups_at_once_make_one_bridge_and_both_succeed(tmp_path: Path) -> None:
    """Two processes make the lab's bridge again at once after this machine restarted
    (``vms --start`` of two VMs, or one beside a ``pulumi up``): one waits for the other, so
    neither fails on what the other made, and neither deletes the bridge the other uses as
    one it made itself (net-up's failure path). ``ip addr add`` is made slow here (a
    stand-in that sleeps, then runs the real ``ip``), so both are inside net-up together.
    No lock file is left in the lab directory."""
    import shutil

    fake = tmp_path / "bin"
    fake.mkdir()
    real = shutil.which("ip")
    (fake / "ip").write_text(
        f'#!/bin/sh\nif [ "$1" = addr ] && [ "$2" = add ]; then sleep 1; fi\nexec {real} "$@"\n'
    )
    (fake / "ip").chmod(0o755)
    net = _net(lab_dir=tmp_path / "lab")
    r = _in_netns(
        f"{_ctl('net-up', net)} >/dev/null 2>&1\nip link delete {net.bridge}\n"  # a restart
        f"export PATH={fake}:$PATH\n{_ctl('net-up', net)} & first=$!\n"
        f"{_ctl('net-up', net)}; echo rc=$?\nwait $first; echo rc=$?\n"
        f"ip -j addr show dev {net.bridge}\n"
    )
    one, other, addr = r.stdout.split("\n", 2)
    assert (one, other) == ("rc=0", "rc=0"), r.stdout + r.stderr
    inet = [(a["local"], a["prefixlen"]) for a in json.loads(addr)[0]["addr_info"]
            if a["family"] == "inet"]
    assert inet == [("10.0.100.1", 24)]
    assert sorted(p.name for p in (tmp_path / "lab").iterdir()) == ["network.json"]


def test_a_tap_of_the_vms_name_that_another_lab_owns_is_neither_taken_nor_deleted(
    example_dir: Path, tmp_path: Path
) -> None:
    """A tap named as this lab's VM's tap but with another lab's alias (a hash clash, or a
    stale tap of a lab made elsewhere): ensure_tap (vm-up, vm-start) refuses it naming that
    lab, and delete_tap (vm-delete, a failed vm-up's clean-up) keeps it and says so."""
    from k3scluster.lab import spec as lab
    from k3scluster.plans import load_or_raise

    cluster, _ = load_or_raise(example_dir)
    vs = lab.VmSettings(stack="test-vms", lab_dir=tmp_path / "lab", lab_id="0123abcd")
    vm = lab.vm_specs(cluster, vs, {h.name: "/iso" for h in cluster.hosts})[0]
    other = lab.link_alias("test-vms", vm.host, "4567cdef")
    r = _in_netns(
        f"ip tuntap add dev {vm.tap} mode tap\nip link set dev {vm.tap} alias {other}\n"
        f"{_ctl('net-up', lab.net_spec(cluster, vs))} >/dev/null 2>&1\n"
        f"{_tap_script(vm, 'ensure_tap')}; echo rc=$?\n"
        f"{_tap_script(vm, 'delete_tap')}; echo rc=$?\nip -j -d link show dev {vm.tap}\n"
    )
    up, down, link = r.stdout.split("\n", 2)
    assert (up, down) == ("rc=1", "rc=0"), r.stdout + r.stderr
    assert f"a link named {vm.tap} exists and is not {vm.host}'s tap of this lab" in r.stderr
    assert f"it belongs to lab 'test-vms@4567cdef:{vm.host}'" in r.stderr
    assert f"{vm.tap} is not {vm.host}'s tap of this lab" in r.stderr and "not deleted" in r.stderr
    found = json.loads(link)[0]
    assert found["ifalias"] == other and "master" not in found
