"""The smaller findings of the third reading (issue 19, item 6), one test each."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pulumi
import pytest
from nixeval import container_config, module_config

from k3scluster import diagram, plans
from k3scluster.model import Cluster
from k3scluster.render import cluster_data, removed_manifests, render_to_dir


def load(root: Path) -> Cluster:
    result = plans.load(root)
    assert result.cluster is not None, "\n".join(map(str, result.diagnostics))
    return result.cluster


def _empty_boot_and_platform(example_dir: Path) -> None:
    hosts = example_dir / "plans" / "hosts.csv"
    lines = hosts.read_text().splitlines()
    lines[0] += ",platform"
    lines = [lines[0]] + [line + "," for line in lines[1:]]  # every platform empty
    lines = [line.replace("karl,eni1,10.0.100.5,manfred,,efi,", "karl,eni1,10.0.100.5,manfred,,,")
             for line in lines]
    hosts.write_text("\n".join(lines) + "\n")


def test_plan_tables_show_the_boot_mode_and_platform_a_host_gets(example_dir: Path) -> None:
    _empty_boot_and_platform(example_dir)
    cluster = load(example_dir)
    karl = cluster_data(cluster)["hosts"]["karl"]  # type: ignore[index]
    assert (karl["boot"], karl["platform"]) == ("efi", "x86_64-linux")
    rolf = cluster_data(cluster)["hosts"]["rolf"]  # type: ignore[index]
    assert rolf["boot"] == "bios"  # a written value stays as written
    md = diagram.markdown(cluster).splitlines()
    header = next(line for line in md if line.startswith("| name "))
    karl_row = next(line for line in md if line.startswith("| karl "))
    cells = dict(zip(header.split(" | "), karl_row.split(" | "), strict=True))
    assert (cells["boot"], cells["platform"]) == ("efi", "x86\\_64-linux")  # md escapes _


def test_trusted_users_is_left_at_nixos_default(example_dir: Path) -> None:
    # nixos/modules/config/nix.nix: trusted-users defaults to [ "root" ]; colmena deploys
    # as root, so restating it only shadowed what a nixConfigs file might add with mkDefault
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(load(example_dir), out)
    nix = module_config(out, "base", "ulrich", ".nix")
    assert isinstance(nix, dict) and "settings" not in nix


# -- a manifest that leaves the plans ------------------------------------------------------
# nixpkgs' k3s module links each services.k3s.manifests entry into the manifests directory
# (tmpfiles L+ from 25.05, ExecStartPre in 24.11) and never removes a link; K3s deletes
# nothing it applied when a file goes (its docs: packaged components, "deleting manifest
# files will not remove ... the resources", also in the option's description).


def _prune(tmp_path: Path, planned: list[str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    from k3scluster.k3s_start import PRUNE_TEMPLATE
    from k3scluster.render import _environment

    script = tmp_path / "prune.sh"
    script.write_text(_environment().get_template(PRUNE_TEMPLATE).render())
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "hello.yaml").symlink_to("/nix/store/aaaa-hello.yaml")  # planned
    (d / "gone.yaml").symlink_to("/nix/store/bbbb-gone.yaml")  # left the plans, dangles
    (d / "coredns.yaml").write_text("kind: List\n")  # K3s's own, a regular file
    (d / "mine.yaml").symlink_to(tmp_path / "elsewhere.yaml")  # not NixOS's: left alone
    proc = subprocess.run(
        ["bash", str(script), str(d), *planned], capture_output=True, text=True, check=False
    )
    return proc, d


def test_the_link_of_a_removed_manifest_goes_and_the_journal_says_what_stays(
    tmp_path: Path,
) -> None:
    proc, d = _prune(tmp_path, ["hello.yaml"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in d.iterdir()) == ["coredns.yaml", "hello.yaml", "mine.yaml"]
    assert proc.stdout == (
        "manifests/gone.yaml is no longer in the plans: its link is removed; the objects it "
        "made stay in the cluster (delete them with kubectl delete -f <a copy of it>)\n"
    )
    # nothing planned is touched, and a second run finds nothing
    again = subprocess.run(
        ["bash", str(tmp_path / "prune.sh"), str(d), "hello.yaml"],
        capture_output=True, text=True, check=False,
    )
    assert (again.returncode, again.stdout) == (0, "")


def test_the_prune_unit_runs_before_k3s_with_the_planned_names(example_dir: Path) -> None:
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(load(example_dir), out)
    unit = container_config(out, "olaf", ".systemd.services.k3s-manifests-prune")
    assert isinstance(unit, dict)
    assert unit["before"] == ["k3s.service"] and unit["wantedBy"] == ["multi-user.target"]
    assert unit["serviceConfig"] == {"Type": "oneshot", "RemainAfterExit": True}
    argv = shlex.split(str(unit["script"]))
    assert argv[2].endswith("-k3s-manifests-prune.sh")
    assert argv[3:] == ["/var/lib/rancher/k3s/server/manifests", "hello.yaml"]
    # the names it keeps are the links nixpkgs makes (target = the file's name)
    manifests = container_config(out, "olaf", ".services.k3s.manifests")
    assert isinstance(manifests, dict)
    assert [m["target"] for m in manifests.values()] == argv[4:]


def test_the_prune_keeps_every_link_the_containers_nixos_makes(
    example_dir: Path, tmp_path: Path
) -> None:
    # A nixConfigs/<k3s name>.nix may add services.k3s.manifests of its own (any target),
    # and from 25.05 nixpkgs links autoDeployCharts' manifests through its tmpfiles rules
    # (rancher/default.nix: "${manifestDir}/${target}"."L+"), outside services.k3s.manifests:
    # the prune must keep them all, or it deletes at every boot what tmpfiles just linked.
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(load(example_dir), out)
    mdir = "/var/lib/rancher/k3s/server/manifests"
    merged = f"""c: c // {{
      services.k3s.manifests = c.services.k3s.manifests // {{
        mine = {{ source = "/nix/store/cccc-mine.yaml"; target = "own-name.yaml"; }};
      }};
      systemd.tmpfiles.settings."10-k3s" = {{
        "{mdir}/ingress.yaml"."L+".argument = "/nix/store/dddd-auto-deploy-chart-ingress";
        "/var/lib/rancher/k3s/server/static/charts/ingress.tgz"."L+".argument = "/nix/store/e";
      }};
    }}"""
    unit = container_config(out, "olaf", ".systemd.services.k3s-manifests-prune", merged=merged)
    assert isinstance(unit, dict)
    keep = shlex.split(str(unit["script"]))[4:]
    assert sorted(set(keep)) == ["hello.yaml", "ingress.yaml", "own-name.yaml"]
    # and the script, given those names, leaves those links in place
    proc, d = _prune(tmp_path, keep)
    for name in ("own-name.yaml", "ingress.yaml"):
        (d / name).symlink_to(f"/nix/store/ffff-{name}")
    proc = subprocess.run(
        ["bash", str(tmp_path / "prune.sh"), str(d), *keep],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in d.iterdir())
    assert names == ["coredns.yaml", "hello.yaml", "ingress.yaml", "mine.yaml", "own-name.yaml"]


def test_preview_and_up_warn_about_a_manifest_that_left_the_plans(
    example_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_components import run_program

    render_dir = example_dir / ".k3scluster" / "mock"
    render_to_dir(load(example_dir), render_dir)  # the last render had hello.yaml
    (example_dir / "manifests" / "hello.yaml").unlink()
    said: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda msg, *a, **k: said.append(str(msg)))
    run_program(example_dir, "python", renderDir=str(render_dir), waitReady="false")
    gone = [m for m in said if m.startswith("manifests/hello.yaml is no longer in the plans")]
    assert len(gone) == 1 and "its objects stay in the cluster" in gone[0]
    # once a render without it is written (the up), nothing more is said
    assert removed_manifests(load(example_dir), render_dir) == ["hello.yaml"]
    render_to_dir(load(example_dir), render_dir)
    assert removed_manifests(load(example_dir), render_dir) == []


# -- secrets a host no longer needs ---------------------------------------------------------
# colmena uploads deployment.keys but never deletes one the hive stops naming: an agent-only
# host that got the server token before agents had a token of their own (or while it was a
# server) would keep it on its disk.


def _tmpfiles_rules(out: Path, host: str) -> list[str]:
    rules = module_config(out, "base", host, ".systemd.tmpfiles.rules")
    assert isinstance(rules, list)
    return [str(r) for r in rules]


@pytest.mark.parametrize("agent_token", [True, False], ids=["agent-token", "no-agent-token"])
def test_hosts_without_a_server_remove_the_server_token_they_kept(
    example_dir: Path, tmp_path: Path, agent_token: bool
) -> None:
    # without secrets/agent-token (a cluster made before it), the file in agent-secrets is
    # the server token an agent joins with: it stays, the one in secrets/ still goes
    if not agent_token:
        (example_dir / "secrets" / "agent-token").unlink()
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(load(example_dir), out)
    token = "/var/lib/k3scluster/secrets/k3s-token"
    agent_token = "/var/lib/k3scluster/agent-secrets/k3s-agent-token"
    removes = {
        host: sorted(r.split()[1] for r in _tmpfiles_rules(out, host) if r.startswith("r "))
        for host in ("olaf", "rolf", "karl", "ulrich")  # server+agent, server, agent, none
    }
    assert removes == {"olaf": [], "rolf": [], "karl": [token], "ulrich": [agent_token, token]}

    # the rules as systemd-tmpfiles applies them (--root: a directory standing in for /):
    # the server token goes, every other file stays
    root = tmp_path / "root"
    for rel in ("secrets/k3s-token", "secrets/passwd-manfred", "agent-secrets/k3s-agent-token"):
        f = root / "var/lib/k3scluster" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x\n")
    conf = tmp_path / "k3scluster.conf"
    conf.write_text("\n".join(_tmpfiles_rules(out, "karl")) + "\n")
    proc = subprocess.run(
        ["systemd-tmpfiles", "--create", "--remove", f"--root={root}", str(conf)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == [
        "var/lib/k3scluster/agent-secrets/k3s-agent-token",
        "var/lib/k3scluster/secrets/passwd-manfred",
    ]
