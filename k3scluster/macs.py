"""Stable, locally administered MAC addresses.

A VM stack gives each host's virtio NIC ``vm_mac(stack, host)``: the same on every run (it
is derived, not random, and not stored), different between stacks and hosts, locally
administered (bit 0x02 of the first octet set) and unicast (bit 0x01 clear), so it can
never be a vendor's address on the user's network. The rendered system names the NIC with
this MAC as the plan says (a systemd ``.link``: ``render.render_files(vm=…)``).

The rendered hosts take theirs from here too: the host's own macvlan ``mv-host``
(``host_macvlan_mac``), the K3s server container's macvlan (``server_mac``: systemd-nspawn
would derive one from the host's machine-id, new at every reinstall) and the K3s agent
container on its podman macvlan network (``agent_mac``). The kernel gives a new macvlan a random MAC (every boot for ``mv-host``,
every container start for the agent), which leaves stale ARP entries for the address in
the LAN; a derived one is the same every time, on any machine that renders the plans.
"""

from __future__ import annotations

import hashlib
import re

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def derived_mac(*parts: str) -> str:
    """A locally administered unicast MAC from the sha256 of ``parts``."""
    digest = hashlib.sha256("\0".join(("k3scluster-mac", *parts)).encode()).digest()
    octets = bytearray(digest[:6])
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def vm_mac(stack: str, host: str) -> str:
    """The MAC of ``host``'s NIC in the VM stack ``stack``."""
    return derived_mac("vm", stack, host)


def is_locally_administered(mac: str) -> bool:
    """True for a well-formed, locally administered, unicast MAC (lower case)."""
    if not _MAC.match(mac):
        return False
    first = int(mac[:2], 16)
    return bool(first & 0x02) and not first & 0x01


def host_macvlan_mac(host: str) -> str:
    """The MAC of the host's own macvlan ``mv-host`` (plans/hosts.csv name)."""
    return derived_mac("mv-host", host)


def agent_mac(node: str) -> str:
    """The MAC of the K3s agent container on the podman macvlan network (its K3s name)."""
    return derived_mac("k3s-agent", node)


def server_mac(node: str) -> str:
    """The MAC of the K3s server container's macvlan (its K3s name)."""
    return derived_mac("k3s-server", node)
