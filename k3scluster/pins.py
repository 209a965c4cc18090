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
    # The K3s minor release (pkgs.k3s_1_XX) a plan without `k3s:` runs.
    k3s_default: str = "1.31"
    # The K3s minor releases (pkgs.k3s_1_XX) this commit is known to package, or None
    # when k3scluster has no record (then only the Nix evaluation can tell).
    k3s_minors: tuple[str, ...] | None = None
    # Where k3s_minors is unknown: the newest K3s minor release this commit can package at
    # all (a later one came out upstream after it), or None.
    k3s_newest: str | None = None
    # The day NixOS stopped supporting this release (ISO date), or None when unknown.
    end_of_life: str | None = None

    @property
    def url(self) -> str:
        return f"https://github.com/NixOS/nixpkgs/archive/{self.rev}.tar.gz"


# NixOS release -> the nixpkgs commit the hive builds from. `sha256` is the NAR hash of
# the unpacked GitHub tarball in nix32 form: what builtins.fetchTarball checks, and the
# same digest as a flake.lock `narHash` (SRI, base64), converted with
# `nix-hash --to-base32 --type sha256 <hex>`. nixpkgs' .gitattributes has no export-ignore
# or export-subst, so GitHub's tarball holds the commit's tree as it is.
#
# How each pin was checked (no nixpkgs checkout fits on this machine, so none was
# hashed here; each hash is one that independent public material agrees on):
#   26.05  7fc6f2c2: flake.lock files locking nixos-26.05 to it, a builtins.fetchTarball
#          and a builtins.fetchTree of this rev, all with narHash
#          sha256-bNyvoIyOCu7lzoCpWKWGIsHpTtERUWzqYWFPlN++WTw= (= the nix32 below).
#   25.11  8fd9daa3: flake.lock files locking nixos-25.11 to it with narHash
#          sha256-Ti+ZBvW6yrWWAg2szExVTwCd4qOJ3KlVr1tFHfyfi8Q=, and a separate shell.nix
#          whose fetchTarball of this rev has exactly the nix32 below (a project's ADR
#          also reports Nix 2.34.7 computing the same narHash for it).
#   25.05, 24.11: see their entries.
# K3s: nixpkgs keeps k3s_1_XX per minor release and drops them once upstream ends
# them (pkgs/applications/networking/cluster/k3s/docs/VERSIONING.md); `k3s_minors`
# lists the ones present throughout the branch up to the pinned commit, read from the
# k3s package updates merged into master and backported to the release branch
# (NixOS/nixpkgs PRs #453222, #468946, #487642, #498764, #499260, #505211, #515339,
# #523995, #535686, #558147). Minors that may or may not still be there at the pinned
# commit are left out: `check` rejects them although nixpkgs might have them.
NIXPKGS_PINS: dict[str, NixpkgsPin] = {
    "26.05": NixpkgsPin(
        rev="7fc6f2c20af09cdcaf48b92ec3121860139ec668",
        sha256="0g2rpvgr8kv1c7m6ql8is57fkh92hsjmiac0rvjyw2lfijhazp3c",
        source="nixos-26.05 7fc6f2c2 (2026-09-28)",
        # 1.34 and 1.35 are on master from before the branch-off (May 2026) until after
        # the pinned commit; 1.33 was dropped from master on 2026-08-30 (#558147) and
        # 1.36 came to master after the branch-off (#523995): neither is recorded.
        k3s_default="1.35",
        k3s_minors=("1.34", "1.35"),
        end_of_life="2026-12-31",
    ),
    "25.11": NixpkgsPin(
        rev="8fd9daa3db09ced9700431c5b7ad0e8ba199b575",
        sha256="1i4bkzy1siavmxaskp49lgi9s02gam6crb0d0abbbjmsyl39jbsf",
        source="nixos-25.11 8fd9daa3 (2026-05-10)",
        # `k3s` is k3s_1_34 since before the branch-off (#453222, 2025-10); k3s_1_35
        # "doesn't exist in 25.11" (#487642, 2026-02); 1.32 ended upstream on
        # 2026-02-28 and left master (#505211, 2026-03-31): not recorded.
        k3s_default="1.34",
        k3s_minors=("1.33", "1.34"),
        end_of_life="2026-06-30",
    ),
    "25.05": NixpkgsPin(
        rev="ac62194c3917d5f474c1a844b6fd6da2db95077d",
        sha256="0v6bd1xk8a2aal83karlvc853x44dg1n4nk08jg3dajqyy0s98np",
        # a public shell.nix fetchTarball of this rev with exactly this sha256, and flake.lock
        # files locking nixos-25.05 to it (narHash sha256-16KkgfdYqjaeRGBaYsNrhPRRENs0qzkQVUooNHtoy2w=)
        source="nixos-25.05 branch head ac62194c (2026-01-02)",
        # which k3s_1_XX this commit still has is not recorded (1.31 ended upstream on
        # 2025-10-28); plans without `k3s:` keep the minor they always had. 1.35 is not
        # there: nixos-25.11, maintained longer, did not get it either (#487642, 2026-02)
        k3s_default="1.31",
        k3s_newest="1.34",
        end_of_life="2025-12-31",
    ),
    "24.11": NixpkgsPin(
        rev="50ab793786d9de88ee30ec4e4c24fb4236fc2674",
        sha256="1s2gr5rcyqvpr58vxdcb095mdhblij9bfzaximrva2243aal3dgx",
        # public flake.lock files locking nixos-24.11 to this rev
        # (narHash sha256-/bVBlRpECLVzjV19t5KMdMFWSwKLtb5RyXdjz3LJT+g=)
        source="nixos-24.11 branch head 50ab7937 (2025-06-30)",
        k3s_default="1.31",
        # Kubernetes 1.34, and so K3s 1.34, was released after this commit (2025-08-27)
        k3s_newest="1.33",
        end_of_life="2025-06-30",
    ),
}

# The release `k3scluster init` writes into a new plan: the newest pinned one.
NEWEST_NIXOS_RELEASE = max(NIXPKGS_PINS, key=lambda r: tuple(int(x) for x in r.split(".")))


# network.yaml `k3s:`: a K3s minor release (1.35, v1.35), or a K3s release tag
# (v1.35.2+k3s1) of which only the minor counts
_K3S = re.compile(r"^v?1\.(0|[1-9][0-9]{0,2})(\.[0-9]+\+k3s[0-9]+)?$")
K3S_EXAMPLE = "1.35"


def parse_k3s_minor(text: str) -> str | None:
    """``1.35``, ``v1.35`` or ``v1.35.2+k3s1`` -> ``1.35``; None when it is none of these."""
    m = _K3S.match(text)
    return f"1.{m.group(1)}" if m else None


def minor_key(minor: str) -> tuple[int, ...]:
    """``1.35`` -> (1, 35), for comparing K3s minor releases."""
    return tuple(int(x) for x in minor.split("."))


def k3s_package_attr(minor: str) -> str:
    """``1.35`` -> ``k3s_1_35``: the nixpkgs attribute of that K3s minor release."""
    return "k3s_" + minor.replace(".", "_")


def default_k3s_minor(release: str) -> str:
    """The K3s minor release of a plan without `k3s:` on NixOS ``release``."""
    pin = NIXPKGS_PINS.get(release) or NIXPKGS_PINS[NEWEST_NIXOS_RELEASE]
    return pin.k3s_default
