"""k3scluster.render: what the example cluster renders to, and the rules it keeps.

Golden files: tests/golden/example/ holds the render of examples/cluster (without
installers/, which tests/test_installer.py covers). Regenerate after an intended
change with ``K3SCLUSTER_REGEN_GOLDEN=1 python -m pytest tests/test_render.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from nixeval import nix_eval

from k3scluster import plans
from k3scluster.errors import K3sClusterError
from k3scluster.model import Cluster, SecretFile
from k3scluster.render import (
    MARKER,
    NIXPKGS_PINS,
    PLAN_INPUTS,
    grouped_inputs,
    host_digest,
    host_inputs,
    host_plan,
    k3s_package_attr,
    render_files,
    render_to_dir,
    write_tree,
)

GOLDEN = Path(__file__).resolve().parent / "golden" / "example"
# what a hosts/<host>.nix is called with (eval-config passes modulesPath); a stand-in path
MODULES_PATH = "/stand-in/nixpkgs/nixos/modules"
HOST_ARGS = f'{{ modulesPath = "{MODULES_PATH}"; }}'
REGEN = os.environ.get("K3SCLUSTER_REGEN_GOLDEN") == "1"


def load(root: Path) -> Cluster:
    result = plans.load(root)
    assert result.cluster is not None, "\n".join(map(str, result.diagnostics))
    return result.cluster


def out_of(root: Path) -> Path:
    return root / ".k3scluster" / "render"


def replace_host(cluster: Cluster, name: str, **changes: object) -> Cluster:
    hosts = tuple(
        dataclasses.replace(h, **changes) if h.name == name else h  # type: ignore[arg-type]
        for h in cluster.hosts
    )
    return dataclasses.replace(cluster, hosts=hosts)


def set_column(cluster: Cluster, host: str, column: str, value: str) -> Cluster:
    h = cluster.host(host)
    cols = dict(h.columns)
    cols[column] = value
    return replace_host(cluster, host, columns=tuple(cols.items()))


@pytest.fixture
def cluster(example_dir: Path) -> Cluster:
    return load(example_dir)


@pytest.fixture
def rendered(cluster: Cluster) -> tuple[Path, dict[str, str]]:
    out = out_of(cluster.root)
    return out, render_to_dir(cluster, out)


# -- golden files ------------------------------------------------------------


def test_golden_example(cluster: Cluster) -> None:
    files = {
        k: v
        for k, v in render_files(cluster, out_of(cluster.root)).items()
        if not k.startswith("installers/")
    }
    if REGEN:
        shutil.rmtree(GOLDEN, ignore_errors=True)
        for rel, text in files.items():
            (GOLDEN / rel).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / rel).write_text(text, encoding="utf-8")
    want = {
        p.relative_to(GOLDEN).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(GOLDEN.rglob("*"))
        if p.is_file()
    }
    problems = []
    for rel in sorted(set(want) | set(files)):
        if rel not in files:
            problems.append(f"{rel}: in the golden files, not rendered")
        elif rel not in want:
            problems.append(f"{rel}: rendered, not in the golden files")
        elif files[rel] != want[rel]:
            diff = difflib.unified_diff(
                want[rel].splitlines(keepends=True),
                files[rel].splitlines(keepends=True),
                f"golden/{rel}",
                f"rendered/{rel}",
            )
            problems.append("".join(diff))
    assert not problems, (
        "render differs from tests/golden/example (K3SCLUSTER_REGEN_GOLDEN=1 regenerates):\n"
        + "\n".join(problems)
    )


GOLDEN_VM = Path(__file__).resolve().parent / "golden" / "example-vm"


def test_golden_example_as_vm_stack(cluster: Cluster) -> None:
    """A VM stack (stack test-vms) renders the example's hosts with the .link of their VMs;
    tests/golden/example-vm holds the files that differ from tests/golden/example."""
    from k3scluster.lab.spec import vm_render

    out = out_of(cluster.root)
    plain = render_files(cluster, out)
    vm = render_files(cluster, out, vm_render(cluster, "test-vms", out))
    files = {k: v for k, v in vm.items() if plain.get(k) != v}
    if REGEN:
        shutil.rmtree(GOLDEN_VM, ignore_errors=True)
        for rel, text in files.items():
            (GOLDEN_VM / rel).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN_VM / rel).write_text(text, encoding="utf-8")
    want = {
        p.relative_to(GOLDEN_VM).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(GOLDEN_VM.rglob("*"))
        if p.is_file()
    }
    assert sorted(files) == sorted(want) == sorted(
        [f"hosts/{h.name}.nix" for h in cluster.hosts]
        + [f"installers/{h.name}/installer.json" for h in cluster.hosts]
    )
    for rel, text in want.items():
        diff = "".join(
            difflib.unified_diff(
                text.splitlines(keepends=True), files[rel].splitlines(keepends=True),
                f"golden-vm/{rel}", f"rendered/{rel}",
            )
        )
        assert not diff, f"K3SCLUSTER_REGEN_GOLDEN=1 regenerates:\n{diff}"


def test_layout(rendered: tuple[Path, dict[str, str]]) -> None:
    out, files = rendered
    for rel in [
        "hive.nix",
        "cluster.json",
        "modules/cluster.nix",
        "modules/base.nix",
        "modules/k3s-server.nix",
        "modules/k3s-agent.nix",
        "modules/k3s-common.nix",
        "hosts/olaf.nix",
        "hosts/ulrich.nix",
        "installers/olaf/default.nix",
    ]:
        assert rel in files
        assert (out / rel).read_text() == files[rel]
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MARKER}
    assert on_disk == set(files)


def test_every_nix_file_parses(rendered: tuple[Path, dict[str, str]]) -> None:
    out, files = rendered
    for rel in files:
        if rel.endswith(".nix"):
            proc = subprocess.run(
                ["nix-instantiate", "--parse", str(out / rel)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert proc.returncode == 0, f"{rel}:\n{proc.stderr}"


# -- plan data ---------------------------------------------------------------


def test_cluster_json_paths(rendered: tuple[Path, dict[str, str]]) -> None:
    out, files = rendered
    assert "builtins.fromJSON (builtins.readFile ./../cluster.json)" in files["modules/cluster.nix"]
    # evaluated from modules/, the way modules/cluster.nix reads it
    probe = out / "modules" / "probe.nix"
    probe.write_text(
        "let data = builtins.fromJSON (builtins.readFile ./../cluster.json); cluster = data.hosts;"
        " in { location = cluster.olaf.location; server = cluster.olaf.k3s.server.name;"
        " agent = cluster.karl.k3s.agent.ip; none = cluster.ulrich.k3s;"
        " prefix = data.network.prefixLength; }\n"
    )
    try:
        got = nix_eval(f"import {probe}")
    finally:
        probe.unlink()
    assert got == {
        "location": "rack-top",
        "server": "olaf-k3s-server",
        "agent": "10.0.100.15",
        "none": {},
        "prefix": 24,
    }


HOSTILE = '"${builtins.abort "x"}" \\ back\\slash\nnew line\ttab \'\' $${y}'


def test_hostile_column_comes_out_literal(cluster: Cluster, tmp_path: Path) -> None:
    evil = set_column(cluster, "olaf", "note", HOSTILE)
    out = out_of(cluster.root)
    render_to_dir(evil, out)
    got = nix_eval(f"(builtins.fromJSON (builtins.readFile {out}/cluster.json)).hosts.olaf.note")
    assert got == HOSTILE


def test_hostile_ssh_key_comment_comes_out_literal(cluster: Cluster) -> None:
    key = cluster.secrets.ssh_keys[0]
    line = key.text.split("\n")[0] + " " + HOSTILE.replace("\n", " ")
    secrets = dataclasses.replace(cluster.secrets, ssh_keys=(dataclasses.replace(key, text=line),))
    evil = dataclasses.replace(cluster, secrets=secrets)
    out = out_of(cluster.root)
    render_to_dir(evil, out)
    got = nix_eval(f"(import {out}/hosts/olaf.nix {HOST_ARGS}).k3scluster.host.sshKeys")
    assert got == [line]


# -- secrets -----------------------------------------------------------------

POISON_TOKEN = "POISON-TOKEN-3f9c1b7e-never-render-me"
POISON_HASH = "$6$POISONsalt$POISONHASHneverrenderme0123456789abcdefghijklmnopqrstuvwxyzABCD"


def test_secrets_appear_only_as_paths(example_dir: Path) -> None:
    (example_dir / "secrets" / "token").write_text(POISON_TOKEN + "\n")
    (example_dir / "secrets" / "agent-token").write_text(POISON_TOKEN + "-agent\n")
    (example_dir / "secrets" / "passwd").write_text(POISON_HASH + "\n")
    (example_dir / "secrets" / "olafpasswd").write_text(POISON_HASH.replace("$6$P", "$6$Q") + "\n")
    (example_dir / "secrets" / "olafpasswd").chmod(0o600)
    cluster = load(example_dir)
    out = out_of(example_dir)
    files = render_to_dir(cluster, out)
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"POISON" not in data, p
    # the hive points colmena at the files on this machine, through toString (no store copy)
    keys = nix_eval(f"(import {out}/hive.nix).olaf.deployment.keys")
    assert isinstance(keys, dict)
    assert keys["k3s-token"]["keyFile"] == str(example_dir / "secrets" / "token")
    assert keys["passwd-manfred"]["keyFile"] == str(example_dir / "secrets" / "olafpasswd")
    assert keys["k3s-agent-token"]["keyFile"] == str(example_dir / "secrets" / "agent-token")
    for name, k in keys.items():
        # the agent token alone in a directory of its own (the agent container binds it)
        want = "agent-secrets" if name == "k3s-agent-token" else "secrets"
        assert k["destDir"] == f"/var/lib/k3scluster/{want}"
        assert (k["user"], k["group"], k["permissions"]) == ("root", "root", "0400")
        assert k["uploadAt"] == "pre-activation"
    assert "keyFile = toString ../../secrets/token;" in files["hive.nix"]
    ulf_keys = nix_eval(f"(import {out}/hive.nix).ulf.deployment.keys")
    assert isinstance(ulf_keys, dict)
    assert ulf_keys["passwd-manfred"]["keyFile"] == str(example_dir / "secrets" / "passwd")


def test_inputs_hold_secret_digests_not_content(example_dir: Path) -> None:
    (example_dir / "secrets" / "token").write_text(POISON_TOKEN + "\n")
    cluster = load(example_dir)
    files = render_files(cluster, out_of(example_dir))
    inputs = host_inputs(cluster, "olaf", files)
    assert cluster.secrets.token is not None
    assert inputs["secret:k3s-token"] == cluster.secrets.token.sha256
    assert not any("POISON" in k or "POISON" in v for k, v in inputs.items())


# -- hosts -------------------------------------------------------------------


def test_host_without_k3s_rows_renders_no_k3s(rendered: tuple[Path, dict[str, str]]) -> None:
    out, files = rendered
    text = files["hosts/ulrich.nix"]
    assert "k3s-server.nix" not in text and "k3s-agent.nix" not in text
    assert "k3scluster.server" not in text and "k3scluster.agent" not in text
    node = nix_eval(f"(import {out}/hive.nix).ulrich.deployment")
    assert isinstance(node, dict)
    assert node["tags"] == ["no-k3s"]
    assert set(node["keys"]) == {"passwd-manfred"}


def test_hive_nodes(rendered: tuple[Path, dict[str, str]]) -> None:
    out, files = rendered
    hive = nix_eval(
        f"let h = import {out}/hive.nix; in builtins.mapAttrs (n: v: v.deployment)"
        ' (builtins.removeAttrs h [ "meta" ])'
    )
    assert isinstance(hive, dict)
    assert set(hive) == {"olaf", "ulf", "rolf", "karl", "ulrich"}
    olaf = hive["olaf"]
    assert olaf["targetHost"] == "10.0.100.2"
    assert (olaf["targetUser"], olaf["targetPort"]) == ("root", 22)
    assert olaf["tags"] == ["k3s-server", "k3s-init-server", "k3s-agent"]
    assert hive["ulf"]["tags"] == ["k3s-server", "k3s-agent"]
    assert hive["rolf"]["tags"] == ["k3s-server"]
    assert hive["karl"]["tags"] == ["k3s-agent"]
    # an agent-only host never receives the server token
    assert set(hive["karl"]["keys"]) == {"k3s-agent-token", "passwd-manfred"}
    assert set(hive["rolf"]["keys"]) == {"k3s-token", "k3s-agent-token", "passwd-manfred"}
    assert set(hive["olaf"]["keys"]) == {"k3s-token", "k3s-agent-token", "passwd-manfred"}
    assert set(hive["ulrich"]["keys"]) == {"passwd-manfred"}
    pin = NIXPKGS_PINS["26.05"]
    assert f'url = "{pin.url}";' in files["hive.nix"]
    assert f'sha256 = "{pin.sha256}";' in files["hive.nix"]


def test_host_values(rendered: tuple[Path, dict[str, str]]) -> None:
    out, _ = rendered
    olaf = nix_eval(f'builtins.removeAttrs (import {out}/hosts/olaf.nix {HOST_ARGS}) [ "imports" ]')
    assert isinstance(olaf, dict)
    host = olaf["k3scluster"]["host"]
    assert host["interface"] == "enp0s20f0"
    assert (host["address"], host["prefixLength"], host["gateway"]) == (
        "10.0.100.2",
        24,
        "10.0.100.1",
    )
    assert host["passwordFile"] == "/var/lib/k3scluster/secrets/passwd-manfred"
    assert len(host["sshKeys"]) == 2  # manfred.pub for all, olaf.pub for olaf
    server = olaf["k3scluster"]["server"]
    # the planned init-server, and whom it asks before it starts a new cluster
    assert server["clusterInit"] is True and "serverAddr" not in server
    assert server["servers"] == ["10.0.100.12", "10.0.100.14"]
    # one K3s package for the host's server and agent; no version of its own in either
    assert olaf["k3scluster"]["k3s"] == {"packageAttr": "k3s_1_35"}
    assert "k3sVersion" not in server and "packageAttr" not in server
    agent = olaf["k3scluster"]["agent"]
    assert "image" not in agent
    # every server, the init-server first: the agent registers with the first that answers
    assert agent["servers"] == ["10.0.100.10", "10.0.100.12", "10.0.100.14"]
    assert "serverUrl" not in agent
    ulf = nix_eval(f"(import {out}/hosts/ulf.nix {HOST_ARGS}).k3scluster.server")
    assert isinstance(ulf, dict)
    assert ulf["clusterInit"] is False
    # a joining server asks the init-server first, then the other servers
    assert ulf["servers"] == ["10.0.100.10", "10.0.100.14"]
    karl = nix_eval(f"(import {out}/hosts/karl.nix {HOST_ARGS}).k3scluster.host.sshKeys")
    assert isinstance(karl, list) and len(karl) == 1


def test_imports_resolve_into_the_cluster_dir(rendered: tuple[Path, dict[str, str]]) -> None:
    out, _ = rendered
    root = out.parent.parent
    imports = nix_eval(f"map toString (import {out}/hosts/olaf.nix {HOST_ARGS}).imports")
    assert isinstance(imports, list)
    assert str(root / "nixConfigs" / "olaf.nix") in imports
    assert str(out / "modules" / "k3s-server.nix") in imports
    extra = nix_eval(
        f"let s = (import {out}/hosts/olaf.nix {HOST_ARGS}).k3scluster.server; in"
        " { m = builtins.mapAttrs (n: toString) s.manifests; e = map toString s.extraModules; }"
    )
    assert extra == {
        "m": {"hello.yaml": str(root / "manifests" / "hello.yaml")},
        "e": [str(root / "nixConfigs" / "olaf-k3s-server.nix")],
    }
    # ulf has its hardware configuration: a plain import
    ulf = nix_eval(f"map toString (import {out}/hosts/ulf.nix {HOST_ARGS}).imports")
    assert isinstance(ulf, list)
    assert str(root / "nixConfigs" / "ulf.hardware.nix") in ulf
    # karl has none yet: it gets what nixos-generate-config falls back to (every storage
    # driver, redistributable firmware) until the deploy step has fetched it
    fallback = [
        f"{MODULES_PATH}/profiles/all-hardware.nix",
        f"{MODULES_PATH}/installer/scan/not-detected.nix",
    ]
    karl = nix_eval(f"map toString (import {out}/hosts/karl.nix {HOST_ARGS}).imports")
    assert isinstance(karl, list)
    assert karl[-2:] == fallback
    assert str(root / "nixConfigs" / "karl.hardware.nix") not in karl
    (root / "nixConfigs" / "karl.hardware.nix").write_text("{ ... }: { }\n")
    karl = nix_eval(f"map toString (import {out}/hosts/karl.nix {HOST_ARGS}).imports")
    assert isinstance(karl, list)
    assert karl[-1] == str(root / "nixConfigs" / "karl.hardware.nix")
    assert not set(fallback) & set(karl)
    # a host rendered with its hardware configuration needs no modulesPath
    assert "modulesPath" not in (out / "hosts" / "ulf.nix").read_text()
    assert nix_eval(f"builtins.length (import {out}/hosts/ulf.nix {{ }}).imports") == len(ulf)


def test_interface_names_near_the_limit(cluster: Cluster) -> None:
    nic = "enp0s20f0u1u2c3"  # 15 characters: mv-<nic> would be 18
    c = replace_host(cluster, "olaf", interface=nic)
    files = render_files(c, out_of(cluster.root))
    assert f'interface = "{nic}";' in files["hosts/olaf.nix"]
    everything = "".join(files.values())
    assert f"mv-{nic}" not in everything
    assert 'matchConfig.Name = "mv-*";' in files["modules/k3s-server.nix"]
    assert "macvlans = [ host.interface ];" in files["modules/k3s-server.nix"]
    with pytest.raises(K3sClusterError):
        render_files(replace_host(cluster, "olaf", interface=nic + "x"), out_of(cluster.root))


# -- versions ----------------------------------------------------------------


def test_k3s_package_attr() -> None:
    assert k3s_package_attr("1.31") == "k3s_1_31"
    assert k3s_package_attr("1.35") == "k3s_1_35"


def test_a_plan_without_nixos_and_k3s_keeps_25_05_and_k3s_1_31(example_dir: Path) -> None:
    # plans written before init wrote nixos: and k3s: must render as they always did
    net = example_dir / "plans" / "network.yaml"
    text = net.read_text()
    net.write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith(("nixos:", "k3s:")))
    )
    files = render_files(load(example_dir), out_of(example_dir))
    assert NIXPKGS_PINS["25.05"].rev in files["hive.nix"]
    assert 'k3scluster.k3s.packageAttr = "k3s_1_31";' in files["hosts/olaf.nix"]
    assert json.loads(files["cluster.json"])["network"]["k3s"] == "1.31"


def test_only_the_minor_of_a_k3s_tag_counts(example_dir: Path) -> None:
    net = example_dir / "plans" / "network.yaml"
    net.write_text(net.read_text().replace('k3s: "1.35"', "k3s: v1.35.9+k3s2"))
    files = render_files(load(example_dir), out_of(example_dir))
    assert 'k3scluster.k3s.packageAttr = "k3s_1_35";' in files["hosts/karl.nix"]
    assert "1.35.9" not in "".join(files.values())


def test_nixpkgs_pin_override_and_unknown_release(cluster: Cluster) -> None:
    rev = "0123456789abcdef0123456789abcdef01234567"
    net = dataclasses.replace(cluster.network, nixpkgs_rev=rev, nixpkgs_sha256="sha256-AAAA")
    files = render_files(dataclasses.replace(cluster, network=net), out_of(cluster.root))
    assert f"archive/{rev}.tar.gz" in files["hive.nix"]
    assert 'sha256 = "sha256-AAAA";' in files["hive.nix"]
    old = dataclasses.replace(cluster.network, nixos_release="24.11")
    files = render_files(dataclasses.replace(cluster, network=old), out_of(cluster.root))
    assert NIXPKGS_PINS["24.11"].rev in files["hive.nix"]
    # another release, the same stateVersion (tests/test_modules.py: item 6)
    assert 'stateVersion = "25.05";' in files["hosts/olaf.nix"]
    unknown = dataclasses.replace(cluster.network, nixos_release="19.09")
    with pytest.raises(K3sClusterError) as exc:
        render_files(dataclasses.replace(cluster, network=unknown), out_of(cluster.root))
    assert "19.09" in str(exc.value)
    half = dataclasses.replace(cluster.network, nixpkgs_rev=rev)
    with pytest.raises(K3sClusterError):
        render_files(dataclasses.replace(cluster, network=half), out_of(cluster.root))


# -- determinism and writing -------------------------------------------------


def test_deterministic(example_dir: Path) -> None:
    out = out_of(example_dir)
    first = render_files(load(example_dir), out)
    second = render_files(load(example_dir), out)
    assert first == second
    render_to_dir(load(example_dir), out)
    snap1 = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    render_to_dir(load(example_dir), out)
    snap2 = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert snap1 == snap2
    for p in out.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), p


def test_render_does_not_depend_on_the_checkout_path(example_src: Path, tmp_path: Path) -> None:
    a = tmp_path / "a" / "cluster"
    b = tmp_path / "deeper" / "b" / "cluster"
    for d in (a, b):
        shutil.copytree(example_src, d, ignore=shutil.ignore_patterns(".k3scluster"))
    fa = render_files(load(a), out_of(a))
    fb = render_files(load(b), out_of(b))
    assert fa == fb


def test_write_tree_replaces_and_removes_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "render"
    write_tree({"a.nix": "a\n", "hosts/old.nix": "old\n"}, out)
    write_tree({"a.nix": "A\n", "hosts/new.nix": "new\n"}, out)
    assert (out / "a.nix").read_text() == "A\n"
    assert not (out / "hosts" / "old.nix").exists()
    assert (out / "hosts" / "new.nix").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render"]


def test_write_tree_leaves_no_partial_tree(tmp_path: Path) -> None:
    out = tmp_path / "render"
    write_tree({"a.nix": "old a\n", "b.nix": "old b\n"}, out)
    files: dict[str, object] = {"a.nix": "new a\n", "b.nix": object(), "c.nix": "new c\n"}
    with pytest.raises(TypeError):
        write_tree(files, out)  # type: ignore[arg-type]
    assert (out / "a.nix").read_text() == "old a\n"
    assert (out / "b.nix").read_text() == "old b\n"
    assert not (out / "c.nix").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render"]
    # a render into a fresh directory that fails leaves nothing at all
    fresh = tmp_path / "fresh"
    with pytest.raises(TypeError):
        write_tree(files, fresh)  # type: ignore[arg-type]
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render"]


def test_write_tree_never_replaces_a_foreign_directory(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine\n")
    with pytest.raises(K3sClusterError):
        write_tree({"a.nix": "a\n"}, precious)
    assert (precious / "notes.txt").read_text() == "mine\n"
    with pytest.raises(ValueError):
        write_tree({"../escape.nix": "x"}, tmp_path / "render")


# -- what a host depends on --------------------------------------------------


def all_digests(cluster: Cluster) -> dict[str, str]:
    files = render_files(cluster, out_of(cluster.root))
    return {h.name: host_digest(host_inputs(cluster, h.name, files)) for h in cluster.hosts}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {h for h in before if before[h] != after[h]}


def test_host_inputs_content(cluster: Cluster) -> None:
    files = render_files(cluster, out_of(cluster.root))
    olaf = host_inputs(cluster, "olaf", files)
    for name in [
        "file:hosts/olaf.nix",
        "file:modules/base.nix",
        "file:modules/cluster.nix",
        "file:modules/k3s-server.nix",
        "file:modules/k3s-agent.nix",
        "nixConfig:nixConfigs/olaf.nix",
        "nixConfig:nixConfigs/olaf-k3s-server.nix",
        "manifest:manifests/hello.yaml",
        "secret:k3s-token",
        "secret:passwd-manfred",
        "plan:host",
        "plan:init-server",
        "version:nixos",
        "version:k3s",
        "nixpkgs",
    ]:
        assert name in olaf, name
    assert all(len(v) == 64 for v in olaf.values())
    ulrich = host_inputs(cluster, "ulrich", files)
    assert not any("k3s" in k for k in ulrich)
    assert "manifest:manifests/hello.yaml" not in host_inputs(cluster, "karl", files)
    assert host_digest(olaf) == host_digest(dict(reversed(list(olaf.items()))))


def test_editing_a_nix_config_changes_only_that_host(cluster: Cluster) -> None:
    before = all_digests(cluster)
    with open(cluster.root / "nixConfigs" / "olaf.nix", "a") as fh:
        fh.write("# edited\n")
    assert changed(before, all_digests(cluster)) == {"olaf"}
    with open(cluster.root / "nixConfigs" / "ulf.hardware.nix", "a") as fh:
        fh.write("# edited\n")
    after = all_digests(cluster)
    with open(cluster.root / "nixConfigs" / "olaf-k3s-server.nix", "a") as fh:
        fh.write("# edited\n")
    assert changed(after, all_digests(cluster)) == {"olaf"}


def test_other_rows_change_a_host_only_when_it_depends_on_them(cluster: Cluster) -> None:
    before = all_digests(cluster)
    assert changed(before, all_digests(set_column(cluster, "ulf", "location", "attic"))) == {"ulf"}
    # the init-server's address matters to every K3s host, not to ulrich
    init = cluster.k3s[0]
    moved = dataclasses.replace(init, ip=init.ip + 100)
    c = dataclasses.replace(cluster, k3s=(moved,) + cluster.k3s[1:])
    assert changed(before, all_digests(c)) == {"olaf", "ulf", "rolf", "karl"}


def deploy_values(cluster: Cluster, host: str) -> dict[str, object]:
    """What olaf's deploy step records as its ``inputs`` (components/host.py): its inputs
    without the ``PLAN_INPUTS`` digests, grouped, and the plan values in clear in their
    place, one map (records.step_values)."""
    from k3scluster.records import step_values

    files = render_files(cluster, out_of(cluster.root))
    inputs = {k: v for k, v in host_inputs(cluster, host, files).items() if k not in PLAN_INPUTS}
    return step_values(grouped_inputs(inputs), host_plan(cluster, host))


@pytest.mark.parametrize("column", ["roles", "network", "nixos", "init-server", "address"])
def test_a_column_named_like_a_plan_value_still_deploys_its_host(
    cluster: Cluster, column: str
) -> None:
    """An extra hosts.csv column reaches the host's system (config.cluster.<host>.<column>);
    its deploy step sees it only among the plan values (its digest, plan:host, is not
    recorded). A column named like a value host_plan derives is shown under a name of its own:
    were it replaced by the derived value, its change would deploy nothing."""
    before = set_column(cluster, "olaf", column, "gpu")
    after = set_column(cluster, "olaf", column, "storage")
    assert changed(all_digests(before), all_digests(after)) == {"olaf"}
    from k3scluster.records import is_digest_name

    was, now = deploy_values(before, "olaf"), deploy_values(after, "olaf")

    def digests(values: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in values.items() if is_digest_name(k)}

    assert digests(was) == digests(now)  # nothing but the plan values tells
    assert was != now
    assert now[f"{column} (hosts.csv)"] == "storage"
    # the value host_plan derives under that name stays as it was
    if column != "address":
        assert now[column] == host_plan(cluster, "olaf")[column]
    else:
        assert now["address"] == "10.0.100.2"


def test_manifests_and_token_reach_the_right_hosts(cluster: Cluster) -> None:
    before = all_digests(cluster)
    with open(cluster.root / "manifests" / "hello.yaml", "a") as fh:
        fh.write("# edited\n")
    assert changed(before, all_digests(cluster)) == {"olaf", "ulf", "rolf"}
    before = all_digests(cluster)
    token = cluster.root / "secrets" / "token"
    token.write_text("another-token-0123456789\n")
    c = dataclasses.replace(
        cluster,
        secrets=dataclasses.replace(
            cluster.secrets, token=SecretFile.from_path(cluster.root, token)
        ),
    )
    # the server token reaches the servers only
    assert changed(before, all_digests(c)) == {"olaf", "ulf", "rolf"}
    before = all_digests(c)
    agent_token = cluster.root / "secrets" / "agent-token"
    agent_token.write_text("another-agent-token-0123456789\n")
    c = dataclasses.replace(
        c,
        secrets=dataclasses.replace(
            c.secrets, agent_token=SecretFile.from_path(cluster.root, agent_token)
        ),
    )
    assert changed(before, all_digests(c)) == {"olaf", "ulf", "rolf", "karl"}


def test_missing_token_with_k3s_rows_is_a_user_error(cluster: Cluster) -> None:
    c = dataclasses.replace(cluster, secrets=dataclasses.replace(cluster.secrets, token=None))
    with pytest.raises(K3sClusterError):
        render_files(c, out_of(cluster.root))
    # neither token: the agents have nothing to join with
    s = dataclasses.replace(cluster.secrets, token=None, agent_token=None)
    with pytest.raises(K3sClusterError, match="secrets/token"):
        render_files(dataclasses.replace(cluster, secrets=s), out_of(cluster.root))


# -- a cluster made before agent tokens (no secrets/agent-token) ---------------------------
# K3s keeps server/cred/passwd (the agent token, user node) in its etcd bootstrap data: adding
# an agent token to a running cluster may keep its servers from restarting. Such a cluster
# renders as before agent tokens: the agents join with the server token.


def _without_agent_token(example_dir: Path) -> Cluster:
    (example_dir / "secrets" / "agent-token").unlink()
    cluster = load(example_dir)
    assert cluster.secrets.agent_token is None
    return cluster


def test_without_an_agent_token_the_agents_get_the_server_token_in_their_own_directory(
    example_dir: Path,
) -> None:
    cluster = _without_agent_token(example_dir)
    out = out_of(example_dir)
    render_to_dir(cluster, out)
    hive = nix_eval(
        f"let h = import {out}/hive.nix; in builtins.mapAttrs (n: v: v.deployment.keys)"
        ' (builtins.removeAttrs h [ "meta" ])'
    )
    assert isinstance(hive, dict)
    token = str(example_dir / "secrets" / "token")
    where = {
        host: {name: (k["keyFile"], k["destDir"]) for name, k in keys.items() if "token" in name}
        for host, keys in hive.items()
    }
    server_key = (token, "/var/lib/k3scluster/secrets")
    agent_key = (token, "/var/lib/k3scluster/agent-secrets")  # a directory of its own
    assert where == {
        "olaf": {"k3s-token": server_key, "k3s-agent-token": agent_key},  # server + agent
        "ulf": {"k3s-token": server_key, "k3s-agent-token": agent_key},  # server + agent
        "rolf": {"k3s-token": server_key},  # server only: no --agent-token-file to read
        "karl": {"k3s-agent-token": agent_key},  # agent only: never in secrets/
        "ulrich": {},
    }


def test_without_an_agent_token_the_server_token_redeploys_the_agents(example_dir: Path) -> None:
    cluster = _without_agent_token(example_dir)
    before = all_digests(cluster)
    token = cluster.root / "secrets" / "token"
    token.write_text("another-token-0123456789\n")
    new = SecretFile.from_path(cluster.root, token)
    c = dataclasses.replace(cluster, secrets=dataclasses.replace(cluster.secrets, token=new))
    assert changed(before, all_digests(c)) == {"olaf", "ulf", "rolf", "karl"}
    files = render_files(c, out_of(c.root))
    assert host_inputs(c, "karl", files)["secret:k3s-agent-token"] == new.sha256
    assert "secret:k3s-agent-token" not in host_inputs(c, "rolf", files)


def test_column_named_k3s_is_refused(cluster: Cluster) -> None:
    with pytest.raises(K3sClusterError):
        render_files(set_column(cluster, "olaf", "k3s", "x"), out_of(cluster.root))


def test_a_removed_hosts_leftover_files_redeploy_nobody(cluster: Cluster) -> None:
    before = all_digests(cluster)
    # ulf leaves the plans but its hardware configuration stays in nixConfigs/
    remaining = dataclasses.replace(
        cluster,
        hosts=tuple(h for h in cluster.hosts if h.name != "ulf"),
        k3s=tuple(n for n in cluster.k3s if n.host != "ulf"),
    )
    after = all_digests(remaining)
    # only the K3s hosts change: the other servers and the agents no longer ask ulf's
    # server at start (modules/k3s-server-start.sh, k3s-agent-start.sh); its leftover
    # file changes nobody
    assert changed({k: v for k, v in before.items() if k != "ulf"}, after) == {
        "olaf",
        "rolf",
        "karl",
    }
    # while a shared file (imported by anyone) still changes every host
    (cluster.root / "nixConfigs" / "common").mkdir()
    (cluster.root / "nixConfigs" / "common" / "users.nix").write_text("{ ... }: { }\n")
    assert changed(after, all_digests(remaining)) == set(after)


def test_a_nixpkgs_pin_in_network_yaml_reaches_the_hive(example_dir: Path) -> None:
    rev = "0123456789abcdef0123456789abcdef01234567"
    sha = "sha256-" + "A" * 43 + "="
    net = example_dir / "plans" / "network.yaml"
    net.write_text(net.read_text() + f"nixpkgs:\n  rev: {rev}\n  sha256: {sha}\n")
    hive = render_files(load(example_dir), out_of(example_dir))["hive.nix"]
    assert f"archive/{rev}.tar.gz" in hive and f'sha256 = "{sha}"' in hive
    assert NIXPKGS_PINS["26.05"].rev not in hive
