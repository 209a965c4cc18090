"""Which nixpkgs commit each NixOS release builds from.

Kept apart from rendering so that checking the plans (k3scluster.plans) can tell
that a release has no pin without importing the renderer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The system meta.nixpkgs is imported for. colmena evaluates every node with
# `inherit (npkgs) system` (colmena src/nix/hive/eval.nix), so this is each host's
# default platform; a host's own nixpkgs.hostPlatform takes precedence over it.
NIXPKGS_SYSTEM = "x86_64-linux"

_REV = re.compile(r"^[0-9a-f]{40}$")
# builtins.fetchTarball's sha256: nix32 (52 chars) or SRI (sha256-<base64>)
_SHA256 = re.compile(r"^([0-9abcdfghijklmnpqrsvwxyz]{52}|sha256-[A-Za-z0-9+/]{43}=)$")


def is_commit(rev: str) -> bool:
    return bool(_REV.match(rev))


def is_tarball_hash(sha256: str) -> bool:
    return bool(_SHA256.match(sha256))


@dataclass(frozen=True)
class NixpkgsPin:
    rev: str
    sha256: str  # hash of the unpacked tarball (what builtins.fetchTarball checks)
    source: str  # where the pin was taken from

    @property
    def url(self) -> str:
        return f"https://github.com/NixOS/nixpkgs/archive/{self.rev}.tar.gz"


# NixOS release -> the nixpkgs commit the hive builds from. The hashes are the
# narHash of the github tarball (flake.lock) in nix32 form, converted with
# `nix hash to-base32 sha256-…`; both pins are the last commit of their branch.
NIXPKGS_PINS: dict[str, NixpkgsPin] = {
    "25.05": NixpkgsPin(
        rev="ac62194c3917d5f474c1a844b6fd6da2db95077d",
        sha256="0v6bd1xk8a2aal83karlvc853x44dg1n4nk08jg3dajqyy0s98np",
        # a public shell.nix fetchTarball of this rev with exactly this sha256, and flake.lock
        # files locking nixos-25.05 to it (narHash sha256-16KkgfdYqjaeRGBaYsNrhPRRENs0qzkQVUooNHtoy2w=)
        source="nixos-25.05 branch head ac62194c (2026-01-02)",
    ),
    "24.11": NixpkgsPin(
        rev="50ab793786d9de88ee30ec4e4c24fb4236fc2674",
        sha256="1s2gr5rcyqvpr58vxdcb095mdhblij9bfzaximrva2243aal3dgx",
        # public flake.lock files locking nixos-24.11 to this rev
        # (narHash sha256-/bVBlRpECLVzjV19t5KMdMFWSwKLtb5RyXdjz3LJT+g=)
        source="nixos-24.11 branch head 50ab7937 (2025-06-30)",
    ),
}
