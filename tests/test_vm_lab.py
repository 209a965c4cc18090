"""The VM lab's pure parts: names, MACs, settings, the overlap check, QEMU argv, the .link.

No QEMU runs here (tests/test_vm_engine.py runs it); everything is computed from plans.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from pathlib import Path

import pytest

from k3scluster import commands, macs
from k3scluster.errors import K3sClusterError
from k3scluster.lab import ctl, machine, netcheck, network, process, qemu
from k3scluster.lab import spec as lab
from k3scluster.plans import load_or_raise
from k3scluster.render import render_files

pytestmark = pytest.mark.vm


def _load(d: Path):  # type: ignore[no-untyped-def]
    cluster, _ = load_or_raise(d)
    return cluster


def _settings(tmp_path: Path, **kw: object) -> lab.VmSettings:
    return lab.VmSettings(stack="test-vms", lab_dir=lab.lab_dir(tmp_path / "r"), **kw)  # type: ignore[arg-type]


# -- names and MACs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stack", ["test-vms", "a", "A-very-long-stack-name-with-CAPS_and_more", "x" * 200]
)
def test_bridge_and_tap_names_fit_the_kernel_limit_and_are_stable(stack: str) -> None:
    for name in (lab.bridge_name(stack), lab.tap_name(stack, "a-long-host-name")):
        assert 0 < len(name) <= 15
        assert re.fullmatch(r"[a-z0-9-]+", name)
    assert lab.bridge_name(stack).startswith("k3b-") and lab.tap_name(stack, "o").startswith("k3t-")


def test_bridge_and_tap_names_are_pinned() -> None:
    """A change of the derivation would rename every existing lab's links (and strand them):
    the names of today, written out."""
    assert lab.bridge_name("test-vms") == "k3b-testvm-b650"
    assert lab.tap_name("test-vms", "olaf") == "k3t-olaf-e93a"
    assert lab.bridge_name("x" * 200) == "k3b-xxxxxx-af01"
    assert lab.tap_name("A-very-long-stack-name-with-CAPS_and_more", "a-long-host-name") == (
        "k3t-alongh-c452"
    )


def test_names_differ_between_stacks_and_hosts() -> None:
    assert lab.bridge_name("test-vms") != lab.bridge_name("test-vms2")
    taps = {lab.tap_name(s, h) for s in ("a", "b") for h in ("olaf", "olaf2", "ulf")}
    assert len(taps) == 6


def test_vm_mac_is_stable_locally_administered_unicast_and_distinct() -> None:
    seen = set()
    for stack in ("test-vms", "other"):
        for host in ("olaf", "ulf", "rolf", "karl", "ulrich"):
            mac = macs.vm_mac(stack, host)
            assert mac == macs.vm_mac(stack, host)
            assert macs.is_locally_administered(mac), mac
            seen.add(mac)
    assert len(seen) == 10
    # pinned: a change of the derivation would rename every rehearsal's NIC
    assert macs.vm_mac("test-vms", "olaf") == "92:93:e9:7b:4d:a7"
    assert macs.vm_mac("other", "ulf") == "ee:8a:de:89:8f:79"
    assert not macs.is_locally_administered("00:11:22:33:44:55")
    assert not macs.is_locally_administered("03:11:22:33:44:55")  # multicast


# -- settings and specs --------------------------------------------------------------------


def test_settings_refuse_bad_values(tmp_path: Path) -> None:
    with pytest.raises(K3sClusterError, match="vmAccel"):
        _settings(tmp_path, accel="xen")
    with pytest.raises(K3sClusterError, match="vmMemory"):
        _settings(tmp_path, memory_mib=16)
    with pytest.raises(K3sClusterError, match="vmCpus"):
        _settings(tmp_path, cpus=0)
    defaults = _settings(tmp_path)
    assert defaults.memory_mib >= 2048 and defaults.cpus >= 2  # a K3s server fits


def test_one_spec_per_host_with_plan_serial_boot_and_ip(example_dir: Path, tmp_path: Path) -> None:
    c = _load(example_dir)
    specs = lab.vm_specs(c, _settings(tmp_path), {h.name: f"/iso/{h.name}" for h in c.hosts})
    assert [s.host for s in specs] == [h.name for h in c.hosts]
    olaf = specs[0]
    assert olaf.serial == c.host("olaf").disk and olaf.boot == "efi" and olaf.ip == "10.0.100.2"
    assert specs[2].boot == "bios"
    assert olaf.mac == macs.vm_mac("test-vms", "olaf")
    assert olaf.dir == str(tmp_path / "r-lab" / "olaf")
    assert lab.VmSpec.from_json(olaf.to_json()) == olaf


def test_per_host_columns_override_the_stack(example_dir: Path, tmp_path: Path) -> None:
    csv = example_dir / "plans" / "hosts.csv"
    lines = csv.read_text().splitlines()
    lines[0] += ",vmMemory,vmCpus,vmDiskSize"
    lines[1] += ",8192,4,64"
    lines[2:] = [line + ",,," for line in lines[2:]]
    csv.write_text("\n".join(lines) + "\n")
    c = _load(example_dir)
    specs = lab.vm_specs(c, _settings(tmp_path), {h.name: "/iso" for h in c.hosts})
    assert (specs[0].memory_mib, specs[0].cpus, specs[0].disk_gib) == (8192, 4, 64)
    assert (specs[1].memory_mib, specs[1].cpus) == (lab.DEFAULT_MEMORY_MIB, lab.DEFAULT_CPUS)


def test_bad_per_host_override_names_file_and_line(example_dir: Path, tmp_path: Path) -> None:
    csv = example_dir / "plans" / "hosts.csv"
    lines = csv.read_text().splitlines()
    lines[0] += ",vmMemory"
    lines[1] += ",lots"
    lines[2:] = [line + "," for line in lines[2:]]
    csv.write_text("\n".join(lines) + "\n")
    c = _load(example_dir)
    with pytest.raises(K3sClusterError, match=r"plans/hosts.csv:2: host olaf: vmMemory"):
        lab.vm_specs(c, _settings(tmp_path), {h.name: "/iso" for h in c.hosts})


def test_a_serial_too_long_for_virtio_is_refused_at_its_line(
    example_dir: Path, tmp_path: Path
) -> None:
    csv = example_dir / "plans" / "hosts.csv"
    csv.write_text(csv.read_text().replace("S4EVNX0R123456", "S4EVNX0R1234567890ABCDEF"))
    c = _load(example_dir)
    with pytest.raises(K3sClusterError, match=r"plans/hosts.csv:2: host olaf: disk serial .* 24 bytes"):
        lab.vm_specs(c, _settings(tmp_path), {h.name: "/iso" for h in c.hosts})


def test_a_change_of_machine_identity_replaces_but_memory_does_not(
    example_dir: Path, tmp_path: Path
) -> None:
    c = _load(example_dir)
    s = lab.vm_specs(c, _settings(tmp_path), {h.name: "/iso" for h in c.hosts})[0]
    assert dataclasses.replace(s, memory_mib=1).replace_keys() == s.replace_keys()
    # the IP too: the installed system carries it, and the lab waits for the VM there
    for change in ({"serial": "other"}, {"boot": "bios"}, {"disk_gib": 1}, {"mac": "x"},
                   {"ip": "10.0.100.99"}):
        assert dataclasses.replace(s, **change).replace_keys() != s.replace_keys()  # type: ignore[arg-type]


# -- the overlap check -----------------------------------------------------------------------

ROUTES = [
    {"dst": "default", "gateway": "192.168.1.1", "dev": "eth0"},
    {"dst": "192.168.1.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link"},
    {"dst": "10.0.0.0/16", "dev": "wg0"},
]
ADDRS = [
    {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
    {"ifname": "eth0", "addr_info": [
        {"family": "inet", "local": "192.168.1.20", "prefixlen": 24},
        {"family": "inet6", "local": "fe80::1", "prefixlen": 64},
    ]},
]


def test_overlap_with_a_route_or_an_address_is_found() -> None:
    net = ipaddress.IPv4Network
    assert netcheck.conflicts(net("10.0.100.0/24"), ROUTES, ADDRS) == ["route 10.0.0.0/16 dev wg0"]
    found = netcheck.conflicts(net("192.168.0.0/16"), ROUTES, ADDRS)
    assert found == ["route 192.168.1.0/24 dev eth0", "address 192.168.1.20/24 on eth0"]
    # the default route overlaps everything and is not counted
    assert netcheck.conflicts(net("172.30.0.0/24"), ROUTES, ADDRS) == []


def test_the_stacks_own_bridge_is_not_an_overlap() -> None:
    links = [
        {"ifname": "k3b-x", "ifalias": "k3scluster:s"},
        {"ifname": "tap1", "master": "k3b-x"},
        {"ifname": "k3b-y"},
    ]
    assert netcheck.own_links(links, "k3b-x", "k3scluster:s") == ["k3b-x", "tap1"]
    assert netcheck.own_links(links, "k3b-y", "k3scluster:s") == []  # no alias: not ours
    routes = [{"dst": "10.0.100.0/24", "dev": "k3b-x"}]
    assert netcheck.conflicts(ipaddress.IPv4Network("10.0.100.0/24"), routes, [], ["k3b-x"]) == []
    assert netcheck.conflicts(ipaddress.IPv4Network("10.0.100.0/24"), routes, [], []) != []


# -- QEMU argv -----------------------------------------------------------------------------


def _spec(example_dir: Path, tmp_path: Path, host: str) -> lab.VmSpec:
    c = _load(example_dir)
    specs = lab.vm_specs(c, _settings(tmp_path), {h.name: "/iso" for h in c.hosts})
    return next(s for s in specs if s.host == host)


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_install_argv_boots_the_iso_once_with_the_serial_and_mac(
    example_dir: Path, tmp_path: Path
) -> None:
    s = _spec(example_dir, tmp_path, "olaf")
    fw = qemu.Ovmf(Path("/fw/CODE.fd"), Path("/fw/VARS.fd"))
    argv = qemu.vm_argv(s, "tcg", ovmf=fw, iso=Path("/iso/olaf.iso"))
    devices = _opt(argv, "-device")
    assert f"virtio-blk-pci,drive=disk,bootindex=2,serial={s.serial}" in devices
    assert f"virtio-net-pci,netdev=net,mac={s.mac}" in devices
    assert "ide-cd,drive=cd,bus=ide.1,bootindex=1" in devices
    assert "virtio-rng-pci,rng=rng" in devices
    assert "-no-reboot" in argv and "-daemonize" in argv
    drives = _opt(argv, "-drive")
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd" in drives
    assert f"if=pflash,format=raw,unit=1,file={s.dir}/efivars.fd" in drives
    assert _opt(argv, "-accel") == ["tcg"] and "-cpu" not in argv
    assert _opt(argv, "-netdev") == [f"tap,id=net,ifname={s.tap},script=no,downscript=no"]
    assert _opt(argv, "-pidfile") == [f"{s.dir}/qemu.pid"]
    assert _opt(argv, "-qmp") == [f"unix:{s.dir}/qmp.sock,server=on,wait=off"]


def test_disk_boot_has_no_iso_and_bios_has_no_pflash(example_dir: Path, tmp_path: Path) -> None:
    s = _spec(example_dir, tmp_path, "rolf")
    argv = qemu.vm_argv(s, "kvm", ovmf=None, iso=None)
    assert not any("cdrom" in a or "pflash" in a for a in argv)
    assert "-no-reboot" not in argv
    assert _opt(argv, "-cpu") == ["host"]
    assert f"virtio-blk-pci,drive=disk,bootindex=1,serial={s.serial}" in _opt(argv, "-device")
    # a host without a serial gets a disk without one
    karl = _spec(example_dir, tmp_path, "karl")
    assert "virtio-blk-pci,drive=disk,bootindex=1" in _opt(
        qemu.vm_argv(karl, "tcg", ovmf=qemu.Ovmf(Path("/c"), Path("/v")), iso=None), "-device"
    )


def test_commas_in_paths_are_escaped_for_qemu(example_dir: Path, tmp_path: Path) -> None:
    s = dataclasses.replace(_spec(example_dir, tmp_path, "rolf"), dir="/lab,x/rolf")
    assert "if=none,id=disk,format=qcow2,file=/lab,,x/rolf/disk.qcow2" in _opt(
        qemu.vm_argv(s, "tcg", ovmf=None, iso=None), "-drive"
    )


def test_qemu_img_argv() -> None:
    assert qemu.disk_create_argv("qemu-img", Path("/d/disk.qcow2"), 32) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "/d/disk.qcow2", "32G"
    ]


def test_ovmf_is_found_from_firmware_descriptors(tmp_path: Path) -> None:
    code, vars_ = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"c")
    vars_.write_bytes(b"v")

    def desc(name: str, features: list[str]) -> None:
        (tmp_path / name).write_text(json.dumps({
            "interface-types": ["uefi"],
            "mapping": {"device": "flash", "executable": {"filename": str(code)},
                        "nvram-template": {"filename": str(vars_)}},
            "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
            "features": features,
        }))

    desc("40-secure.json", ["secure-boot", "enrolled-keys", "requires-smm"])
    with pytest.raises(K3sClusterError, match="apt-get install ovmf"):
        qemu.find_ovmf((tmp_path,))
    desc("60-plain.json", ["acpi-s3"])
    assert qemu.find_ovmf((tmp_path,)) == qemu.Ovmf(code, vars_)


def test_accel_tcg_never_probes_and_kvm_refuses_when_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def probe(q: str, timeout: float = 0) -> tuple[bool, str]:
        calls.append(q)
        return False, "nested KVM hangs"

    monkeypatch.setattr(qemu, "kvm_works", probe)
    assert qemu.choose_accel("tcg", "qemu") == ("tcg", None) and calls == []
    accel, warning = qemu.choose_accel("auto", "qemu")
    assert accel == "tcg" and warning and "nested KVM hangs" in warning
    with pytest.raises(K3sClusterError, match="vmAccel is kvm"):
        qemu.choose_accel("kvm", "qemu")


def test_steps_call_the_lab_ctl_with_the_spec_as_one_argument(
    example_dir: Path, tmp_path: Path
) -> None:
    s = _spec(example_dir, tmp_path, "olaf")
    argv = commands.lab_ctl("/py", "vm-up", s.to_json())
    assert argv[:4] == ["/py", "-m", "k3scluster.lab.ctl", "vm-up"]
    assert lab.VmSpec.from_json(argv[-1]) == s


def test_nat_ruleset_masquerades_only_the_lab_subnet() -> None:
    net = lab.NetSpec("s", "k3b-s-1234", "10.0.100.1/24", "10.0.100.0/24", True, "n:1")
    rules = network.nat_ruleset(net)
    assert f"table ip {network.nat_table('s')}" in rules
    assert 'ip saddr 10.0.100.0/24 oifname != "k3b-s-1234" masquerade' in rules


# -- the rendered .link -------------------------------------------------------------------


def test_vm_render_names_each_nic_by_its_vm_mac(example_dir: Path) -> None:
    c = _load(example_dir)
    out = example_dir / ".k3scluster" / "render"
    plain = render_files(c, out)
    vm = render_files(c, out, lab.vm_render(c, "test-vms", out))
    for h in c.hosts:
        text = vm[f"hosts/{h.name}.nix"]
        assert 'systemd.network.links."10-k3scluster-vm-nic"' in text
        # issue 19 item 6: the permanent address and Type=ether (systemd.link(5))
        assert f'PermanentMACAddress = "{macs.vm_mac("test-vms", h.name)}";' in text
        assert 'Type = "ether";' in text and "matchConfig.MACAddress" not in text
        assert f'linkConfig.Name = "{h.interface}";' in text
        assert "systemd.network.links" not in plain[f"hosts/{h.name}.nix"]
    # only the host files differ (the installers build from them), and installer.json: a VM
    # stack's image powers off after a failure too
    assert {k for k in vm if vm[k] != plain[k]} == {
        *(f"hosts/{h.name}.nix" for h in c.hosts),
        *(f"installers/{h.name}/installer.json" for h in c.hosts),
    }
    for h in c.hosts:
        assert json.loads(vm[f"installers/{h.name}/installer.json"])["powerOffOnFailure"] is True
        assert "powerOffOnFailure" not in plain[f"installers/{h.name}/installer.json"]


# -- manifests: what delete may touch, and the listing ----------------------------------------


def _made(example_dir: Path, tmp_path: Path, host: str) -> lab.VmSpec:
    """A VM directory as vm-up leaves it (manifest, disk, console), without running QEMU."""
    s = _spec(example_dir, tmp_path, host)
    m = machine.claim(s)
    m["installed"] = True
    machine.write_manifest(s.path, m)
    for name in ("disk.qcow2", "console.log"):
        (s.path / name).write_text("x")
    return s


def test_delete_removes_exactly_the_manifests_files(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network, "delete_tap", lambda spec: None)
    s = _made(example_dir, tmp_path, "olaf")
    other = _made(example_dir, tmp_path, "ulf")
    ctl.vm_delete(s)
    assert not s.path.exists()
    assert sorted(p.name for p in other.path.iterdir()) == [
        "console.log", "disk.qcow2", lab.MARKER
    ]
    # a file the VM did not make is kept, and so is its directory
    s = _made(example_dir, tmp_path, "olaf")
    (s.path / "notes.txt").write_text("mine")
    ctl.vm_delete(s)
    assert [p.name for p in s.path.iterdir()] == ["notes.txt"]


def test_delete_refuses_a_directory_it_cannot_prove(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network, "delete_tap", lambda spec: None)
    s = _spec(example_dir, tmp_path, "olaf")
    s.path.mkdir(parents=True)
    (s.path / "disk.qcow2").write_text("someone's disk")
    with pytest.raises(K3sClusterError, match="no k3scluster-vm.json"):
        ctl.vm_delete(s)
    with pytest.raises(K3sClusterError, match="not made by k3scluster"):
        machine.claim(s)
    assert (s.path / "disk.qcow2").exists()
    # another stack's VM in the same place
    (s.path / "disk.qcow2").unlink()
    other = dataclasses.replace(s, stack="other", name=lab.guest_name("other", "olaf"))
    machine.claim(other)
    with pytest.raises(K3sClusterError, match="belongs to VM 'olaf' of lab 'other'"):
        ctl.vm_delete(s)
    assert ctl.read_manifest(s.path) is not None


def test_a_stale_pidfile_is_not_taken_for_the_vm(example_dir: Path, tmp_path: Path) -> None:
    import os

    s = _made(example_dir, tmp_path, "olaf")
    (s.path / "qemu.pid").write_text(str(os.getpid()))  # alive, but not this VM's QEMU
    assert process.running_pid(s) is None
    assert process.stop(s) is False


def test_vms_lists_state_ip_and_console(example_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from k3scluster.cli import main

    args = ["vms", str(example_dir), "--stack", "test-vms", "--render-dir", str(tmp_path / "r")]
    assert main(args) == 0
    assert "no VMs of stack test-vms" in capsys.readouterr().out
    s = _made(example_dir, tmp_path, "olaf")
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["host", "state", "ip", "mac", "console"]
    assert out[1].split() == ["olaf", "stopped", "10.0.100.2", s.mac, f"{s.dir}/console.log"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{
        "host": "olaf", "state": "stopped", "ip": "10.0.100.2", "mac": s.mac, "accel": None,
        "pid": None, "console": f"{s.dir}/console.log",
    }]
    assert main([*args, "--start", "nosuch"]) == 1
    assert "has no VM 'nosuch'" in capsys.readouterr().err


def test_vms_finds_a_vm_whose_spec_names_its_directory_relative_to_the_project(
    example_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """The steps record the VM's directory relative to the project (where they run); `vms`
    runs anywhere: it takes each VM where its manifest lies."""
    import dataclasses

    from k3scluster.cli import main

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    s = dataclasses.replace(_spec(example_dir, tmp_path, "olaf"), dir="../r-lab/olaf")
    assert s.path == tmp_path / "r-lab" / "olaf"
    made = machine.claim(s)
    assert made["spec"]["dir"] == "../r-lab/olaf"
    monkeypatch.chdir(tmp_path.parent)  # elsewhere
    args = ["vms", str(example_dir), "--stack", "test-vms", "--render-dir", str(tmp_path / "r"),
            "--json"]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["console"] == str(tmp_path / "r-lab" / "olaf" / "console.log")
    assert row["state"] == "not installed"
    # --stop finds it too (and says it was not running)
    assert main(["vms", str(example_dir), "--stack", "test-vms", "--render-dir",
                 str(tmp_path / "r"), "--stop", "olaf"]) == 0
    assert "host olaf: was not running" in capsys.readouterr().err


def test_vm_rendered_hosts_parse_as_nix(example_dir: Path, tmp_path: Path) -> None:
    import subprocess

    c = _load(example_dir)
    out = example_dir / ".k3scluster" / "render"
    vm = render_files(c, out, lab.vm_render(c, "s", out))
    for h in c.hosts:
        f = tmp_path / f"{h.name}.nix"
        f.write_text(vm[f"hosts/{h.name}.nix"])
        proc = subprocess.run(
            ["nix-instantiate", "--parse", str(f)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr


def _install_with(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, console_text: str
) -> tuple[lab.VmSpec, dict]:  # type: ignore[type-arg]
    """``machine.install`` with QEMU replaced by a writer of ``console_text`` to the console
    that is gone at once (the lab's reading of the console is what is tested here; the VM
    tests run the real thing)."""
    s = _spec(example_dir, tmp_path, "rolf")  # BIOS: no OVMF needed
    result = tmp_path / "result" / "iso"
    result.mkdir(parents=True)
    (result / "nixos.iso").write_bytes(b"iso")
    s = dataclasses.replace(s, iso_result=str(result.parent))
    m = machine.claim(s)
    console = Path(s.dir) / "console.log"
    console.write_text("an earlier boot\n")

    def fake_start(spec: lab.VmSpec, argv: list[str], what: str) -> int:
        assert "-no-reboot" in argv and f"file={result}/nixos.iso" in " ".join(argv)
        with console.open("a") as f:
            f.write(console_text)
        return 1

    monkeypatch.setattr(machine, "start", fake_start)
    monkeypatch.setattr(machine, "pid_alive", lambda pid: False)
    monkeypatch.setattr(machine, "stop", lambda spec, graceful=0: False)
    return s, m


def test_a_failed_install_shows_the_end_of_its_console_and_stays_uninstalled(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, m = _install_with(example_dir, tmp_path, monkeypatch, "".join(
        f"line {i}\n" for i in range(100)
    ) + 'ERROR in step "partition": no disk with serial wd-wcc4n1234567\n'
      + "k3scluster-install: FAILED host=rolf step=partition exit=1\n")
    with pytest.raises(K3sClusterError) as err:
        machine.install(s, m, "tcg", None)
    text = str(err.value)
    assert "host rolf: the installer failed" in text
    assert 'ERROR in step "partition"' in text and "line 99" in text
    assert "line 10\n" not in text and "an earlier boot" not in text  # the end, this boot's
    assert machine.read_manifest(Path(s.dir))["installed"] is False  # type: ignore[index]


def test_an_install_without_the_installers_ok_is_not_an_install(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QEMU that ends without the installer's last line (killed mid-install) leaves the VM
    not installed, whatever else the console says."""
    s, m = _install_with(example_dir, tmp_path, monkeypatch,
                         "system-setup[rolf] install: installing\nkilled\n")
    with pytest.raises(K3sClusterError, match="ended without the installer's"):
        machine.install(s, m, "tcg", None)
    assert machine.read_manifest(Path(s.dir))["installed"] is False  # type: ignore[index]


