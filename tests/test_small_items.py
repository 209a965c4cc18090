"""The smaller findings of the third reading (issue 19, item 6), one test each."""

from __future__ import annotations

from pathlib import Path

from nixeval import module_config

from k3scluster import diagram, plans
from k3scluster.model import Cluster
from k3scluster.render import cluster_data, render_to_dir


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
