"""One K3s version for servers and agents (issue 13 item 5), evaluated with nix-instantiate.

The servers run pkgs.k3s_1_XX of the pinned nixpkgs; the agents' rancher/k3s image tag is
computed in Nix from that package's version (modules/k3s-release.nix). No nixpkgs here:
`pkgs` is a stand-in whose K3s package has nixpkgs' shape (`version = "1.35.2+k3s1"`,
as pkgs/applications/networking/cluster/k3s/1_35/versions.nix `k3sVersion` and
builder.nix `version = k3sVersion` give it) and whose store paths throw, so any test that
would build, download or even instantiate the package fails.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from nixeval import nix_eval, rendered

# a K3s package that must never be built: its outPath and drvPath throw
STUB_PKGS = """{
  k3s_1_35 = {
    type = "derivation";
    pname = "k3s";
    version = "1.35.2+k3s1";
    outPath = throw "the K3s package was built";
    drvPath = throw "the K3s package was instantiated";
  };
}"""


def _eval_error(expr: str) -> str:
    proc = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "-E", expr],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = Path(__file__).resolve().parent.parent / "examples" / "cluster"
    return rendered(root, tmp_path_factory.mktemp("render"))


def test_the_image_tag_is_the_package_version_with_a_dash(out: Path) -> None:
    release = out / "modules" / "k3s-release.nix"
    got = nix_eval(
        f'let r = import {release} {{ pkgs = {STUB_PKGS}; packageAttr = "k3s_1_35"; }};'
        " in { inherit (r) image; context = builtins.hasContext r.image;"
        ' other = r.imageOf "1.31.12+k3s1"; }'
    )
    assert got == {
        "image": "docker.io/rancher/k3s:v1.35.2-k3s1",
        # a plain string: nothing to build or fetch behind the tag
        "context": False,
        "other": "docker.io/rancher/k3s:v1.31.12-k3s1",
    }


def test_a_minor_the_pinned_nixpkgs_lacks_stops_the_evaluation(out: Path) -> None:
    release = out / "modules" / "k3s-release.nix"
    err = _eval_error(
        f'(import {release} {{ pkgs = {STUB_PKGS}; packageAttr = "k3s_1_30"; }}).image'
    )
    assert "no pkgs.k3s_1_30" in err and "plans/network.yaml" in err


def _module(out: Path, module: str, host: str) -> str:
    """The config of modules/<module>.nix as evaluated on <host>, with the stand-in pkgs."""
    return (
        f"(import {out / 'modules' / module} {{"
        f" config = {{ k3scluster = (import {out / 'hosts' / host} {{ modulesPath = /stand-in; }}).k3scluster; }};"
        f" lib = {{ }}; pkgs = {STUB_PKGS}; }}).config"
    )


def test_an_agent_only_host_runs_the_image_of_the_servers_package(out: Path) -> None:
    # karl has an agent and no server: its image still comes from pkgs.k3s_1_35, and
    # evaluating it builds nothing (the stand-in's store paths throw)
    agent = _module(out, "k3s-agent.nix", "karl.nix")
    image = nix_eval(f"{agent}.virtualisation.oci-containers.containers.k3s-agent.image")
    assert image == "docker.io/rancher/k3s:v1.35.2-k3s1"


def test_the_server_container_runs_that_same_package(out: Path) -> None:
    server = _module(out, "k3s-server.nix", "olaf.nix")
    version = nix_eval(
        f"(({server}).containers.k3s-server.config {{ lib = {{ }}; }}).services.k3s.package.version"
    )
    assert version == "1.35.2+k3s1"