def test_an_earlier_installs_ok_on_the_console_does_not_count(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console log is appended to across installs: the OK of an earlier install (then
    the VM was reinstalled, or its disk replaced) must not make this install, killed
    half-way, count as installed. Only what this install's QEMU wrote is read."""
    s, m = _install_with(example_dir, tmp_path, monkeypatch,
                         "system-setup[rolf] install: installing\nkilled\n")
    console = Path(s.dir) / "console.log"
    console.write_text("k3scluster-install: OK host=rolf\nan earlier boot\n")
    with pytest.raises(K3sClusterError, match="ended without the installer's"):
        machine.install(s, m, "tcg", None)
    assert machine.read_manifest(Path(s.dir))["installed"] is False  # type: ignore[index]
    assert "k3scluster-install: OK host=rolf\n" in console.read_text()  # (still there)


def test_an_install_with_the_installers_ok_is_recorded(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, m = _install_with(example_dir, tmp_path, monkeypatch,
                         "installing\nk3scluster-install: OK host=rolf\n")
    machine.install(s, m, "tcg", None)
    assert machine.read_manifest(Path(s.dir))["installed"] is True  # type: ignore[index]
    # another host's OK is not this one's
    s2, m2 = _install_with(example_dir, tmp_path / "2", monkeypatch,
                           "k3scluster-install: OK host=olaf\n")
    with pytest.raises(K3sClusterError, match="ended without"):
        machine.install(s2, m2, "tcg", None)


def test_the_kvm_probe_gives_up_after_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nested KVM on which a guest hangs must cost seconds, not an install timeout."""
    kvm = tmp_path / "kvm"
    kvm.write_text("")
    monkeypatch.setattr(qemu, "KVM_DEVICE", kvm)
    hangs, exits, fails = (tmp_path / n for n in ("hangs", "exits", "fails"))
    hangs.write_text("#!/bin/sh\nexec sleep 30\n")
    exits.write_text(f"#!/bin/sh\nexit {qemu.PROBE_EXIT}\n")
    fails.write_text("#!/bin/sh\necho 'error: failed to set MSR 0x10a' >&2\nexit 134\n")
    for f in (hangs, exits, fails):
        f.chmod(0o755)
    ok, why = qemu.kvm_works(str(hangs), timeout=0.5)
    assert not ok and "did not finish in 0.5 s" in why
    assert qemu.kvm_works(str(exits)) == (True, "")
    assert qemu.kvm_works(str(fails)) == (False, "error: failed to set MSR 0x10a")
    monkeypatch.setattr(qemu, "KVM_DEVICE", tmp_path / "missing")
    assert qemu.kvm_works(str(exits))[0] is False
    # the probe's guest is a real one: a 64 KiB BIOS whose reset vector exits QEMU
    argv = qemu.probe_argv("qemu", Path("/p.bin"))
    assert argv[:5] == ["qemu", "-accel", "kvm", "-cpu", "host"]


def test_the_probe_guest_exits_qemu_by_itself_under_tcg(tmp_path: Path) -> None:
    import subprocess

    bios = qemu.write_probe_bios(tmp_path / "probe.bin")
    argv = qemu.probe_argv("qemu-system-x86_64", bios, accel="tcg")
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert proc.returncode == qemu.PROBE_EXIT, proc.stderr


def test_missing_tools_are_named_before_anything_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(K3sClusterError, match="needs qemu-system-x86_64, qemu-img, ip, ping"):
        qemu.require_tools("qemu-system-x86_64", "qemu-img")


def test_a_vm_renders_only_options_checked_in_every_pinned_release(
    example_dir: Path, tmp_path: Path
) -> None:
    from nixos_options import known
    from test_nixos_options import _as_options, option_paths

    from k3scluster.render import render_to_dir

    c = _load(example_dir)
    out = tmp_path / "render"
    render_to_dir(c, out, vm=lab.vm_render(c, "test-vms", out))
    seen = set()
    for host in sorted((out / "hosts").glob("*.nix")):
        for path in option_paths(host, out, host):
            seen.update(_as_options(path))
    link = ("systemd", "network", "links", "10-k3scluster-vm-nic", "matchConfig")
    assert (*link, "PermanentMACAddress") in seen and (*link, "Type") in seen
    assert ("systemd", "network", "links", "10-k3scluster-vm-nic", "linkConfig", "Name") in seen
    assert ("boot", "kernelParams") in seen
    assert sorted(".".join(p) for p in seen if known(p) is None) == []


@pytest.mark.parametrize(("setting", "works", "expected"), [
    ("auto", True, "kvm"), ("auto", False, "tcg"), ("tcg", True, "tcg"), ("kvm", True, "kvm"),
    ("kvm", False, None),
])
def test_vm_up_resolves_vm_accel_as_the_program_did(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    setting: str, works: bool, expected: str | None,
) -> None:
    """The program no longer probes KVM (a preview starts no QEMU): ctl resolves vmAccel when
    a VM starts, and `kvm` where KVM does not work is the clear error the preview gave."""
    calls: list[str] = []

    def probe(q: str, timeout: float = 0) -> tuple[bool, str]:
        calls.append(q)
        return works, "" if works else "/dev/kvm does not exist"

    monkeypatch.setattr(qemu, "kvm_works", probe)
    s = dataclasses.replace(_spec(example_dir, tmp_path, "olaf"), accel=setting)
    m: dict[str, object] = {}
    if expected is None:
        with pytest.raises(K3sClusterError, match="vmAccel is kvm, but KVM does not work"):
            machine.resolve_accel(s, m)
        assert "accel" not in m
        return
    assert machine.resolve_accel(s, m) == expected and m["accel"] == expected
    assert calls == ([] if setting == "tcg" else [s.qemu])
# -- what a VM stack learns stays in it ---------------------------------------------------


def test_a_vm_render_never_imports_the_users_hardware_file_and_adds_qemus_drivers(
    example_dir: Path,
) -> None:
    c = _load(example_dir)
    out = example_dir / ".k3scluster" / "test-vms"
    vm = lab.vm_render(c, "test-vms", out)
    files = render_files(c, out, vm)
    plain = render_files(c, out)
    ulf = files["hosts/ulf.nix"]
    assert "ulf.hardware.nix" not in ulf  # the real machine's file (the example has one)
    assert "nixConfigs/ulf.hardware.nix" in plain["hosts/ulf.nix"]
    assert "builtins.pathExists ../../test-vms-lab/ulf/hardware.nix" in ulf
    for h in c.hosts:
        assert '(modulesPath + "/profiles/qemu-guest.nix")' in files[f"hosts/{h.name}.nix"]
        assert "qemu-guest" not in plain[f"hosts/{h.name}.nix"]


def test_a_vm_hosts_inputs_follow_the_labs_hardware_file_not_nixconfigs(
    example_dir: Path,
) -> None:
    from k3scluster.render import host_inputs

    c = _load(example_dir)
    out = example_dir / ".k3scluster" / "test-vms"
    vm = lab.vm_render(c, "test-vms", out)
    files = render_files(c, out, vm)
    before = host_inputs(c, "ulf", files, vm)
    assert "vmHardware:ulf" in before
    assert not [k for k in before if k.endswith(".hardware.nix")]
    # the user's file changes: not the VM's input
    with open(example_dir / "nixConfigs" / "ulf.hardware.nix", "a") as f:
        f.write("# edited\n")
    c = _load(example_dir)
    assert host_inputs(c, "ulf", files, vm) == before
    # the lab's file appears: it is
    hw = vm.hardware_file("ulf")
    hw.parent.mkdir(parents=True)
    hw.write_text("{ ... }: { }\n")
    after = host_inputs(c, "ulf", files, vm)
    assert after["vmHardware:ulf"] != before["vmHardware:ulf"]
    # and it is the file vm-delete removes with the VM
    s = next(s for s in lab.vm_specs(c, _settings(example_dir / ".k3scluster" / "x"), {
        h.name: "/iso" for h in c.hosts}) if s.host == "ulf")
    s = dataclasses.replace(s, dir=str(hw.parent))
    assert qemu.files(s)["hardware"] == hw


def _host_key(tmp_path: Path, name: str) -> str:
    import subprocess

    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return " ".join(key.with_suffix(".pub").read_text().split()[:2])


def test_forget_host_drops_plain_and_hashed_entries_of_that_host_only(tmp_path: Path) -> None:
    import subprocess

    from k3scluster.lab.hostkeys import forget_host

    a, b = _host_key(tmp_path, "a"), _host_key(tmp_path, "b")
    plain = tmp_path / "known_hosts"
    plain.write_text(
        f"10.0.100.2 {a}\n10.0.100.20 {b}\n# a comment\n[10.0.100.2]:2222 {a}\n"
        f"10.0.100.3,10.0.100.2 {b}\n@cert-authority 10.0.100.2,10.0.100.4 {a}\n"
        f"@revoked 10.0.100.2 {b}\n"
    )
    plain.chmod(0o640)
    assert forget_host(plain, "10.0.100.2") == 5
    # a line that names another host too keeps it, with its key
    assert plain.read_text() == (
        f"10.0.100.20 {b}\n# a comment\n10.0.100.3 {b}\n@cert-authority 10.0.100.4 {a}\n"
    )
    assert plain.stat().st_mode & 0o777 == 0o640
    assert forget_host(plain, "10.0.100.2") == 0
    assert forget_host(tmp_path / "missing", "10.0.100.2") == 0
    hashed = tmp_path / "hashed"
    hashed.write_text(f"10.0.100.2 {a}\n10.0.100.20 {b}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True,
                   capture_output=True)
    assert "10.0.100" not in hashed.read_text()
    assert forget_host(hashed, "10.0.100.2") == 1
    # what is left is the other host's (ssh-keygen finds it)
    found = subprocess.run(["ssh-keygen", "-F", "10.0.100.20", "-f", str(hashed)],
                           capture_output=True, text=True, check=False)
    assert found.returncode == 0 and b.split()[1] in found.stdout


def test_delete_drops_the_vms_host_keys_and_its_hardware_file(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network, "delete_tap", lambda spec: None)
    kh = tmp_path / "known_hosts"
    other = _host_key(tmp_path, "o")
    kh.write_text(f"10.0.100.2 {_host_key(tmp_path, 'v')}\n10.0.100.3 {other}\n")
    s = dataclasses.replace(_made(example_dir, tmp_path, "olaf"), known_hosts=str(kh))
    (s.path / "hardware.nix").write_text("{ ... }: { }\n")
    ctl.vm_delete(s)
    assert not s.path.exists()
    assert kh.read_text() == f"10.0.100.3 {other}\n"


def test_every_module_file_a_render_imports_was_checked(example_dir: Path) -> None:
    """Each ``modulesPath + "/<file>"`` in a rendered host (hardware and VM stacks) is in
    tests/nixos_options.MODULE_FILES, read for every pinned release."""
    from nixos_options import MODULE_FILES, RELEASES

    c = _load(example_dir)
    out = example_dir / ".k3scluster" / "test-vms"
    seen: set[str] = set()
    for files in (render_files(c, out), render_files(c, out, lab.vm_render(c, "test-vms", out))):
        for text in files.values():
            seen.update(re.findall(r'modulesPath \+ "/([^"]+)"', text))
    assert "profiles/qemu-guest.nix" in seen
    assert sorted(seen - set(MODULE_FILES)) == []
    assert all(set(MODULE_FILES[f]) == set(RELEASES) for f in seen)


def _held_by_someone(path: Path) -> bool:
    import fcntl
    import os

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_the_vm_lock_refuses_a_second_holder(example_dir: Path, tmp_path: Path) -> None:
    from k3scluster.lab import lock

    s = _spec(example_dir, tmp_path, "rolf")
    with lock.vm_lock(s):
        assert _held_by_someone(lock.lock_path(s))
        with pytest.raises(K3sClusterError, match="another k3scluster process"), lock.vm_lock(s):
            pass
    assert not _held_by_someone(lock.lock_path(s))


def test_the_vm_lock_is_not_taken_on_a_lock_file_vm_delete_removed(
    example_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that opened the lock file while vm-delete held it, and locks it just after
    vm-delete removed it, holds a lock on a file nobody else opens: a third process makes a
    new lock file and works on the VM at the same time. The lock must be the one on the file
    at the lock's path."""
    import fcntl

    from k3scluster.lab import lock

    s = _spec(example_dir, tmp_path, "rolf")
    path = lock.lock_path(s)
    real_flock = fcntl.flock
    calls = []

    def flock_after_delete(fd: int, op: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # vm-delete ends between this process's open and its flock
            path.unlink()
        real_flock(fd, op)

    monkeypatch.setattr(lock.fcntl, "flock", flock_after_delete)
    with lock.vm_lock(s):
        monkeypatch.setattr(lock.fcntl, "flock", real_flock)
        # the third process's view: the file at the path is locked
        assert path.exists() and _held_by_someone(path)
