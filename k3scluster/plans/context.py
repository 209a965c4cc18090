"""What one pass over a cluster directory shares between its readers.

Each reader (``files``, ``table``, ``names``, ``network``, ``hosts``, ``k3s``, ``secrets``,
``nixconfigs``, ``manifests``) is a mixin over this ``Context``; ``loader.Loader`` combines
them and runs them in order. The facts below are what one file's checks need from another.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from k3scluster.model import Location
from k3scluster.plans.diagnostics import Diagnostics


class Context(Diagnostics):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        # every host and K3s name that passed its checks, where it was defined
        self.names: dict[str, Location] = {}
        # every address in use (gateway, hosts, K3s nodes): by whom and where
        self.ips: dict[ipaddress.IPv4Address, tuple[str, Location]] = {}
        # the subnet of network.yaml, set only when it is sound (addresses are checked against it)
        self.subnet: ipaddress.IPv4Network | None = None
        # the gateway of that subnet and the lines of network.yaml's keys
        self.gateway: ipaddress.IPv4Address | None = None
        self.network_lines: dict[str, int] = {}
        self.host_rows: set[str] = set()  # every name in hosts.csv, valid or not
        # False when a table could not be read: checks against "all names" are then skipped
        self.hosts_complete = False
        self.k3s_complete = False
        self.k3s_rows: set[str] = set()  # K3s names a nixConfigs file may be named after
        self.nixos_line = 1  # the line of network.yaml's nixos key (1 when absent)
