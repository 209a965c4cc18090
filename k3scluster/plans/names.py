"""Cluster-wide rules: addresses (IPv4, in the subnet, not reserved, unique) and names (unique)."""

from __future__ import annotations

import ipaddress
import re

from k3scluster.model import Location
from k3scluster.plans.context import Context
from k3scluster.plans.files import NETWORK_YAML

LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def reserved_kind(ip: ipaddress.IPv4Address, net: ipaddress.IPv4Network) -> str:
    return "network" if ip == net.network_address else "broadcast"


class Names(Context):
    def parse_ip(self, rel: str, line: int, what: str, raw: str) -> ipaddress.IPv4Address | None:
        if not raw:
            self.error(
                "ip-invalid",
                rel,
                line,
                f"{what}: no address",
                "write an IPv4 address like 192.168.1.10",
            )
            return None
        try:
            return ipaddress.IPv4Address(raw)
        except ValueError:
            v6 = ":" in raw
            self.error(
                "ip-invalid",
                rel,
                line,
                f"{what}: {raw!r} is not an IPv4 address"
                + (" (IPv6 is not supported)" if v6 else ""),
                "write an IPv4 address like 192.168.1.10 (no leading zeros)",
            )
            return None

    def check_ip(self, rel: str, line: int, what: str, raw: str) -> ipaddress.IPv4Address | None:
        ip = self.parse_ip(rel, line, what, raw)
        if ip is None:
            return None
        net = self.subnet
        if net is not None:
            if ip not in net:
                self.error(
                    "ip-outside-subnet",
                    rel,
                    line,
                    f"{what}: {ip} is outside the subnet {net}",
                    f"use an address in {net} (gateway/netmask of {NETWORK_YAML})",
                )
                return None
            if ip in (net.network_address, net.broadcast_address):
                self.error(
                    "ip-reserved",
                    rel,
                    line,
                    f"{what}: {ip} is the {reserved_kind(ip, net)} address of {net}",
                    f"use an address between {net.network_address + 1} and "
                    f"{net.broadcast_address - 1}",
                )
                return None
        earlier = self.ips.get(ip)
        if earlier is not None:
            self.error(
                "ip-duplicate",
                rel,
                line,
                f"{what}: {ip} is already used by {earlier[0]} ({earlier[1]})",
                "give every host, K3s node and the gateway an address of its own",
            )
            return None
        self.ips[ip] = (what, Location(rel, line))
        return ip

    def check_name(self, rule: str, rel: str, line: int, what: str, name: str) -> bool:
        if not LABEL.match(name):
            kind = "a host name" if rule == "host-name" else "a K3s (Kubernetes node) name"
            self.error(
                rule,
                rel,
                line,
                f"{what} {name!r} is not valid as {kind}",
                "use 1 to 63 characters: lowercase letters, digits and '-' (not first or "
                "last), no '_' or '.'",
            )
            return False
        earlier = self.names.get(name)
        if earlier is not None:
            self.error(
                "name-duplicate",
                rel,
                line,
                f"{what} {name!r} is already used at {earlier}",
                "names must differ (ignoring case) across hosts.csv and k3s.csv",
            )
            return False
        self.names[name] = Location(rel, line)
        return True
