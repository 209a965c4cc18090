"""Refuse a lab subnet that this machine already uses (a rehearsal must never take over
the user's real LAN).

``conflicts`` is pure: it reads the JSON of ``ip -j route show table all`` (every routing
table: WireGuard's and Tailscale's routes live outside the main one), ``ip -j rule`` (policy
rules that send a destination elsewhere) and ``ip -j addr`` (iproute2), and lists every
route, rule or address whose network overlaps the plan's subnet. A default route
(``0.0.0.0/0``) overlaps everything and is not counted; the stack's own bridge (found by its
name *and* its ``k3scluster:<stack>`` alias) is not counted either, so a second ``up`` passes.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Sequence
from typing import Any

from k3scluster.errors import K3sClusterError


def _net(dst: str) -> ipaddress.IPv4Network | None:
    if dst in ("default", ""):
        return None
    try:
        net = ipaddress.ip_network(dst, strict=False)
    except ValueError:
        return None
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen == 0:
        return None
    return net


def conflicts(
    subnet: ipaddress.IPv4Network,
    routes: Sequence[dict[str, Any]],
    addrs: Sequence[dict[str, Any]],
    own_links: Sequence[str] = (),
    rules: Sequence[dict[str, Any]] = (),
) -> list[str]:
    """What on this machine overlaps ``subnet``: ``["route 10.0.0.0/16 dev eth0", …]``."""
    found: list[str] = []
    for r in routes:
        if r.get("dev") in own_links:
            continue
        if r.get("type") not in (None, "unicast"):  # local/broadcast: covered by the addresses
            continue
        net = _net(str(r.get("dst", "")))
        if net is not None and net.overlaps(subnet):
            table = r.get("table")
            where = f" table {table}" if table not in (None, "main") else ""
            found.append(f"route {net} dev {r.get('dev', '?')}{where}")
    for rule in rules:
        dst = rule.get("dst")
        if not dst or dst == "all":
            continue
        net = _net(f"{dst}/{rule.get('dstlen', 32)}")
        if net is not None and net.overlaps(subnet):
            found.append(
                f"rule {rule.get('priority', '?')}: to {net} lookup {rule.get('table', '?')}"
            )
    for link in addrs:
        name = link.get("ifname", "?")
        if name in own_links:
            continue
        for a in link.get("addr_info", []):
            if a.get("family") != "inet":
                continue
            local = a.get("local")
            net = _net(f"{local}/{a.get('prefixlen', 32)}") if local else None
            if net is not None and net.overlaps(subnet):
                found.append(f"address {local}/{a.get('prefixlen')} on {name}")
    return found


def own_links(links: Sequence[dict[str, Any]], bridge: str, alias: str) -> list[str]:
    """The lab's own links in ``ip -j link`` output: the bridge when it has our alias, and
    every link enslaved to it."""
    ours = [
        link["ifname"] for link in links
        if link.get("ifname") == bridge and link.get("ifalias") == alias
    ]
    if ours:
        ours += [link["ifname"] for link in links if link.get("master") == bridge]
    return ours


def ip_json(*args: str) -> list[dict[str, Any]]:
    try:
        proc = subprocess.run(
            ["ip", "-j", *args], capture_output=True, text=True, check=False
        )
    except OSError as exn:
        raise K3sClusterError(
            f"cannot run `ip -j {' '.join(args)}`: {exn.strerror or exn}",
            hint="install iproute2 (Debian: apt-get install iproute2)",
        ) from None
    if proc.returncode != 0:
        raise K3sClusterError(
            f"`ip -j {' '.join(args)}` failed: {proc.stderr.strip()}",
            hint="a VM stack needs iproute2 with JSON output (ip -j)",
        )
    data = json.loads(proc.stdout or "[]")
    return data if isinstance(data, list) else []


def check_machine(
    subnet: ipaddress.IPv4Network, bridge: str, alias: str, location: str
) -> None:
    """Raise when ``subnet`` overlaps a route (any table), rule or address of this machine
    (not the lab's own)."""
    own = own_links(ip_json("link"), bridge, alias)
    found = conflicts(
        subnet,
        ip_json("route", "show", "table", "all"),
        ip_json("addr"),
        own,
        ip_json("rule"),
    )
    if found:
        raise K3sClusterError(
            f"{location}: the plan's subnet {subnet} overlaps what this machine already "
            "uses: " + "; ".join(found) + ". A VM stack puts the plan's gateway on a bridge "
            "here and would take over that network; nothing was created",
            hint="rehearse with a plan whose subnet this machine does not use (see `ip route "
            "show table all`, `ip rule`), "
            "or run the VM stack inside a network namespace",
        )
