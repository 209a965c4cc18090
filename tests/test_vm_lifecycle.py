"""A VM stack's whole life under the real Pulumi engine, with real QEMU (TCG), inside a
network namespace the test made: the bridge, the taps, the VMs and every plan address live
there and nowhere else.

The cluster is the example's olaf (EFI) and rolf (BIOS), both with a disk serial. No NixOS
ISO can be built here, so ``k3scluster:nix`` is the stand-in ``tests/bin/nix``: it builds the
Debian test guest's ISO (tests/vmguest.py) for each host from the rendered installer files.
That guest runs the rendered ``system-setup.sh`` against its virtio disk found by serial,
makes the disk bootable and powers off; booted from its disk, it answers ping at its
planned IP. colmena is the recording stand-in (tests/bin/colmena).

One test walks the life in order (each step needs the one before; a VM install under TCG is
the slow part): up (network, ISO, install, boot from disk, deploy) → stop → start → a second
up that changes nothing → more memory for one host (it restarts, the other does not) → a
host leaves the plans (its VM and files gone, the other VM
untouched) → it comes back (installed again, the same MAC in the guest) → destroy (VMs
stopped, disks and files gone, bridge and taps gone, nothing else touched).

What the stack learns stays in the stack: each VM's hardware file is read over ssh (the
guest runs sshd with the admin's key from secrets/) into the VM's directory of the lab,
host keys go to the stack's own known_hosts (the test logs in with it, strictly), and
after destroy the cluster directory outside ``.k3scluster/<stack>*`` is byte-identical to
before, ``~/.ssh/known_hosts`` too; a hardware stack on the same directory then previews and
renders nothing of the VMs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine import PULUMI, engine_env, netns_available, require_engine
from test_pulumi_integration import STACK, Project

from k3scluster.lab.network import recorded_net
from k3scluster.lab.spec import bridge_name, lab_dir, tap_name
from k3scluster.macs import vm_mac

pytestmark = [pytest.mark.vm, pytest.mark.integration, pytest.mark.root]

ROOT = Path(__file__).resolve().parent.parent
NIX_STANDIN = ROOT / "tests" / "bin" / "nix"
HOSTS = {"olaf": ("10.0.100.2", "S4EVNX0R123456"), "rolf": ("10.0.100.4", "WD-WCC4N1234567")}
NICS = {"olaf": "enp0s20f0", "rolf": "eno2"}  # the plan's interfaces


class Namespace:
    """A network namespace of the test's own (``ip netns``): it outlives each engine run, as
    the VMs must, and everything in it is killed when the test ends."""

    def __init__(self) -> None:
        self.name = f"k3svm-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up", check=True)

    def run(
        self, *argv: str, check: bool = False, timeout: float = 1800, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True, text=True, timeout=timeout, check=check,
            stdin=subprocess.DEVNULL, **kw,
        )

    def pids(self) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def links(self) -> set[str]:
        out = self.run("ip", "-j", "link", check=True).stdout
        return {link["ifname"] for link in json.loads(out)}

    def ping(self, ip: str) -> bool:
        return self.run("ping", "-c", "1", "-W", "2", ip).returncode == 0

    def close(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    if not netns_available() or not shutil.which("qemu-system-x86_64"):
        pytest.fail("the vm tests need root, iproute2 and QEMU (scripts/setup installs them)")
    n = Namespace()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def guest() -> None:
    """The test guest, built (or taken from its cache) before any engine run: the namespace
    has no network for apt-get."""
    sys.path.insert(0, str(ROOT / "tests"))
    import vmguest

    vmguest.build_guest()


class VmProject(Project):
    def __init__(self, base: Path, ns: Namespace) -> None:
        super().__init__(base)
        self.ns = ns
        plans = self.cluster / "plans"
        lines = (plans / "hosts.csv").read_text().splitlines()
        (plans / "hosts.csv").write_text(
            "\n".join([lines[0], *(line for line in lines[1:] if line.split(",")[0] in HOSTS)])
            + "\n"
        )
        (plans / "k3s.csv").write_text(
            "host,name,type,ip\n"
            "olaf,olaf-k3s-server,init-server,10.0.100.10\n"
        )  # rolf runs no K3s: it leaves the plans and moves below without the gates, which
        # membership.refuse_without_gates refuses for a host with K3s nodes
        for key, value in {
            "vms": "true", "vmAccel": "tcg", "vmMemory": "512", "vmCpus": "1",
            "vmDiskSize": "2", "nix": str(NIX_STANDIN), "vmInstallTimeout": "900",
            "vmBootTimeout": "300",
        }.items():
            r = self.pulumi("config", "set", f"k3scluster:{key}", value, "--stack", STACK)
            assert r.returncode == 0, r.stderr
        self.lab = lab_dir(self.render_dir)
        self.nix_log = base / "nix.log"  # one line per ISO build (tests/bin/nix)
        # the admin's key: its public half in secrets/ (every host), the private one the
        # stack's sshIdentity; the stack remembers host keys in a file of its own
        self.key = base / "id_admin"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lifecycle-admin",
                        "-f", str(self.key)], check=True)
        shutil.copy(self.key.with_suffix(".pub"), self.cluster / "secrets" / "admin.pub")
        r = self.pulumi("config", "set", "k3scluster:sshIdentity", str(self.key), "--stack", STACK)
        assert r.returncode == 0, r.stderr
        self.known_hosts = self.render_dir.parent / f"{STACK}-vm-known_hosts"

    def ssh(self, ip: str, *remote: str) -> subprocess.CompletedProcess[str]:
        """Log in as root with the stack's key, checking the host's key against the stack's
        own known_hosts only (strictly: nothing new is accepted here)."""
        return self.ns.run(
            "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-i", str(self.key), "-o", "IdentitiesOnly=yes", f"root@{ip}", *remote,
        )

    def iso_builds(self) -> list[str]:
        if not self.nix_log.exists():
            return []
        return [json.loads(line)["host"] for line in self.nix_log.read_text().splitlines()]

    def snapshot(self) -> dict[str, bytes]:
        """Every file of the cluster directory but the stack's own (``.k3scluster/it*``) and
        the plans, which this test edits itself."""
        return {
            rel: f.read_bytes()
            for f in sorted(self.cluster.rglob("*"))
            if f.is_file()
            and not (rel := str(f.relative_to(self.cluster))).startswith(
                (f".k3scluster/{STACK}", "plans/")
            )
        }

    def engine(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        env = engine_env(self.dir, {"COLMENA_LOG": str(self.log),
                                    "NIX_STANDIN_LOG": str(self.nix_log)})
        r = self.ns.run(str(PULUMI), *args, "--stack", STACK, "--non-interactive",
                        cwd=self.dir, env=env)
        if ok:
            assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        return r

    def vms(self, *extra: str) -> Any:
        r = self.ns.run(
            sys.executable, "-m", "k3scluster", "vms", str(self.cluster), "--stack", STACK,
            *extra, cwd=ROOT,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout) if "--json" in extra else r.stdout

    def state(self) -> dict[str, dict[str, Any]]:
        return {row["host"]: row for row in self.vms("--json")}

    def lab_id(self) -> str:
        """The lab's id, as its first net-up recorded it (the state keeps it too)."""
        net = recorded_net(self.lab)
        assert net is not None and net.lab_id, f"no lab id in {self.lab}"
        return net.lab_id

    def console(self, host: str) -> str:
        return (self.lab / host / "console.log").read_text(errors="replace")


