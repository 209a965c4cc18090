"""Per-host installer image: the ISO's NixOS configuration and the ``system-setup`` script.

``render_installer`` returns the files of ``installers/<host>/`` in the render output:

- ``installer.json``: the plan values the image needs (host, boot mode, disk serial, the
  udev rule that links the disk for GRUB, k3scluster.bootdisk), read
  by the Nix files with ``builtins.fromJSON`` so no plan string is spliced into Nix;
- ``default.nix``: builds the ISO. It evaluates the host from ``../../hive.nix`` the way
  colmena evaluates a node (same pinned nixpkgs, ``defaults``, ``specialArgs``; colmena's
  ``deployment`` options accepted and ignored), for the host's platform. The installed system
  is the host's configuration without colmena's own modules (key upload units, key ownership,
  colmena's assertions), so not the very toplevel colmena deploys: the first deploy replaces it;
- ``iso.nix``: the installer module (installation-cd-minimal + the host's system in the
  image's store + ``system_setup.service``; no sshd, no network, no password);
- ``system-setup.sh``: the script the service runs (partition, mount, nixos-install, poweroff).

Nothing here imports pulumi and nothing here reads a secret.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shlex
from collections.abc import Mapping
from pathlib import Path

import jinja2

from .bootdisk import boot_disk_rules
from .errors import K3sClusterError
from .model import Cluster
from .pins import NIXPKGS_SYSTEM

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "installer"

#: files of one host's installer, relative to ``installers/<host>/``
INSTALLER_FILES = ("installer.json", "default.nix", "iso.nix", "system-setup.sh")
#: the last line of system-setup.sh on the console: an install is over only with OK_MARKER
#: (a QEMU killed mid-install never printed it); FAILED_MARKER after a failure or refusal
OK_MARKER = "k3scluster-install: OK"
FAILED_MARKER = "k3scluster-install: FAILED"


@functools.cache  # one Environment per process: it caches the compiled templates
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        # bash's ${#array[@]} must not open a Jinja comment
        comment_start_string="{##",
        comment_end_string="##}",
    )
    env.filters["shell"] = lambda v: shlex.quote(str(v))
    return env


def installer_dir(host: str) -> str:
    """The installer's directory in the render output, relative to it."""
    return f"installers/{host}"


def render_installer(
    cluster: Cluster, host: str, out: Path, *, vm: bool = False
) -> dict[str, str]:
    """The installer files of ``host``: ``installers/<host>/<file>`` (relative to ``out``) -> text.

    ``out`` is the render output directory; the files expect ``hive.nix`` at its top.
    ``vm`` (VM stacks): the image powers off after a failure too (``powerOffOnFailure``).
    """
    del out  # the files refer to the hive relatively (../../hive.nix)
    try:
        h = cluster.host(host)
    except KeyError:
        raise K3sClusterError(
            f"no host {host!r} in plans/hosts.csv",
            hint="hosts: " + ", ".join(x.name for x in cluster.hosts),
        ) from None
    serial = h.disk or ""
    rules = boot_disk_rules(h)
    data = {
        "host": h.name,
        "boot": h.boot.value,
        "serial": serial,
        "udevRules": "\n".join(rules) + "\n" if rules else "",
        **({"powerOffOnFailure": True} if vm else {}),
    }
    env = _env()
    ctx = {
        "host": h.name,
        "boot": h.boot.value,
        "serial": serial,
        "system": NIXPKGS_SYSTEM,
        "ok_marker": OK_MARKER,
        "failed_marker": FAILED_MARKER,
    }
    base = installer_dir(h.name)
    return {
        f"{base}/installer.json": json.dumps(data, indent=2, sort_keys=True) + "\n",
        f"{base}/default.nix": env.get_template("default.nix.j2").render(ctx),
        f"{base}/iso.nix": env.get_template("iso.nix.j2").render(ctx),
        f"{base}/system-setup.sh": env.get_template("system-setup.sh.j2").render(ctx),
    }


def iso_out_link(render_dir: Path, host: str) -> Path:
    """Where the build's result link goes: beside the render output, so a re-render keeps it.

    ``<cluster>/.k3scluster/render`` -> ``<cluster>/.k3scluster/render-iso/<host>``.
    """
    render_dir = Path(render_dir)
    return render_dir.parent / f"{render_dir.name}-iso" / host


def iso_build_argv(nix: str, render_dir: Path, host: str) -> list[str]:
    """argv that builds the host's installer ISO with the pinned (non-flake) nixpkgs.

    The result link is ``iso_out_link(render_dir, host)``; the image is the one
    ``*.iso`` under its ``iso/`` directory (``find_iso``). Works with Nix >= 2.4.
    """
    return [
        nix,
        "--extra-experimental-features",
        "nix-command",
        "build",
        "--file",
        str(Path(render_dir) / installer_dir(host)),
        "--out-link",
        str(iso_out_link(render_dir, host)),
        "--print-build-logs",
    ]


def find_iso(result: Path) -> Path:
    """The ISO file in a build result (``<result>/iso/*.iso``)."""
    isos = sorted(Path(result).glob("iso/*.iso"))
    if len(isos) != 1:
        raise K3sClusterError(
            f"expected one ISO image under {result}/iso, found {len(isos)}",
            hint="build the installer again, or pass the image with --image",
        )
    return isos[0]


def file_digests(files: Mapping[str, str]) -> dict[str, str]:
    """sha256 of every rendered file, computed once for all hosts (see installer_inputs)."""
    return {rel: hashlib.sha256(text.encode()).hexdigest() for rel, text in files.items()}


def installer_inputs(
    files: Mapping[str, str], host: str, digests: Mapping[str, str] | None = None
) -> dict[str, str]:
    """sha256 of every rendered file the host's installer image depends on.

    ``files`` is the render output (relative path -> text). The image depends on the
    whole hive (any node may read ``nodes``) and on its own installer files, not on the
    other hosts' installers. Files outside the render output that the hive imports
    (``nixConfigs/*.nix``) are the caller's to add. ``digests`` (``file_digests(files)``)
    spares hashing every file again for each host.
    """
    if digests is None:
        digests = file_digests(files)
    own = installer_dir(host) + "/"
    result: dict[str, str] = {}
    for rel in sorted(files):
        if rel.startswith("installers/") and not rel.startswith(own):
            continue
        result[rel] = digests[rel]
    missing = [f for f in INSTALLER_FILES if own + f not in result]
    if missing:
        raise K3sClusterError(
            f"the render output has no installer for {host!r} (missing {', '.join(missing)})",
            hint="render the cluster again (k3scluster render)",
        )
    return result
