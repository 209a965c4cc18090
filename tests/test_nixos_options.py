"""The rendered NixOS files set only options checked against every pinned release.

tests/nix/option-paths.nix lists the option paths a rendered module sets (through
mkIf/mkForce/mkDefault, into the K3s server container's configuration, following the
imports inside the render); tests/nixos_options.py holds the options that were read in
nixpkgs for each release k3scluster pins.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from nixeval import rendered
from nixos_options import OPTIONS, RELEASES, known

from k3scluster.pins import NIXPKGS_PINS

WALKER = Path(__file__).resolve().parent / "nix" / "option-paths.nix"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster"


def option_paths(top: Path, render_dir: Path, host: Path | None = None) -> set[tuple[str, ...]]:
    argv = ["nix-instantiate", "--eval", "--strict", "--json", str(WALKER)]
    argv += ["--arg", "top", str(top), "--argstr", "renderDir", str(render_dir)]
    if host is not None:
        argv += ["--arg", "host", str(host)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return {tuple(p) for p in json.loads(proc.stdout)}


def _as_options(path: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The option paths in ``path``: a container's config holds options of its own."""
    if len(path) > 3 and path[0] == "containers" and path[2] == "config":
        return [path[:3], path[3:]]
    return [path]


@pytest.fixture(scope="module")
def render_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rendered(EXAMPLE, tmp_path_factory.mktemp("render"))


def test_the_table_covers_every_pinned_release() -> None:
    assert set(NIXPKGS_PINS) == set(RELEASES)
    assert [p for p, by in OPTIONS.items() if set(by) != set(RELEASES)] == []


def test_every_rendered_option_was_checked(render_dir: Path) -> None:
    seen: dict[tuple[str, ...], str] = {}
    for host in sorted((render_dir / "hosts").glob("*.nix")):
        for path in option_paths(host, render_dir, host):
            for opt in _as_options(path):
                seen[opt] = f"hosts/{host.name}"
    for iso in sorted((render_dir / "installers").glob("*/iso.nix")):
        for path in option_paths(iso, render_dir):
            seen[path] = str(iso.relative_to(render_dir))
    # the walk reaches every part of the render (so an empty result cannot pass)
    for must in (
        ("services", "k3s", "package"),
        ("virtualisation", "oci-containers", "containers", "k3s-agent", "image"),
        ("containers", "k3s-server", "config"),
        ("isoImage", "storeContents"),
        ("system", "stateVersion"),
    ):
        assert must in seen, must
    unknown = sorted(f"{'.'.join(p)}  ({where})" for p, where in seen.items() if known(p) is None)
    assert unknown == [], (
        "options not in tests/nixos_options.py: read their declaration in each pinned "
        "release's nixpkgs, then add them:\n  " + "\n  ".join(unknown)
    )


def test_the_walk_sees_through_overrides_and_reports_unknown_options(tmp_path: Path) -> None:
    module = tmp_path / "m.nix"
    module.write_text(
        "{ lib, ... }: { config = {\n"
        "  services.openssh.enable = lib.mkForce true;\n"
        '  services.k3s = lib.mkIf true { role = lib.mkDefault "server"; };\n'
        "  services.notAnOption.foo = 1;\n"
        '  services.openssh.settings = { PermitRootLogin = "no"; };\n'
        "}; }\n"
    )
    paths = option_paths(module, tmp_path)
    assert paths == {
        ("services", "openssh", "enable"),
        ("services", "k3s", "role"),
        ("services", "notAnOption", "foo"),
        ("services", "openssh", "settings", "PermitRootLogin"),
    }
    assert [p for p in sorted(paths) if known(p) is None] == [("services", "notAnOption", "foo")]
