"""Is the subnet of network.yaml the one the plan's addresses are in?

The gateway and the netmask decide the subnet. A typo in either puts every host and K3s
address outside it: that is one mistake, so it gets one error, at the line of
network.yaml that is wrong, and the addresses are then not checked against that subnet
(after a gateway typo, against the one most of them share, so that a row of its own still
shows). Addresses of their own (typos in rows) are reported row by row as before.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from k3scluster.plans.files import HOSTS_CSV, K3S_CSV, NETWORK_YAML
from k3scluster.plans.hosts import HOST_REQUIRED, HOST_RESERVED
from k3scluster.plans.k3s import K3S_REQUIRED
from k3scluster.plans.table import Tables

# a netmask is blamed only when the gateway and every address fit a subnet this narrow:
# home networks are /24 or smaller, and addresses spread wider are more likely wrong rows
_NETMASK_BLAME_PREFIX = 24


@dataclass(frozen=True)
class Cause:
    """Which key of network.yaml is wrong, and the subnet the addresses point to."""

    key: str  # "gateway" or "netmask"
    subnet: ipaddress.IPv4Network  # where the addresses are (gateway) / what fits them (netmask)
    outside: int  # addresses outside the subnet of network.yaml
    total: int  # addresses in the plan
    sharing: int = 0  # addresses in ``subnet`` (gateway)


def subnet_cause(
    gateway: ipaddress.IPv4Address,
    net: ipaddress.IPv4Network,
    addresses: Sequence[ipaddress.IPv4Address],
) -> Cause | None:
    """The gateway or netmask when it, not the addresses, puts most addresses outside ``net``.

    The gateway, when none of two or more addresses is in its subnet and most of them share
    one subnet of the same netmask. The netmask, when it leaves two or more and most of the
    addresses outside, and a wider one (at most /24) holds the gateway and all of them.
    """
    total = len(addresses)
    outside = [a for a in addresses if a not in net]
    if len(outside) < 2 or 2 * len(outside) <= total:
        return None
    if len(outside) == total:
        shared = Counter(ipaddress.IPv4Network((a, net.prefixlen), strict=False) for a in addresses)
        subnet, sharing = shared.most_common(1)[0]
        if 2 * sharing > total:
            return Cause("gateway", subnet, len(outside), total, sharing)
    spread = 0
    for a in addresses:
        spread |= int(a) ^ int(gateway)
    prefix = 32 - spread.bit_length()
    wide = ipaddress.IPv4Network((gateway, prefix), strict=False)
    # the narrowest that fits them all and where none of them is the network/broadcast address
    used = {gateway, *addresses}
    while prefix > 1 and {wide.network_address, wide.broadcast_address} & used:
        prefix -= 1
        wide = wide.supernet()
    if prefix >= _NETMASK_BLAME_PREFIX:
        return Cause("netmask", wide, len(outside), total)
    return None


class SubnetCheck(Tables):
    def check_subnet(self) -> None:
        """One error at the gateway or netmask when it (not each address) is wrong."""
        if self.subnet is None or self.gateway is None:
            return  # no sound subnet: the addresses are not checked against one anyway
        cause = subnet_cause(self.gateway, self.subnet, self._plan_addresses())
        if cause is None:
            return
        rel, net = NETWORK_YAML, self.subnet
        if cause.key == "gateway":
            where = (
                "the hosts and K3s nodes are in"
                if cause.sharing == cause.total
                else f"{cause.sharing} of the {cause.total} host and K3s addresses are in"
            )
            self.error(
                "gateway",
                rel,
                self.network_lines["gateway"],
                f"gateway {self.gateway} is outside the subnet {cause.subnet} that {where}",
                f"write the router's address in {cause.subnet} as the gateway (with netmask "
                f"/{net.prefixlen} the gateway {self.gateway} makes the subnet {net}); if the "
                f"addresses are what is wrong, fix them in {HOSTS_CSV} and {K3S_CSV}",
            )
        else:
            self.error(
                "netmask",
                rel,
                self.network_lines.get("netmask", 1),
                f"netmask /{net.prefixlen} makes the subnet {net}, which leaves {cause.outside} "
                f"of the {cause.total} host and K3s addresses outside",
                f"the gateway and every address are in {cause.subnet}: write netmask: "
                f"{cause.subnet.prefixlen} or less (a home network is usually netmask: 24)",
            )
        # the subnet is in doubt: addresses are checked only against the one most of them
        # share (a gateway typo), so a row of its own still shows; or not at all (the netmask)
        self.subnet = cause.subnet if cause.key == "gateway" else None

    def _plan_addresses(self) -> list[ipaddress.IPv4Address]:
        """The addresses of hosts.csv and k3s.csv, read quietly (their mistakes come later)."""
        quiet = Tables(self.root)
        found = []
        for rel, required, reserved in (
            (HOSTS_CSV, HOST_REQUIRED, HOST_RESERVED),
            (K3S_CSV, K3S_REQUIRED, None),
        ):
            text = quiet.read_text(rel, required=False)
            table = None if text is None else quiet.read_table(rel, text, required, reserved)
            for _, values, _ in table.rows if table else ():
                try:
                    found.append(ipaddress.IPv4Address(values["ip"]))
                except ValueError:
                    pass  # reported when the table is read
        return found
