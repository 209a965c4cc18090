"""argv builders (k3scluster.commands): exact argv lists, no shell, bad values refused."""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from k3scluster import commands
from k3scluster.errors import K3sClusterError

IP = ipaddress.IPv4Address("10.0.100.2")


def test_colmena_apply_one_host() -> None:
    argv = commands.colmena_apply("colmena", Path("/r/hive.nix"), "olaf")
    assert argv == ["colmena", "apply", "switch", "--on", "olaf", "-f", "/r/hive.nix"]


def test_colmena_apply_goal_and_parallel() -> None:
    argv = commands.colmena_apply("/bin/colmena", Path("/r/hive.nix"), "karl", goal="boot",
                                  parallel=3)
    assert argv == ["/bin/colmena", "apply", "boot", "--on", "karl", "-f", "/r/hive.nix",
                    "-p", "3"]


@pytest.mark.parametrize("host", ["", "-p", "a,b", "@tag", "x*", "a b"])
def test_colmena_apply_refuses_what_colmena_would_read_as_a_filter(host: str) -> None:
    with pytest.raises(K3sClusterError):
        commands.colmena_apply("colmena", Path("/r/hive.nix"), host)


def test_colmena_apply_refuses_bad_goal_and_parallel() -> None:
    with pytest.raises(K3sClusterError):
        commands.colmena_apply("colmena", Path("h"), "olaf", goal="switch; reboot")
    with pytest.raises(K3sClusterError, match="at least 1"):
        commands.colmena_apply("colmena", Path("h"), "olaf", parallel=0)


def test_ssh_cat() -> None:
    argv = commands.ssh_cat("root", IP, "/etc/nixos/hardware-configuration.nix")
    assert argv == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15",
        "-o", "StrictHostKeyChecking=accept-new",
        "root@10.0.100.2", "cat", "--", "/etc/nixos/hardware-configuration.nix",
    ]


def _ssh_resolves(config: Path, home: Path) -> dict[str, list[str]]:
    """What the real ssh makes of colmena 0.4.0's options plus ``-F config`` (``ssh -G``
    prints the settings it would use and connects nowhere)."""
    proc = subprocess.run(
        ["ssh", "-G", f"root@{IP}", "-o", "StrictHostKeyChecking=accept-new", "-o",
         "BatchMode=yes", "-T", "-F", str(config)],
        capture_output=True, text=True, check=True, env={**os.environ, "HOME": str(home)},
    )
    seen: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        seen.setdefault(key, []).append(value)
    return seen


@pytest.mark.skipif(not shutil.which("ssh"), reason="needs OpenSSH's ssh")
def test_colmena_ssh_config_gives_the_stack_files_and_keeps_the_users_config(
    tmp_path: Path,
) -> None:
    kh, key = tmp_path / "stack-known_hosts", tmp_path / "id_stack"
    text = commands.colmena_ssh_config(commands.SshSettings("root", key, kh))
    assert text is not None
    config = tmp_path / "colmena-ssh_config"
    config.write_text(text)
    # the user's own configuration: its port stays, its known_hosts file does not win
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host {IP}\n  Port 2222\n  UserKnownHostsFile {home}/.ssh/known_hosts\n"
    )
    seen = _ssh_resolves(config, home)
    assert seen["userknownhostsfile"] == [str(kh)]
    assert seen["identityfile"] == [str(key)]
    assert seen["identitiesonly"] == ["yes"]
    assert seen["port"] == ["2222"]


def test_colmena_ssh_config_needs_a_known_hosts_file_and_refuses_odd_paths() -> None:
    assert commands.colmena_ssh_config(commands.SshSettings("root", Path("/k/id"))) is None
    without_key = commands.colmena_ssh_config(commands.SshSettings("root", None, Path("/k/kh")))
    assert without_key is not None and "IdentityFile" not in without_key
    with pytest.raises(K3sClusterError, match="sshKnownHosts"):
        commands.colmena_ssh_config(commands.SshSettings("root", None, Path("/k/a b")))


