"""ARP on a host whose address sits on the macvlan mv-host (issue 19, item 2), with real
kernel networking in two network namespaces each test makes and removes:

  peer ns   peer0 (10.0.100.9/24): a machine of the LAN
  host ns   nic0, the other end of the veth pair: the host's NIC, no address;
            mv-host, a bridge-mode macvlan over nic0 holding the host's address, as
            modules/base.nix sets it up; the sysctls modules/base.nix renders (read from
            the render, not restated here); and the strict reverse-path check NixOS's
            firewall installs with checkReversePath = true (networking.firewall, the
            nftables form of nixos/modules/services/networking/firewall-nftables.nix, read
            at 040b4eb6: a prerouting chain at priority mangle + 10, policy drop, that
            accepts DHCPv4 and `fib saddr . mark . iif oif exists`, the `. iif` being there
            unless checkReversePath = "loose"; the iptables form, firewall-iptables.nix's
            `-m rpfilter --validmark` in mangle PREROUTING, makes the same check).

`arping` (Debian iputils-arping) sends one broadcast request from the peer; every answer
is one line with the replying MAC.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nixeval import module_config

from k3scluster import plans
from k3scluster.render import render_to_dir

pytestmark = pytest.mark.skipif(
    not (
        os.geteuid() == 0
        and all(shutil.which(t) for t in ("ip", "arping", "nft", "ping", "sysctl"))
    ),
    reason="needs root, ip, arping (iputils-arping), nft, ping and sysctl",
)

HOST_IP, PEER_IP = "10.0.100.2", "10.0.100.9"

# NixOS's reverse-path chain with checkReversePath = true (strict), nftables form
RPFILTER = """
table inet nixos-fw {
  chain rpfilter {
    type filter hook prerouting priority mangle + 10; policy drop;
    meta nfproto ipv4 udp sport . udp dport { 68 . 67, 67 . 68 } accept
    fib saddr . mark . iif oif exists accept
  }
}
"""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
    return proc


class Lan:
    """The two namespaces; ``host(...)``/``peer(...)`` run a command in one of them."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.host_ns, self.peer_ns = f"k3sc-arp-h-{tag}", f"k3sc-arp-p-{tag}"

    def host(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.host_ns, *argv, check=check)

    def peer(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.peer_ns, *argv, check=check)

    def up(self) -> None:
        run("ip", "netns", "add", self.host_ns)
        run("ip", "netns", "add", self.peer_ns)
        h = ("ip", "-n", self.host_ns)
        run(*h, "link", "set", "lo", "up")
        run(*h, "link", "add", "nic0", "type", "veth", "peer", "name", "peer0",
            "netns", self.peer_ns)
        run(*h, "link", "set", "nic0", "up")
        run(*h, "link", "add", "mv-host", "link", "nic0", "type", "macvlan", "mode", "bridge")
        run(*h, "addr", "add", f"{HOST_IP}/24", "dev", "mv-host")
        run(*h, "link", "set", "mv-host", "up")
        p = ("ip", "-n", self.peer_ns)
        run(*p, "addr", "add", f"{PEER_IP}/24", "dev", "peer0")
        run(*p, "link", "set", "peer0", "up")
        proc = subprocess.run(
            ["ip", "netns", "exec", self.host_ns, "nft", "-f", "-"],
            input=RPFILTER, capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr

    def down(self) -> None:
        for ns in (self.host_ns, self.peer_ns):
            run("ip", "netns", "del", ns, check=False)

    def mac(self, ifname: str) -> str:
        out = self.host("cat", f"/sys/class/net/{ifname}/address").stdout
        return out.strip().upper()

    def arp_answers(self) -> list[str]:
        """The MACs that answer one broadcast ARP request for the host's address."""
        self.peer("ip", "neigh", "flush", "dev", "peer0")
        out = self.peer("arping", "-c", "1", "-I", "peer0", HOST_IP, check=False).stdout
        return re.findall(r"reply from " + re.escape(HOST_IP) + r" \[([0-9A-F:]{17})\]", out)

    def ping(self) -> bool:
        return self.peer("ping", "-c", "2", "-W", "2", HOST_IP, check=False).returncode == 0


@pytest.fixture
def lan() -> Iterator[Lan]:
    lan = Lan()
    try:
        lan.up()
        yield lan
    finally:
        lan.down()


@pytest.fixture(scope="module")
def rendered_sysctls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """boot.kernel.sysctl as modules/base.nix sets it for a host of the example."""
    src = Path(__file__).resolve().parent.parent / "examples" / "cluster"
    result = plans.load(src)
    assert result.cluster is not None
    out = tmp_path_factory.mktemp("render")
    render_to_dir(result.cluster, out)
    boot = module_config(out, "base", "olaf", ".boot")
    assert isinstance(boot, dict)
    sysctls = boot.get("kernel", {}).get("sysctl", {})
    assert isinstance(sysctls, dict)
    return sysctls


def apply(lan: Lan, sysctls: dict[str, object]) -> None:
    for key, value in sysctls.items():
        lan.host("sysctl", "-qw", f"{key}={value}")


def test_only_mv_host_answers_and_ping_passes_the_strict_reverse_path_check(
    lan: Lan, rendered_sysctls: dict[str, object]
) -> None:
    apply(lan, rendered_sysctls)
    assert lan.arp_answers() == [lan.mac("mv-host")]
    assert lan.ping()
    # the peer's own kernel resolved the address (for the ping) to mv-host as well
    neigh = lan.peer("ip", "neigh", "show", HOST_IP, "dev", "peer0").stdout
    assert lan.mac("mv-host").lower() in neigh, neigh


def test_without_the_sysctls_the_nic_answers_too_and_its_mac_is_dropped(lan: Lan) -> None:
    # the kernel's defaults (arp_ignore=0, arp_announce=0): a second answer, from the NIC
    answers = lan.arp_answers()
    assert sorted(answers) == sorted([lan.mac("nic0"), lan.mac("mv-host")])
    # a peer that kept the NIC's MAC: its packets arrive on nic0, the route back is via
    # mv-host, and the strict reverse-path check drops them
    lan.peer("ip", "neigh", "replace", HOST_IP, "lladdr", lan.mac("nic0"), "dev", "peer0")
    assert not lan.ping()
    lan.host("nft", "delete", "table", "inet", "nixos-fw")
    assert lan.ping()  # it was the reverse-path check that dropped them
