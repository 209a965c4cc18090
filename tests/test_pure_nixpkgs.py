"""The hive and the ISO import nixpkgs pure (issue 13 item 10).

`import <nixpkgs> { }` reads the deploying user's ~/.config/nixpkgs/{config.nix,overlays};
colmena then hands that config and those overlays to every node (colmena's
src/nix/hive/eval.nix: `nixpkgs.overlays = lib.mkBefore npkgs.overlays`). So the rendered
files must call nixpkgs with config, overlays and system.

There is no nixpkgs here: the tests put a stand-in nixpkgs in its place, a directory whose
default.nix is a function of exactly `{ config, overlays, system }` (Nix refuses the call
when one of them is missing) that returns what it was called with.
"""

from __future__ import annotations

import json
from pathlib import Path

from nixeval import nix_eval

from k3scluster import plans
from k3scluster.installer import render_installer
from k3scluster.pins import NIXPKGS_SYSTEM
from k3scluster.render import nixpkgs_pin, render_files

STUB_NIXPKGS = """\
# stand-in for nixpkgs (tests/test_pure_nixpkgs.py): records how it was called
{ config, overlays, system }@args:
{
  recorded = args;
  inherit config overlays;
  path = ./.;
  lib = { };
  stdenv.hostPlatform.system = system;
}
"""

# Stand-in for nixos/lib/eval-config.nix: the ISO's result says which system argument it
# got and which platform it ends up with. The platform follows the real files (read at
# nixpkgs 02aa3c00 nixos/lib/eval-config.nix and 026ffb9e nixos/modules/misc/nixpkgs.nix):
# a defined nixpkgs.hostPlatform decides; without it a non-null `system` argument does
# (eval-config sets `nixpkgs.system = mkDefault system`, localSystem defaults to it);
# with neither the evaluation fails. Only plain attribute-set modules are looked at.
STUB_EVAL_CONFIG = """\
args:
let
  defs = builtins.concatMap
    (m: if builtins.isAttrs m && m ? nixpkgs && m.nixpkgs ? hostPlatform
      then [ m.nixpkgs.hostPlatform ] else [ ])
    args.modules;
  platform =
    if defs != [ ] then builtins.head defs
    else if args.system != null then args.system
    else throw "neither nixpkgs.hostPlatform nor nixpkgs.system is set";
in
{
  config.nixpkgs.hostPlatform.system = platform;
  config.system.build = {
    toplevel = "toplevel-of-the-host";
    isoImage = { inherit (args) system; inherit platform; };
  };
}
"""


def _stub(dir: Path) -> Path:
    (dir / "nixos" / "lib").mkdir(parents=True)
    (dir / "default.nix").write_text(STUB_NIXPKGS)
    (dir / "nixos" / "lib" / "eval-config.nix").write_text(STUB_EVAL_CONFIG)
    return dir


def test_the_hive_imports_its_pin_pure(example_dir: Path, tmp_path: Path) -> None:
    cluster = plans.load(example_dir).cluster
    assert cluster is not None
    out = example_dir / ".k3scluster" / "render"
    hive = render_files(cluster, out)["hive.nix"]
    pin = nixpkgs_pin(cluster)
    stub = _stub(tmp_path / "nixpkgs")
    # The rendered hive, with builtins.fetchTarball answering the pinned url and hash
    # (and nothing else) with the stand-in; `builtins` is an ordinary name in Nix, so a
    # `let` around the file's text rebinds it for the whole hive.
    wrapped = tmp_path / "hive-with-stub.nix"
    wrapped.write_text(
        "let\n"
        "  real = builtins;\n"
        f"  want = {{ url = {json.dumps(pin.url)}; sha256 = {json.dumps(pin.sha256)}; }};\n"
        "in\n"
        "let\n"
        "  builtins = real // {\n"
        f"    fetchTarball = a: if a == want then {stub} else\n"
        '      throw "fetchTarball called with ${real.toJSON a}";\n'
        "  };\n"
        "in\n" + hive
    )
    got = nix_eval(f"(import {wrapped}).meta.nixpkgs.recorded")
    assert got == {"config": {}, "overlays": [], "system": NIXPKGS_SYSTEM}


def _iso(tmp_path: Path, nixpkgs_expr: str, node: str = "{ }") -> object:
    cluster = plans.load(Path(__file__).resolve().parent.parent / "examples" / "cluster").cluster
    assert cluster is not None
    host = cluster.hosts[0].name
    out = tmp_path / "render"
    for rel, text in render_installer(cluster, host, out).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    _stub(tmp_path / "nixpkgs")
    # a stand-in hive: one node, meta.nixpkgs not yet imported
    (out / "hive.nix").write_text(f"{{ meta.nixpkgs = {nixpkgs_expr}; {host} = {node}; }}\n")
    return nix_eval(f"import {out / 'installers' / host / 'default.nix'}")


def test_the_iso_imports_a_nixpkgs_path_pure(tmp_path: Path) -> None:
    # the stand-in refuses a call without config, overlays or system
    node = f'{{ nixpkgs.hostPlatform = "{NIXPKGS_SYSTEM}"; }}'
    assert _iso(tmp_path, str(tmp_path / "nixpkgs"), node)["platform"] == NIXPKGS_SYSTEM


def test_the_iso_calls_a_nixpkgs_function_pure(tmp_path: Path) -> None:
    expr = (
        f'(args: assert args == {{ config = {{ }}; overlays = [ ]; system = "{NIXPKGS_SYSTEM}"; }};'
        f" import {tmp_path / 'nixpkgs'} args)"
    )
    node = f'{{ nixpkgs.hostPlatform = "{NIXPKGS_SYSTEM}"; }}'
    assert _iso(tmp_path, expr, node)["platform"] == NIXPKGS_SYSTEM


def test_the_iso_runs_on_the_hosts_platform(tmp_path: Path) -> None:
    """An aarch64 host gets an aarch64 image, though the hive's nixpkgs is x86_64's.

    The image's evaluation gets no `system` argument (eval-config.nix would make it
    nixpkgs.system, the image's platform, since the installer profile sets none) and the
    host's nixpkgs.hostPlatform as a module.
    """
    got = _iso(tmp_path, str(tmp_path / "nixpkgs"), '{ nixpkgs.hostPlatform = "aarch64-linux"; }')
    assert NIXPKGS_SYSTEM == "x86_64-linux"
    assert got == {"system": None, "platform": "aarch64-linux"}