def _facts(console: str, kind: str) -> list[str]:
    return re.findall(rf"^K3SGUEST {kind} (.*?)\r?$", console, re.MULTILINE)


def _boots(console: str) -> list[str]:
    """The guest's jobs, one per boot, in order (``K3SGUEST boot host=… job=…``)."""
    return [re.sub(r".* job=(\S+).*", r"\1", b) for b in _facts(console, "boot")]


def test_vm_stack_lifecycle(tmp_path: Path, ns: Namespace, guest: None) -> None:
    require_engine()
    p = VmProject(tmp_path, ns)
    before = p.snapshot()
    user_known_hosts = Path.home() / ".ssh" / "known_hosts"
    user_known = user_known_hosts.read_bytes() if user_known_hosts.exists() else None

    # -- up: network, ISOs, installs, boots from disk, then the normal path ----------------
    p.engine("up", "--yes", "--skip-preview")
    lab_id = p.lab_id()
    bridge = bridge_name(STACK, lab_id)
    assert {bridge, *(tap_name(STACK, h, lab_id) for h in HOSTS)} <= ns.links()
    addr = json.loads(ns.run("ip", "-j", "addr", "show", "dev", bridge, check=True).stdout)
    assert [(a["local"], a["prefixlen"]) for a in addr[0]["addr_info"] if a["family"] == "inet"] \
        == [("10.0.100.1", 24)]
    state = p.state()
    for host, (ip, serial) in HOSTS.items():
        assert state[host]["state"] == "running", p.console(host)[-3000:]
        assert state[host]["mac"] == vm_mac(STACK, host)
        assert ns.ping(ip), f"{host} does not answer at {ip}\n" + p.console(host)[-3000:]
        console = p.console(host)
        # inside the guest: the disk by its planned serial, the NIC with the planned MAC
        # (plans keep serials lower-cased: disks are matched case-insensitively)
        assert f"virtio-{serial.lower()} /dev/vda" in _facts(console, "byid"), console[-3000:]
        # ... named as planned by the rendered .link
        assert f"{NICS[host]} mac={vm_mac(STACK, host)}" in _facts(console, "nic"), console[-3000:]
        assert "installed /dev/vda" in console and "setup rc=0" in console
        # booted once from the ISO (install), then from the disk, never from the ISO again
        assert _boots(console) == ["install", "serve"]
        pid = state[host]["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert not any(b"media=cdrom" in a for a in cmdline)
        assert (p.lab / host / "disk.qcow2").is_file()
        # what the stack learnt from its VM stays in its lab: the hardware file read from
        # the VM (its root by the UUID the install made), the VM's host key in the
        # stack's own known_hosts, which lets the admin in
        hardware = (p.lab / host / "hardware.nix").read_text()
        (uuid,) = [f.removeprefix("root=") for f in _facts(console, "hardware")] or [""]
        assert uuid and f"/dev/disk/by-uuid/{uuid}" in hardware, console[-2000:]
        login = p.ssh(ip, "cat", "/etc/nixos/hardware-configuration.nix")
        assert login.returncode == 0 and login.stdout == hardware, login.stderr
    assert p.snapshot() == before  # nixConfigs/ (the real machines' files), secrets/, manifests/
    assert (user_known_hosts.read_bytes() if user_known_hosts.exists() else None) == user_known
    assert (p.lab / "olaf" / "efivars.fd").is_file()
    assert not (p.lab / "rolf" / "efivars.fd").exists()  # SeaBIOS
    deployed = [c for c in p.colmena_calls() if "apply" in c["argv"]]
    assert sorted(c["argv"][c["argv"].index("--on") + 1] for c in deployed) == ["olaf", "rolf"]

    assert sorted(p.iso_builds()) == ["olaf", "rolf"]  # one ISO per install

    # -- stop and start --------------------------------------------------------------------
    p.vms("--stop", "rolf")
    assert p.state()["rolf"]["state"] == "stopped"
    assert not ns.ping(HOSTS["rolf"][0])
    p.vms("--start", "rolf")
    assert p.state()["rolf"]["state"] == "running"
    assert ns.ping(HOSTS["rolf"][0])
    assert _boots(p.console("rolf")) == ["install", "serve", "serve"]

    # -- vmNat on: the network step updates (NAT on), the bridge and every tap stay -------
    r = p.pulumi("config", "set", "k3scluster:vmNat", "true", "--stack", STACK)
    assert r.returncode == 0, r.stderr
    plan = json.loads(p.engine("preview", "--json").stdout)
    ops = {s["urn"].split("::")[-1]: s["op"] for s in plan["steps"] if s["op"] != "same"}
    assert ops == {"cluster-lab-network": "update"}, ops
    p.engine("up", "--yes", "--skip-preview")
    for ip, _ in HOSTS.values():
        assert ns.ping(ip)
    assert {bridge, *(tap_name(STACK, h, lab_id) for h in HOSTS)} <= ns.links()

    # -- a second up changes nothing: the VMs keep running as they are ---------------------
    pids = {h: row["pid"] for h, row in p.state().items()}
    plan = json.loads(p.engine("preview", "--json").stdout)
    assert {s["op"] for s in plan["steps"]} == {"same"}
    p.engine("up", "--yes", "--skip-preview")
    assert {h: row["pid"] for h, row in p.state().items()} == pids
    first_macs = {h: _facts(p.console(h), "nic") for h in HOSTS}

    # -- olaf gets more memory (a per-host column): olaf restarts from its disk, rolf does not --
    hosts_csv = p.cluster / "plans" / "hosts.csv"
    rows = hosts_csv.read_text().splitlines()
    hosts_csv.write_text("\n".join(
        [rows[0] + ",vmMemory", *(r + (",640" if r.startswith("olaf,") else ",") for r in rows[1:])]
    ) + "\n")
    p.engine("up", "--yes", "--skip-preview")
    state = p.state()
    assert state["rolf"]["pid"] == pids["rolf"] and state["olaf"]["pid"] != pids["olaf"]
    argv = Path(f"/proc/{state['olaf']['pid']}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-m") + 1] == b"640"
    assert _boots(p.console("olaf")) == ["install", "serve", "serve"]
    assert ns.ping(HOSTS["olaf"][0])
    pids = {h: row["pid"] for h, row in state.items()}

    # the hardware files fetched, NAT, memory: no ISO was built again (no VM boots one)
    assert sorted(p.iso_builds()) == ["olaf", "rolf"]

    # -- a host leaves the plans: its VM stopped, its disk and files gone, nothing else --------
    with_rolf = hosts_csv.read_text()
    hosts_csv.write_text("".join(x for x in with_rolf.splitlines(True) if not x.startswith("rolf,")))
    k3s_csv = p.cluster / "plans" / "k3s.csv"
    k3s_rows = k3s_csv.read_text()
    k3s_csv.write_text("".join(x for x in k3s_rows.splitlines(True) if not x.startswith("rolf,")))
    p.engine("up", "--yes", "--skip-preview")
    assert not (p.lab / "rolf").exists()
    assert HOSTS["rolf"][0] not in p.known_hosts.read_text()  # its host key forgotten
    assert tap_name(STACK, "rolf", lab_id) not in ns.links()
    assert not ns.ping(HOSTS["rolf"][0])
    assert p.state()["olaf"]["pid"] == pids["olaf"]  # untouched
    assert ns.ping(HOSTS["olaf"][0])

    # -- it comes back: a new VM, installed again, with the same MAC -------------------------
    hosts_csv.write_text(with_rolf)
    k3s_csv.write_text(k3s_rows)
    p.engine("up", "--yes", "--skip-preview")
    assert ns.ping(HOSTS["rolf"][0])
    assert _boots(p.console("rolf")) == ["install", "serve"]
    assert set(_facts(p.console("rolf"), "nic")) == set(first_macs["rolf"])
    assert p.state()["olaf"]["pid"] == pids["olaf"]
    assert sorted(p.iso_builds()) == ["olaf", "rolf", "rolf"]  # for its new install
    # a new machine: its hardware file read again, its new host key accepted
    (uuid,) = [f.removeprefix("root=") for f in _facts(p.console("rolf"), "hardware")]
    assert f"/dev/disk/by-uuid/{uuid}" in (p.lab / "rolf" / "hardware.nix").read_text()
    assert p.ssh(HOSTS["rolf"][0], "true").returncode == 0

    # -- this machine restarts: QEMUs gone, and the bridge, the taps and the NAT with them --
    def reboot() -> None:
        for row in p.state().values():
            if row["pid"]:
                os.kill(row["pid"], 9)
        for link in (bridge, *(tap_name(STACK, h, lab_id) for h in HOSTS)):
            ns.run("ip", "link", "delete", link, check=True)
        ns.run("nft", "flush", "ruleset", check=True)
        assert {row["state"] for row in p.state().values()} == {"stopped"}

    reboot()
    p.vms("--start", "all")  # makes the bridge again from the lab's record, then each VM
    for ip, _ in HOSTS.values():
        assert ns.ping(ip)
    assert {row["state"] for row in p.state().values()} == {"running"}
    reboot()
    plan = json.loads(p.engine("preview", "--json").stdout)
    ops = {s["urn"].split("::")[-1]: s["op"] for s in plan["steps"] if s["op"] != "same"}
    assert ops == {"cluster-lab-network": "update", "olaf-vm-machine": "update",
                   "rolf-vm-machine": "update"}, ops
    p.engine("up", "--yes", "--skip-preview")  # or `pulumi up`
    for ip, _ in HOSTS.values():
        assert ns.ping(ip)
    assert "masquerade" in ns.run("nft", "list", "ruleset").stdout  # vmNat's table again

    # -- rolf moves to another address: a new VM (its installed system carries the address),
    # found at the new one, its hardware read and its host key accepted there
    moved = "10.0.100.7"
    hosts_csv.write_text(hosts_csv.read_text().replace(
        f"rolf,eno2,{HOSTS['rolf'][0]},", f"rolf,eno2,{moved},"))
    p.engine("up", "--yes", "--skip-preview")
    assert ns.ping(moved) and not ns.ping(HOSTS["rolf"][0])
    assert _boots(p.console("rolf")) == ["install", "serve"]
    assert p.ssh(moved, "true").returncode == 0
    assert HOSTS["rolf"][0] not in p.known_hosts.read_text()
    assert ns.ping(HOSTS["olaf"][0])

    # -- destroy: VMs stopped, their disks and files gone, and nothing else ----------------
    iso_dir = p.render_dir.parent / f"{p.render_dir.name}-iso"
    isos_before = sorted(str(x) for x in iso_dir.rglob("*.iso"))
    p.engine("destroy", "--yes", "--skip-preview")
    for host in HOSTS:
        assert not (p.lab / host).exists()
    assert list(p.lab.iterdir()) == []
    assert ns.links() == {"lo"}
    assert ns.pids() == []
    for ip, _ in HOSTS.values():
        assert not ns.ping(ip)
    assert sorted(str(x) for x in iso_dir.rglob("*.iso")) == isos_before  # not the VMs' files
    assert (p.cluster / "plans" / "hosts.csv").is_file()
    # the rehearsal left the cluster directory as it found it, and ~/.ssh alone
    assert p.snapshot() == before
    assert (user_known_hosts.read_bytes() if user_known_hosts.exists() else None) == user_known
    assert not [ip for ip in (moved, *(ip for ip, _ in HOSTS.values()))
                if ip in p.known_hosts.read_text()]

    # -- a hardware stack on the same directory sees nothing of the VMs ---------------------
    hw_config = (p.dir / f"Pulumi.{STACK}.yaml").read_text()
    (p.dir / "Pulumi.hw.yaml").write_text("".join(
        line for line in hw_config.splitlines(True) if "k3scluster:vm" not in line
        and "k3scluster:nix:" not in line and "k3scluster:ssh" not in line
    ))
    assert p.pulumi("stack", "init", "hw").returncode == 0
    r = p.pulumi("preview", "--json", "--stack", "hw")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    plan = json.loads(r.stdout)
    names = {s["urn"].split("::")[-1] for s in plan["steps"]}
    assert not [n for n in names if n.endswith("-hardware") or "-vm" in n or "lab" in n], names
    assert "vmHardware" not in r.stdout and f"{STACK}-lab" not in r.stdout
    rendered = tmp_path / "hw-render"
    subprocess.run([sys.executable, "-m", "k3scluster", "render", str(p.cluster), "--out",
                    str(rendered)], check=True, capture_output=True, cwd=ROOT)
    for host in HOSTS:
        text = (rendered / "hosts" / f"{host}.nix").read_text()
        assert "qemu-guest" not in text and "-lab/" not in text
        assert f"nixConfigs/{host}.hardware.nix" in text
