"""A K3s minor upgrade's first pass over a server host (issue 17 item 1), with nix-instantiate.

``render --hold-agent HOST=MINOR`` writes ``servers-first/HOST.nix``: hive.nix with HOST's
agent kept at that K3s release (``k3scluster.agent.k3sPackageAttr``) while its server takes the
cluster's. The agent module's image then comes from that package, the server's from the
cluster's. ``pkgs`` is a stand-in with nixpkgs' package shape whose store paths throw.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from nixeval import nix_eval

ROOT = Path(__file__).resolve().parent.parent

STUB_PKGS = """{
  k3s_1_34 = { version = "1.34.6+k3s1"; outPath = throw "built"; drvPath = throw "built"; };
  k3s_1_35 = { version = "1.35.2+k3s1"; outPath = throw "built"; drvPath = throw "built"; };
}"""


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example rendered by the CLI with olaf's agent held at 1.34."""
    root = ROOT / "examples" / "cluster"
    out = tmp_path_factory.mktemp("render")
    proc = subprocess.run(
        [sys.executable, "-m", "k3scluster", "render", str(root), "--out", str(out),
         "--hold-agent", "olaf=1.34"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_hive_keeps_only_that_hosts_agent_back(out: Path) -> None:
    assert sorted(p.name for p in (out / "servers-first").iterdir()) == ["olaf.nix"]
    got = nix_eval(
        f"""let
          first = import {out}/servers-first/olaf.nix;
          hive = import {out}/hive.nix;
        in {{
          held = first.olaf.k3scluster.agent.k3sPackageAttr;
          importsTheHostAsItIs = first.olaf.imports == [ hive.olaf ];
          sameNodes = builtins.attrNames first == builtins.attrNames hive;
          # the nodes only: comparing meta would import (download) the pinned nixpkgs
          othersAsTheyAre = builtins.all (n: first.${{n}} == hive.${{n}})
            [ "ulf" "rolf" "karl" "ulrich" ];
        }}"""
    )
    assert got == {
        "held": "k3s_1_34",
        "importsTheHostAsItIs": True,
        "sameNodes": True,
        "othersAsTheyAre": True,
    }


def _agent_image(out: Path, held: str | None) -> object:
    hold = f'// {{ k3sPackageAttr = "{held}"; }}' if held else ""
    return nix_eval(
        f"""let
          hostFile = import {out}/hosts/olaf.nix {{ modulesPath = /stand-in; }};
          k = hostFile.k3scluster;
          config = {{ k3scluster = k // {{ agent = k.agent {hold}; }}; }};
          m = import {out}/modules/k3s-agent.nix {{ inherit config; lib = {{ }}; pkgs = {STUB_PKGS}; }};
        in m.config.virtualisation.oci-containers.containers.k3s-agent.image"""
    )


def test_the_held_agent_runs_the_image_of_its_old_release(out: Path) -> None:
    assert _agent_image(out, "k3s_1_34") == "docker.io/rancher/k3s:v1.34.6-k3s1"
    # without the hold: the cluster's release (network.yaml k3s: 1.35)
    assert _agent_image(out, None) == "docker.io/rancher/k3s:v1.35.2-k3s1"


def test_a_hold_the_plans_cannot_have_is_refused(tmp_path: Path) -> None:
    root = ROOT / "examples" / "cluster"
    for bad in ("rolf=1.34", "olaf=latest", "nobody=1.34"):  # rolf carries no agent
        proc = subprocess.run(
            [sys.executable, "-m", "k3scluster", "render", str(root), "--out",
             str(tmp_path / "o"), "--hold-agent", bad],
            capture_output=True, text=True, check=False, cwd=ROOT,
        )
        assert proc.returncode == 1 and "--hold-agent" in proc.stderr, bad


