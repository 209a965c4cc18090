"""Read a cluster directory into a ``Cluster``, checking every rule in one pass.

``load(root)`` never raises for a user mistake: whatever is in the directory
(binary garbage, a directory where a file should be, a YAML list instead of a
mapping, ...) becomes a ``Diagnostic`` at ``FILE:LINE`` with a hint. The cluster
is returned only when there is no error; warnings do not stop it.

Every diagnostic is raised under a rule id (``RULES``): the plan-format reference
(docs/plan-format.md) documents each one and the tests hold one case per rule.

The package, by concern (each reader is a mixin over ``context.Context``, the shared
diagnostics collector plus the facts one file's checks need from another):

- ``rules``: the rule registry (id, severity, what it checks)
- ``diagnostics``: the collector (``error``/``warn``) and ``LoadResult``
- ``files``: reading files (missing, unreadable, binary, not UTF-8), the plan paths
- ``table``: CSV reading; ``hosts``: hosts.csv; ``k3s``: k3s.csv
- ``names``: cluster-wide rules: addresses (in the subnet, unique) and names (unique)
- ``network``: network.yaml; ``secrets``: secrets/; ``nixconfigs``: nixConfigs/;
  ``manifests``: manifests/
- ``loader``: the pass (``load``, ``load_or_raise``) that runs the readers in order

How to add a rule:

1. Register it in ``rules._REGISTRY``, in the group of the module that checks it:
   ``("my-rule", ERROR, "what it checks")`` (or ``WARNING``: the cluster still loads).
2. Raise it where the file is read: ``self.error("my-rule", rel, line, message, hint)``
   (or ``self.warn``), with a line (1-based; 0 for a whole file) and a hint that says
   how to fix it. ``error``/``warn`` assert the id is registered with that severity.
   A check across files goes into ``Loader.run`` (loader.py) after the readers it needs,
   or into the reader of the file it points at.
3. Add a case to tests/cases/plans/cases.py whose name starts with the rule id, and a
   row ``| `my-rule` | error | what it checks |`` to docs/plan-format.md (a test keeps
   the table, the registry and the cases in step).
"""

from __future__ import annotations

from k3scluster.model import DEFAULT_NAMESERVERS, DEFAULT_NIXOS_RELEASE
from k3scluster.plans.diagnostics import LoadResult
from k3scluster.plans.files import HOSTS_CSV, K3S_CSV, NETWORK_YAML
from k3scluster.plans.hosts import HOST_OPTIONAL, HOST_REQUIRED, HOST_RESERVED
from k3scluster.plans.k3s import K3S_REQUIRED
from k3scluster.plans.loader import load, load_or_raise
from k3scluster.plans.manifests import MANIFEST_SUFFIXES
from k3scluster.plans.network import NETWORK_OPTIONAL, NETWORK_REQUIRED
from k3scluster.plans.rules import RULES, WARNING_RULES
from k3scluster.plans.secrets import SSH_KEY_TYPES

__all__ = [
    "DEFAULT_NAMESERVERS",
    "DEFAULT_NIXOS_RELEASE",
    "HOSTS_CSV",
    "HOST_OPTIONAL",
    "HOST_REQUIRED",
    "HOST_RESERVED",
    "K3S_CSV",
    "K3S_REQUIRED",
    "MANIFEST_SUFFIXES",
    "NETWORK_OPTIONAL",
    "NETWORK_REQUIRED",
    "NETWORK_YAML",
    "RULES",
    "SSH_KEY_TYPES",
    "WARNING_RULES",
    "LoadResult",
    "load",
    "load_or_raise",
]
