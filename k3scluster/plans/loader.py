"""The one pass: every reader in order, then the ``Cluster`` when nothing is wrong."""

from __future__ import annotations

from pathlib import Path

from k3scluster.errors import Diagnostic, PlanError
from k3scluster.model import Cluster
from k3scluster.plans.diagnostics import LoadResult
from k3scluster.plans.hosts import HostsReader
from k3scluster.plans.k3s import K3sReader
from k3scluster.plans.manifests import ManifestsReader
from k3scluster.plans.network import NetworkReader
from k3scluster.plans.nixconfigs import NixConfigsReader
from k3scluster.plans.nixos import StateVersions
from k3scluster.plans.secrets import SecretsReader
from k3scluster.plans.subnet import SubnetCheck


class Loader(
    NetworkReader,
    SubnetCheck,
    HostsReader,
    K3sReader,
    SecretsReader,
    NixConfigsReader,
    ManifestsReader,
    StateVersions,
):
    def run(self) -> LoadResult:
        # the order matters: network.yaml sets the subnet the tables' addresses are checked
        # against, hosts.csv the names k3s.csv, secrets/ and nixConfigs/ are checked against
        if not self.check_root():
            return self.result(None)
        network = self.read_network()
        self.check_subnet()  # before the tables: their addresses are checked against it
        hosts, host_columns = self.read_hosts()
        self.check_state_versions(network, self.nixos_line, hosts)
        k3s, k3s_columns = self.read_k3s()
        secrets = self.read_secrets(hosts)
        nix_configs = self.read_nix_configs()
        self.check_bios_boot_disk(hosts, nix_configs)
        manifests = self.read_manifests()
        if self.has_errors or network is None:
            return self.result(None)
        cluster = Cluster(
            root=self.root.resolve(),
            hosts=tuple(hosts),
            k3s=tuple(k3s),
            network=network,
            secrets=secrets,
            nix_configs=nix_configs,
            manifests=manifests,
            host_columns=host_columns,
            k3s_columns=k3s_columns,
        )
        return self.result(cluster)


def load(root: Path) -> LoadResult:
    """Read and check the cluster directory ``root``; never raises for a user mistake."""
    return Loader(Path(root)).run()


def load_or_raise(root: Path) -> tuple[Cluster, tuple[Diagnostic, ...]]:
    """The cluster and its warnings; ``PlanError`` (carrying every diagnostic) on any error."""
    result = load(root)
    if result.cluster is None:
        raise PlanError(result.diagnostics)
    return result.cluster, result.warnings
