"""Evaluate rendered Nix files with ``nix-instantiate --eval``, without nixpkgs.

``module_config`` calls a rendered module (``modules/<name>.nix``) the way the NixOS
module system would, with ``lib`` from tests/nix/lib-stub.nix (a stand-in: nixpkgs is
not available here) and a ``config`` made of the values ``hosts/<host>.nix`` sets
(``k3scluster.host``, ``.server``, ``.agent``) plus stand-in package paths, and returns
what the module defines under ``config`` (JSON), with mkDefault/mkForce unwrapped and
mkIf resolved.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

LIB_STUB = Path(__file__).resolve().parent / "nix" / "lib-stub.nix"

# Store paths the modules interpolate, as stand-ins (nothing is built).
PODMAN = "/stand-in/podman"
GENERATE_CONFIG = "/stand-in/nixos-generate-config"
MODULES_PATH = "/stand-in/nixpkgs/nixos/modules"
K3S_VERSION = "1.35.2+k3s1"  # the stand-in K3s package's version

UNWRAP = """
  unwrap = v:
    if builtins.isAttrs v && (v._type or null) == "override" then unwrap v.content
    else if builtins.isAttrs v && (v._type or null) == "if" then
      (if v.condition then unwrap v.content else { _k3sclusterUnset = true; })
    else if builtins.isAttrs v && !(v ? outPath) then builtins.mapAttrs (n: unwrap) v
    else if builtins.isList v then map unwrap v
    else if builtins.isPath v then toString v
    else if builtins.isFunction v then "<function>"
    else v;
"""


def nix_eval(expr: str, cwd: Path | None = None) -> object:
    """Evaluate ``expr`` strictly and return it as JSON-decoded Python."""
    proc = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )
    assert proc.returncode == 0, f"nix-instantiate failed on:\n{expr}\n{proc.stderr}"
    return json.loads(proc.stdout)


def host_args() -> str:
    """The module arguments a hosts/<host>.nix may ask for."""
    return f'{{ modulesPath = "{MODULES_PATH}"; }}'


def module_expr(out: Path, module: str, host: str, podman: str = PODMAN) -> str:
    """A Nix expression (a let-binding prelude) for ``modules/<module>.nix`` on ``host``."""
    return f"""
let
  lib = import {LIB_STUB};
  hostFile = import {out}/hosts/{host}.nix {host_args()};
  config = {{
    k3scluster = hostFile.k3scluster;
    virtualisation.podman.package = "{podman}";
    system.build.nixos-generate-config = "{GENERATE_CONFIG}";
  }};
  # the cluster's K3s package (modules/k3s-release.nix reads its version only)
  k3sAttr = (hostFile.k3scluster.k3s or {{ packageAttr = "k3s_none"; }}).packageAttr;
  pkgs = {{
    ${{k3sAttr}} = {{ version = "{K3S_VERSION}"; outPath = "/stand-in/k3s"; }};
    bash = "/stand-in/bash"; curl = "/stand-in/curl"; coreutils = "/stand-in/coreutils";
    etcd = "/stand-in/etcd";
  }};
  m = import {out}/modules/{module}.nix {{ inherit config lib pkgs; }};
  {UNWRAP}
in
"""


def module_config(
    out: Path, module: str, host: str, path: str = "", podman: str = PODMAN
) -> object:
    """``config<path>`` as the module defines it, unwrapped (``path`` like ``.systemd``).

    ``podman`` stands in for ``config.virtualisation.podman.package`` (a directory with
    ``bin/podman``).
    """
    return nix_eval(module_expr(out, module, host, podman) + f"unwrap m.config{path}")


def container_config(
    out: Path, host: str, path: str = "", pkgs: str = "pkgs", merged: str = "c: c"
) -> object:
    """What the K3s server container's own ``config`` function defines, unwrapped.

    ``pkgs`` is a Nix attrset expression standing in for the container's pkgs (by
    default the host's stand-in, with the cluster's K3s package at K3S_VERSION).
    The function gets the container's ``config`` as the module system would give it: a
    stand-in made of what it defines itself (a fixed point), passed through ``merged``,
    a Nix function from that to the final config (what other modules, e.g. a
    nixConfigs file or nixpkgs' own, would add).
    """
    return nix_eval(
        module_expr(out, "k3s-server", host)
        + f"""let
    own = unwrap (m.config.containers.k3s-server.config {{
      inherit lib; pkgs = {pkgs}; config = ({merged}) own;
    }});
  in own{path}"""
    )


def rendered(cluster_dir: Path, out: Path | None = None) -> Path:
    """The cluster directory's plans rendered into ``out`` (default: its .k3scluster/render),
    the directory the functions above evaluate."""
    from k3scluster import plans
    from k3scluster.render import render_to_dir

    result = plans.load(cluster_dir)
    assert result.cluster is not None, [d.message for d in result.diagnostics]
    out = out if out is not None else cluster_dir / ".k3scluster" / "render"
    render_to_dir(result.cluster, out)
    return out
