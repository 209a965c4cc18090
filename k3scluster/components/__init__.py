"""Pulumi components of a k3scluster (type tokens ``k3scluster:index:<Type>``).

The only package besides the program's ``__main__.py`` that imports pulumi. Names are
imported lazily so that ``python -m k3scluster.components.tasks`` (run by the steps) does
not load the Pulumi SDK.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Cluster": "cluster",
    "ClusterArgs": "cluster",
    "Settings": "settings",
    "Host": "host",
    "HostArgs": "host",
    "K3sServer": "host",
    "K3sAgent": "host",
    "K3sNodeArgs": "host",
    "Secret": "secret",
    "SecretArgs": "secret",
    "InstallerIso": "iso",
    "InstallerIsoArgs": "iso",
    "step": "steps",
}

__all__ = [
    "Cluster", "ClusterArgs", "Host", "HostArgs", "InstallerIso", "InstallerIsoArgs", "K3sAgent",
    "K3sNodeArgs", "K3sServer", "Secret", "SecretArgs", "Settings", "step",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
