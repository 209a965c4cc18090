"""system.stateVersion: the release a host was first installed with, recorded in the plans.

network.yaml ``stateVersion:`` sets it for every host, a hosts.csv ``stateVersion`` column
for one host; a plan without either keeps ``DEFAULT_STATE_VERSION`` (what every plan
rendered before it was recorded). It never follows ``nixos:``: NixOS keeps state formats
of the first install by it (databases, home directories), and changing it does not migrate
anything.
"""

from __future__ import annotations

import re

from k3scluster.model import DEFAULT_STATE_VERSION, Host, Network
from k3scluster.plans.diagnostics import Diagnostics
from k3scluster.plans.files import NETWORK_YAML

# the key and column, as read (network.yaml keys and CSV headers are lowercased)
STATE_VERSION = "stateversion"
_RELEASE = re.compile(r"^[0-9]{2}\.(05|11)$")


def check_state_version(diag: Diagnostics, rel: str, line: int, value: str, where: str) -> bool:
    """True when ``value`` is a NixOS release; reports ``state-version`` otherwise."""
    if _RELEASE.match(value):
        return True
    diag.error(
        "state-version",
        rel,
        line,
        f"{where} {value!r} is not a NixOS release",
        "write the release the host was first installed with, like "
        f'stateVersion: "{DEFAULT_STATE_VERSION}" (quoted in network.yaml)',
    )
    return False


class StateVersions(Diagnostics):
    def check_state_versions(
        self, network: Network | None, nixos_line: int, hosts: list[Host]
    ) -> None:
        """Warn when hosts fall back to the default stateVersion of another release."""
        if network is None or network.state_version is not None:
            return
        if network.nixos_release == DEFAULT_STATE_VERSION:
            return
        defaulted = [h.name for h in hosts if h.state_version is None]
        if not defaulted:
            return
        self.warn(
            "state-version-missing",
            NETWORK_YAML,
            nixos_line,
            f"nixos is {network.nixos_release} but no stateVersion is recorded: "
            f"{', '.join(defaulted)} keep system.stateVersion {DEFAULT_STATE_VERSION}",
            "write stateVersion: with the NixOS release the hosts were first installed with "
            f'next to nixos: ("{DEFAULT_STATE_VERSION}" if an earlier k3scluster installed '
            "them with its default); never change it afterwards",
        )
