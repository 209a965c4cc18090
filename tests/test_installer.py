"""The installer files render for every example host, parse, and carry no secret."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from k3scluster import plans
from k3scluster.bootdisk import boot_disk_rules
from k3scluster.errors import K3sClusterError
from k3scluster.installer import (
    INSTALLER_FILES,
    find_iso,
    installer_inputs,
    iso_build_argv,
    iso_out_link,
    render_installer,
)

EXAMPLE_HOSTS = ("olaf", "ulf", "rolf", "karl", "ulrich")


@pytest.fixture(scope="module")
def cluster():
    root = Path(__file__).resolve().parent.parent / "examples" / "cluster"
    result = plans.load(root)
    assert result.cluster is not None, result.diagnostics
    return result.cluster


def _write(files: dict[str, str], out: Path) -> None:
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_example_hosts_are_all_covered(cluster):
    assert tuple(h.name for h in cluster.hosts) == EXAMPLE_HOSTS


@pytest.mark.parametrize("host", EXAMPLE_HOSTS)
def test_renders_parses_and_checks(cluster, host, tmp_path):
    files = render_installer(cluster, host, tmp_path)
    assert sorted(files) == sorted(f"installers/{host}/{f}" for f in INSTALLER_FILES)
    _write(files, tmp_path)
    base = tmp_path / "installers" / host
    for nix in ("default.nix", "iso.nix"):
        r = subprocess.run(
            ["nix-instantiate", "--parse", str(base / nix)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, r.stderr
    r = subprocess.run(
        ["bash", "-n", str(base / "system-setup.sh")], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(
            ["shellcheck", str(base / "system-setup.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, r.stdout
    h = cluster.host(host)
    data = json.loads(files[f"installers/{host}/installer.json"])
    rules = "\n".join(boot_disk_rules(h)) + "\n" if boot_disk_rules(h) else ""
    assert data == {"host": host, "boot": h.boot.value, "serial": h.disk or "", "udevRules": rules}


@pytest.mark.parametrize("host", EXAMPLE_HOSTS)
def test_no_secret_in_the_installer(cluster, host, tmp_path):
    files = render_installer(cluster, host, tmp_path)
    secrets = cluster.root / "secrets"
    needles = []
    for f in sorted(secrets.iterdir()):
        if f.name == "token" or f.name.endswith("passwd"):
            for line in f.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    needles.append(line)
                    # a passwd line user:hash -> the hash alone too
                    needles.extend(p for p in line.split(":") if len(p) > 12)
    assert needles, "the example has secrets to look for"
    for rel, text in files.items():
        for needle in needles:
            assert needle not in text, f"a secret from secrets/ is in {rel}"
        assert "secrets/" not in text and "deployment.keys" not in text, rel


def test_iso_module_evaluates(cluster, tmp_path):
    """iso.nix, called as the module system calls it, gives the unit and the store contents."""
    _write(render_installer(cluster, "rolf", tmp_path), tmp_path)
    base = tmp_path / "installers" / "rolf"
    expr = """
      let
        names = [ "bash" "coreutils" "util-linux" "parted" "dosfstools" "e2fsprogs" "gnugrep"
                  "gnused" "gawk" "findutils" ];
        # only these: a tool the module took from anywhere else fails the evaluation
        pkgs = builtins.listToAttrs (map (n: { name = n; value = "/nix/store/p-${n}"; }) names);
        lib = { mkForce = v: { forced = v; }; mkIf = c: v: { _if = c; value = v; };
                concatStringsSep = builtins.concatStringsSep; };
        m = import ./iso.nix {
          inherit pkgs lib;
          config = { systemd.package = "/nix/store/p-systemd"; nix.package = "/nix/store/p-nix";
                     system.build.nixos-install = "/nix/store/p-nixos-install"; };
          k3sclusterTarget = "/nix/store/abc-nixos-system-rolf";
          k3sclusterGrubDevices = [ "/dev/k3scluster-bootdisk" ];
        };
      in {
        store = m.isoImage.storeContents;
        unit = m.systemd.services.system_setup;
        ssh = m.services.openssh.enable;
        root = m.users.users.root.initialHashedPassword;
        nixos = m.users.users.nixos.initialHashedPassword;
        autologin = m.services.getty.autologinUser;
        host = m.networking.hostName;
        help = m.services.getty.helpLine;
        nm = m.networking.networkmanager.enable;
        log = m.systemd.services.k3scluster-log;
      }
    """
    r = subprocess.run(
        ["nix-instantiate", "--readonly-mode", "--eval", "--strict", "--json", "-E", expr],
        cwd=base,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["store"] == ["/nix/store/abc-nixos-system-rolf"]
    unit = v["unit"]
    assert unit["wantedBy"] == ["multi-user.target"]
    # issue 19 item 6: no deprecated systemd-udev-settle.service; the script settles udev
    # itself before it looks for the disk
    assert unit["after"] == ["local-fs.target", "systemd-udevd.service"]
    assert "wants" not in unit and "requires" not in unit
    script = (base / "system-setup.sh").read_text()
    settle = script.index("udevadm settle --timeout=120")
    # before either way of finding the disk (by id, by label)
    assert settle < script.index('step find-disk "') < script.index('step find-partitions "')
    assert unit["environment"] == {
        "SYSTEM": "/nix/store/abc-nixos-system-rolf",
        "GRUB_DEVICES": "/dev/k3scluster-bootdisk",
        "POWEROFF_ON_FAILURE": "0",  # a machine's image stays up after a failure
    }
    # a VM stack's image powers off after a failure too (the lab sees it at once)
    _write(render_installer(cluster, "rolf", tmp_path, vm=True), tmp_path)
    again = subprocess.run(
        ["nix-instantiate", "--readonly-mode", "--eval", "--strict", "--json", "-E", expr],
        cwd=base, capture_output=True, text=True, check=False,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["unit"]["environment"]["POWEROFF_ON_FAILURE"] == "1"
    sc = unit["serviceConfig"]
    assert sc["Type"] == "oneshot"
    assert sc["StandardOutput"] == "journal+console" == sc["StandardError"]
    assert sc["ExecStart"].startswith("/nix/store/p-bash/bin/bash /nix/store/")
    assert sc["ExecStart"].endswith("-system-setup.sh")
    # the tools come from the image's own configuration: its nixos-install, systemd and nix
    assert "/nix/store/p-nixos-install" in unit["path"]
    assert "/nix/store/p-systemd" in unit["path"] and "/nix/store/p-nix" in unit["path"]
    # nobody can log in: the help points at the log on tty8, not at journalctl
    help_text = v["help"]["forced"]
    assert "journalctl" not in help_text and "Alt+F8" in help_text
    assert "remove the stick and power on" in help_text
    log = v["log"]
    assert log["wantedBy"] == ["multi-user.target"]
    assert log["serviceConfig"]["TTYPath"] == "/dev/tty8"
    assert log["serviceConfig"]["StandardOutput"] == "tty"
    assert log["serviceConfig"]["ExecStart"].startswith("/nix/store/p-systemd/bin/journalctl ")
    assert "--unit=system_setup.service" in log["serviceConfig"]["ExecStart"]
    assert v["ssh"] == {"forced": False}
    assert v["root"] == {"forced": "!"} and v["nixos"] == {"forced": "!"}
    assert v["autologin"] == {"forced": None}
    assert v["host"] == {"forced": "rolf-installer"}
    assert v["nm"] == {"forced": False}  # the installer profile turns NetworkManager on


def test_default_nix_builds_from_the_hive_with_the_minimal_installer(cluster, tmp_path):
    text = render_installer(cluster, "olaf", tmp_path)["installers/olaf/default.nix"]
    assert "import ../../hive.nix" in text
    assert '(pkgs.path + "/nixos/modules/installer/cd-dvd/installation-cd-minimal.nix")' in text
    assert "installer.config.system.build.isoImage" in text
    assert "(evalNode cfg.host [ ]).config" in text
    assert "target = node.system.build.toplevel;" in text
    assert "node.boot.loader.grub.mirroredBoots" in text


def test_unknown_host(cluster, tmp_path):
    with pytest.raises(K3sClusterError, match="no host 'nobody'"):
        render_installer(cluster, "nobody", tmp_path)


def test_iso_build_argv_and_result(tmp_path):
    render = tmp_path / ".k3scluster" / "render"
    argv = iso_build_argv("/usr/bin/nix", render, "olaf")
    assert argv[0] == "/usr/bin/nix"
    assert argv[argv.index("--file") + 1] == f"{render}/installers/olaf"
    link = iso_out_link(render, "olaf")
    assert link == tmp_path / ".k3scluster" / "render-iso" / "olaf"
    assert argv[argv.index("--out-link") + 1] == str(link)
    assert "nix-command" in argv and "build" in argv
    with pytest.raises(K3sClusterError, match="found 0"):
        find_iso(link)
    (link / "iso").mkdir(parents=True)
    (link / "iso" / "nixos-25.05-x86_64-linux.iso").write_bytes(b"iso")
    assert find_iso(link).name == "nixos-25.05-x86_64-linux.iso"


def test_installer_inputs(cluster, tmp_path):
    files = {"hive.nix": "hive", "cluster.json": "{}", "hosts/olaf.nix": "olaf"}
    files.update(render_installer(cluster, "olaf", tmp_path))
    files.update(render_installer(cluster, "ulf", tmp_path))
    inputs = installer_inputs(files, "olaf")
    assert "hive.nix" in inputs and "installers/olaf/iso.nix" in inputs
    assert not any(k.startswith("installers/ulf/") for k in inputs)
    changed = dict(files, **{"hosts/olaf.nix": "olaf v2"})
    assert installer_inputs(changed, "olaf")["hosts/olaf.nix"] != inputs["hosts/olaf.nix"]
    other = dict(files, **{"installers/ulf/iso.nix": "changed"})
    assert installer_inputs(other, "olaf") == inputs
    with pytest.raises(K3sClusterError, match="no installer for 'karl'"):
        installer_inputs(files, "karl")