def test_ssh_cat_identity_and_known_hosts() -> None:
    argv = commands.ssh_cat(
        "root", IP, "/x", identity=Path("/k/id_ed25519"), known_hosts=Path("/k/known_hosts")
    )
    assert argv == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15",
        "-o", "StrictHostKeyChecking=accept-new",
        "-i", "/k/id_ed25519", "-o", "IdentitiesOnly=yes",
        "-o", "UserKnownHostsFile=/k/known_hosts",
        "root@10.0.100.2", "cat", "--", "/x",
    ]
    only_key = commands.ssh_cat("root", IP, "/x", identity=Path("/k/id"))
    assert only_key[7:11] == ["-i", "/k/id", "-o", "IdentitiesOnly=yes"]
    assert not any(a.startswith("UserKnownHostsFile") for a in only_key)
    only_kh = commands.ssh_cat("root", IP, "/x", known_hosts=Path("/k/kh"))
    assert only_kh[7:9] == ["-o", "UserKnownHostsFile=/k/kh"]
    assert "-i" not in only_kh and "IdentitiesOnly=yes" not in only_kh


@pytest.mark.parametrize(
    "path", ["/k/my key", "/k/id%h", "~/.ssh/id", "/k/a\"b", "/k/a'b", "/k/a\\b", "-oX"]
)
def test_ssh_cat_refuses_key_files_ssh_would_split_or_expand(path: str) -> None:
    with pytest.raises(K3sClusterError, match="sshIdentity"):
        commands.ssh_cat("root", IP, "/x", identity=Path(path))
    with pytest.raises(K3sClusterError, match="sshKnownHosts"):
        commands.ssh_cat("root", IP, "/x", known_hosts=Path(path))


def test_ssh_cat_quotes_the_remote_path_for_the_remote_shell() -> None:
    argv = commands.ssh_cat("root", IP, "/srv/my file;$(x)")
    assert argv[-3:] == ["cat", "--", "'/srv/my file;$(x)'"]
    assert shlex.split(" ".join(argv[-3:])) == ["cat", "--", "/srv/my file;$(x)"]


def test_ssh_cat_refusals() -> None:
    with pytest.raises(K3sClusterError):
        commands.ssh_cat("-oProxyCommand=x", IP, "/x")
    with pytest.raises(K3sClusterError):
        commands.ssh_cat("root", IP, "relative/path")


def test_fetch_hardware_config_runs_the_hardware_task() -> None:
    out = Path("../c/nixConfigs/olaf.hardware.nix")
    argv = commands.fetch_hardware_config("py", IP, commands.SshSettings(), out, wait=90)
    assert argv == [
        "py", "-m", "k3scluster.components.tasks", "hardware", "--ip", "10.0.100.2",
        "--ssh-user", "root", "--out", "../c/nixConfigs/olaf.hardware.nix", "--wait", "90",
    ]


def test_fetch_hardware_config_passes_key_and_known_hosts_files_as_recorded() -> None:
    # "~" stays in the recorded argv: the task expands it for whoever runs the step
    ssh = commands.SshSettings("admin", Path("~/.ssh/id_ed25519"), Path("../c/known_hosts"))
    argv = commands.fetch_hardware_config("py", IP, ssh, Path("x.hardware.nix"))
    assert argv[4:12] == [
        "--ip", "10.0.100.2", "--ssh-user", "admin", "--ssh-identity", "~/.ssh/id_ed25519",
        "--ssh-known-hosts", "../c/known_hosts",
    ]


def test_render_tree_uses_the_cli() -> None:
    assert commands.render_tree("/py", Path("/c"), Path("/c/.k3scluster/s")) == [
        "/py", "-m", "k3scluster", "render", "/c", "--out", "/c/.k3scluster/s"
    ]


def test_build_iso_and_notice() -> None:
    assert commands.build_iso("/py", Path("/l"), ["nix", "build"]) == [
        "/py", "-m", "k3scluster.components.tasks", "iso", "--result", "/l", "--", "nix", "build"
    ]
    assert commands.notice("gone; not wiped") == ["echo", "gone; not wiped"]
