"""Rollback and the dead-man switch (issue 17 item 5, k3scluster.rollback) against a real sshd.

``python -m k3scluster.components.tasks deploy`` runs in a network namespace of the test's own
where a real ``sshd`` answers as the host ulrich (10.0.100.6). sshd runs in a private mount
namespace whose ``/run``, ``/nix/store`` and ``/nix/var/nix/profiles`` are the test's
directories: the host's ``/run/current-system`` and its system profile (generations
``system-N-link``) point at stand-in system directories in that store. Each system directory
holds the stand-ins of tests/bin/host (``bin/switch-to-configuration``, ``sw/bin/nix-env``,
``sw/bin/systemd-run``, ``sw/bin/systemctl``), the machine's own ``flock``, ``date``,
``sleep`` and ``readlink``, and an ``on-switch`` script for what activating
it does to the host. colmena is the stand-in tests/bin/colmena, which activates the new system
over ssh as colmena does (``$COLMENA_ACTIVATE``). No packet leaves the machine.

The rollback on a failed health gate, through the real engine, is in
tests/test_rollback_engine.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from k3scluster import commands, rollback
from k3scluster.errors import K3sClusterError

ROOT = Path(__file__).resolve().parent.parent
COLMENA = ROOT / "tests" / "bin" / "colmena"
STANDINS = ROOT / "tests" / "bin" / "host"
SSHD = Path("/usr/sbin/sshd")
IP = "10.0.100.6"


def make_system(store: Path, name: str, on_switch: str = "") -> str:
    """A stand-in NixOS system directory in ``store`` (the host's /nix/store); its path there."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    d = store / f"{digest}-nixos-system-{name}"
    (d / "bin").mkdir(parents=True)
    (d / "sw" / "bin").mkdir(parents=True)
    (d / "bin" / "switch-to-configuration").symlink_to(STANDINS / "switch-to-configuration")
    for tool in ("nix-env", "systemd-run", "systemctl"):
        (d / "sw" / "bin" / tool).symlink_to(STANDINS / tool)
    for tool in ("flock", "date", "sleep", "readlink", "mkdir", "true"):  # util-linux, coreutils
        (d / "sw" / "bin" / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    # the stand-ins' interpreter (`#!/usr/bin/env python3`), found on the system's PATH as the
    # real ones' store-path interpreters are found without one
    (d / "sw" / "bin" / "python3").symlink_to(sys.executable)
    if on_switch:
        (d / "on-switch").write_text(on_switch)
    return f"/nix/store/{d.name}"


class Host:
    """ulrich: a real sshd in the namespace ``ns``, with the host's own /run, store, profiles."""

    def __init__(self, base: Path, ns: object) -> None:
        self.base = base
        self.ns = ns
        self.run = base / "run"
        self.store = base / "store"
        self.profiles = base / "profiles"
        for d in (self.run / "sshd", self.store, self.profiles):
            d.mkdir(parents=True)
        self.key, self.host_key = base / "id_test", base / "host_key"
        for k in (self.key, self.host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)],
                           check=True, stdin=subprocess.DEVNULL)
        self.known_hosts = base / "known_hosts"
        self.config = base / "sshd_config"
        self.pidfile = base / "sshd.pid"
        self.config.write_text(
            f"ListenAddress {IP}\nPort 22\nHostKey {self.host_key}\nPidFile {self.pidfile}\n"
            f"AuthorizedKeysFile {self.key}.pub\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\n")
        q = shlex.quote
        inner = " && ".join([
            f"mount --bind {q(str(self.run))} /run",
            f"mount --bind {q(str(self.store))} /nix/store",
            f"mount --bind {q(str(self.profiles))} /nix/var/nix/profiles",
            f"exec {SSHD} -D -f {q(str(self.config))} -E {q(str(base / 'sshd.log'))}",
        ])
        self.proc = ns.popen(  # type: ignore[attr-defined]
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
            base / "sshd.out")
        self.wait_for_sshd()

    def wait_for_sshd(self) -> None:
        end = time.monotonic() + 10
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            assert time.monotonic() < end, "sshd did not start"
            time.sleep(0.05)

    # what activating a system does to the host's sshd (run by the stand-in activation)
    def stop_sshd(self) -> str:
        """The listening sshd goes away (sessions it started go on), as a broken sshd config."""
        return f"kill $(cat {shlex.quote(str(self.pidfile))}); rm -f {shlex.quote(str(self.pidfile))}\n"

    def start_sshd(self) -> str:
        """sshd listens again (it runs in the host's namespaces: the activation's)."""
        q = shlex.quote
        return (f"[ -s {q(str(self.pidfile))} ] || {SSHD} -f {q(str(self.config))} "
                f"-E {q(str(self.base / 'sshd.log'))}\n")

    def boot(self, system: str) -> None:
        """The host runs ``system``, its first generation."""
        (self.profiles / "system-1-link").symlink_to(system)
        (self.profiles / "system").symlink_to("system-1-link")
        (self.run / "current-system").symlink_to(system)

    def current(self) -> str:
        return os.readlink(self.run / "current-system")

    def profile(self) -> tuple[str, str]:
        """(the generation the profile points at, that generation's system)."""
        gen = os.readlink(self.profiles / "system")
        return gen, os.readlink(self.profiles / gen)

    def units(self) -> Path:
        return self.run / "standin-units"

    def stop(self) -> None:
        from netns import stop

        if self.pidfile.exists() and self.pidfile.read_text().strip():
            try:  # an sshd a stand-in activation started again
                os.kill(int(self.pidfile.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
        stop(self.proc)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    from netns import NetNS, available

    why = available()
    if why:
        pytest.skip(why)
    if not SSHD.is_file() or not shutil.which("ssh") or not shutil.which("unshare"):
        pytest.skip("needs OpenSSH (ssh, /usr/sbin/sshd) and unshare")
    ns = NetNS.create([IP])
    h = Host(tmp_path, ns)
    try:
        yield h
    finally:
        h.stop()
        # a stand-in timer still sleeping (a test that failed half way)
        for pidfile in h.units().glob("*.pid") if h.units().exists() else []:
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        ns.delete()


def _hive(base: Path) -> Path:
    d = base / "render"
    d.mkdir()
    hive = d / "hive.nix"
    hive.write_text(f'{{ meta = {{ }}; ulrich = {{ deployment.targetHost = "{IP}"; }}; }}\n')
    return hive


def deploy(h: Host, new: str, *extra: str, timeout: float = 30,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "k3scluster.components.tasks", "deploy", "--host", "ulrich",
        "--ip", IP, "--ssh-identity", str(h.key), "--ssh-known-hosts", str(h.known_hosts),
        "--timeout", f"{timeout:g}", *extra,
        "--", str(COLMENA), "apply", "switch", "--on", "ulrich", "-f", str(_hive(h.base)),
    ]
    env = {"PATH": "/usr/sbin:/usr/bin:/bin", "HOME": str(h.base),
           "COLMENA_LOG": str(h.base / "colmena.log"),
           "COLMENA_ACTIVATE": json.dumps({"ulrich": new}), **(env or {})}
    return subprocess.run(h.ns.argv(*argv), cwd=ROOT, env=env,  # type: ignore[attr-defined]
                          capture_output=True, text=True, check=False)


def _goals(h: Host) -> list[str]:
    log = h.base / "colmena.log"
    return [json.loads(ln)["goal"] for ln in log.read_text().splitlines()] if log.exists() else []


def _flat(r: subprocess.CompletedProcess[str]) -> str:
    return " ".join((r.stdout + r.stderr).split())


@pytest.mark.root
def test_a_confirmed_switch_disarms_the_dead_man_switch(host: Host) -> None:
    prev = make_system(host.store, "ulrich-prev")
    new = make_system(host.store, "ulrich-new")
    host.boot(prev)
    r = deploy(host, new, "--confirm-timeout", "30")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # the closure was pushed before the timer was armed, then the switch ran
    assert _goals(host) == ["push", "switch"]
    assert host.current() == new
    assert host.profile() == ("system-2-link", new)
    # the timer was armed with the rollback to prev, and stopped over a new connection
    (pid,) = host.units().glob("k3scluster-confirm-ulrich-*.pid")
    unit = pid.name.removesuffix(".pid")
    assert (host.units() / f"{unit}.stopped").exists()
    assert not (host.units() / f"{unit}.fired").exists()
    assert (host.units() / "systemctl.log").read_text() == f"stop {unit}.timer\n"
    assert (host.run / unit).is_dir()  # the confirmation won the race
    assert "the dead-man switch is disarmed" in r.stderr


@pytest.mark.root
def test_a_switch_that_cuts_ssh_off_rolls_itself_back(host: Host) -> None:
    prev = make_system(host.store, "ulrich-prev", on_switch=host.start_sshd())
    new = make_system(host.store, "ulrich-new", on_switch=host.stop_sshd())
    host.boot(prev)
    r = deploy(host, new, "--confirm-timeout", "4")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert (f"ulrich: no ssh connection after the switch within 4 s; the host rolled itself "
            f"back to {prev}") in _flat(r)
    # the switch happened (generation 2), then the armed timer made prev current again as a
    # new generation (3), and started sshd again
    assert host.current() == prev
    assert host.profile() == ("system-3-link", prev)
    assert os.readlink(host.profiles / "system-2-link") == new
    (fired,) = host.units().glob("k3scluster-confirm-ulrich-*.fired")
    assert not fired.with_suffix(".stopped").exists()


@pytest.mark.root
def test_a_switch_that_outlasts_the_timeout_is_waited_for(host: Host) -> None:
    """A healthy switch that takes longer than confirmTimeout (a K3s agent's start waits for a
    server, switch-to-configuration waits for that start): the timer fires while the switch
    holds its lock, waits for it to end, gives the confirmation the timeout from there, and
    the host stays on its new system."""
    prev = make_system(host.store, "ulrich-prev")
    new = make_system(host.store, "ulrich-new", on_switch="sleep 7\n")
    host.boot(prev)
    r = deploy(host, new, "--confirm-timeout", "3")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert host.current() == new
    assert host.profile() == ("system-2-link", new)
    # the timer did fire during the switch, and the confirmation claimed the marker after it
    (fired,) = host.units().glob("k3scluster-confirm-ulrich-*.fired")
    assert (host.run / fired.name.removesuffix(".fired")).is_dir()
    assert "the dead-man switch is disarmed" in r.stderr


@pytest.mark.root
def test_a_switch_that_starts_after_the_timeout_is_waited_for(host: Host) -> None:
    """colmena's switch evaluates the hive again before it activates (here: 6 s, stood in by
    $COLMENA_ON_SWITCH); the timer (3 s) fires before the switch started, sees the host still
    on its previous system, waits for the switch and gives the confirmation the timeout after
    it: the host is not rolled back before (and then switched unguarded after) it."""
    prev = make_system(host.store, "ulrich-prev")
    new = make_system(host.store, "ulrich-new")
    host.boot(prev)
    r = deploy(host, new, "--confirm-timeout", "3",
               env={"COLMENA_ON_SWITCH": json.dumps(["sleep", "6"])})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert host.current() == new
    assert host.profile() == ("system-2-link", new)
    assert list(host.units().glob("k3scluster-confirm-ulrich-*.fired"))
    assert "the dead-man switch is disarmed" in r.stderr


@pytest.mark.root
def test_a_long_switch_that_cuts_ssh_off_still_rolls_back(host: Host) -> None:
    """The wait for a running switch does not save a configuration that cuts the host off:
    once the switch ends, the confirmation has the timeout, and then the timer rolls back."""
    prev = make_system(host.store, "ulrich-prev", on_switch=host.start_sshd())
    new = make_system(host.store, "ulrich-new", on_switch=host.stop_sshd() + "sleep 6\n")
    host.boot(prev)
    r = deploy(host, new, "--confirm-timeout", "3")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert (f"ulrich: no ssh connection after the switch within 3 s; the host rolled itself "
            f"back to {prev}") in _flat(r)
    assert host.current() == prev
    assert host.profile() == ("system-3-link", prev)


@pytest.mark.root
def test_a_failed_activation_is_rolled_back(host: Host) -> None:
    prev = make_system(host.store, "ulrich-prev")
    new = make_system(host.store, "ulrich-new", on_switch="echo 'unit foo failed' >&2; exit 4\n")
    host.boot(prev)
    r = deploy(host, new)  # the defaults: rollback on, the dead-man switch 120 s
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    text = _flat(r)
    assert "failed with exit code 1" in text
    assert f"ulrich was rolled back to {prev}" in text
    assert host.current() == prev
    assert host.profile() == ("system-3-link", prev)
    # the timer was disarmed first (the confirmation came in time)
    assert list(host.units().glob("*.stopped")) and not list(host.units().glob("*.fired"))


@pytest.mark.root
def test_a_rollback_that_fails_too_says_what_to_do(host: Host) -> None:
    prev = make_system(host.store, "ulrich-prev", on_switch="echo 'old unit failed' >&2; exit 3\n")
    new = make_system(host.store, "ulrich-new", on_switch="exit 4\n")
    host.boot(prev)
    r = deploy(host, new, "--confirm-timeout", "0")
    assert r.returncode == 1
    text = _flat(r)
    assert f"rolling ulrich back to {prev} failed too: old unit failed" in text
    # what to run on the host, or the boot menu
    assert (f"{prev}/sw/bin/nix-env -p /nix/var/nix/profiles/system --set {prev} && "
            f"{prev}/bin/switch-to-configuration switch") in text
    assert "boot menu" in text


@pytest.mark.root
def test_without_rollback_a_failed_activation_stays(host: Host) -> None:
    prev = make_system(host.store, "ulrich-prev")
    new = make_system(host.store, "ulrich-new", on_switch="exit 4\n")
    host.boot(prev)
    r = deploy(host, new, "--no-rollback", "--confirm-timeout", "0")
    assert r.returncode == 1
    assert "rolled back" not in _flat(r)
    assert host.current() == new
    assert host.profile() == ("system-2-link", new)
    assert _goals(host) == ["switch"]  # no dead-man switch: no push first
    assert not host.units().exists()


@pytest.mark.root
def test_without_rollback_the_dead_man_switch_still_guards_the_connection(host: Host) -> None:
    prev = make_system(host.store, "ulrich-prev")
    new = make_system(host.store, "ulrich-new", on_switch="exit 4\n")
    host.boot(prev)
    r = deploy(host, new, "--no-rollback", "--confirm-timeout", "30")
    assert r.returncode == 1
    assert "ulrich stays on the new configuration (k3scluster:rollback is false)" in _flat(r)
    assert host.current() == new
    assert list(host.units().glob("*.stopped"))  # confirmed: the timer does not fire


@pytest.mark.root
def test_a_colmena_that_fails_before_activating_rolls_nothing_back(host: Host) -> None:
    prev = make_system(host.store, "ulrich-prev")
    host.boot(prev)
    r = deploy(host, "/nix/store/" + "0" * 32 + "-nixos-system-missing", "--confirm-timeout", "0")
    assert r.returncode == 1
    assert f"ulrich still runs {prev} (nothing to roll back)" in _flat(r)
    assert host.profile() == ("system-1-link", prev)


# --- the library's pieces -------------------------------------------------------------------

def test_the_scripts_quote_the_store_path_and_refuse_anything_else() -> None:
    prev = "/nix/store/" + "a" * 32 + "-nixos-system-olaf-25.05"
    assert rollback.rollback_script(prev) == (
        f"{prev}/sw/bin/nix-env -p /nix/var/nix/profiles/system --set {prev} && "
        f"{prev}/bin/switch-to-configuration switch")
    arm = rollback.arm_script(prev, "olaf-1", 120)
    words = shlex.split(arm)
    assert words[:5] == [f"{prev}/sw/bin/systemd-run", "--unit=k3scluster-confirm-olaf-1",
                         f"--setenv=PATH={prev}/sw/bin",
                         "--on-active=120s", "--timer-property=AccuracySec=1s"]
    assert words[5:7] == ["/bin/sh", "-c"]
    assert words[7] == (rollback.wait_for_switch_script(prev, "olaf-1", 120)
                        + "; mkdir /run/k3scluster-confirm-olaf-1 2>/dev/null || exit 0; "
                        + rollback.rollback_script(prev))
    # it waits for a running switch through switch-to-configuration's own lock, bounded
    wait = rollback.wait_for_switch_script(prev, "olaf-1", 120)
    assert f"{prev}/sw/bin/flock -s -w \"$left\" /run/nixos/switch-to-configuration.lock" in wait
    assert f"+ {rollback.SWITCH_WAIT} ))" in wait and f"{prev}/sw/bin/sleep 120;" in wait
    for bad in ("/nix/store/x-nixos-system-olaf", "/etc/passwd; reboot", "",
                "/nix/store/" + "a" * 32 + "-x'; rm -rf /"):
        with pytest.raises(K3sClusterError, match="not a Nix store path"):
            rollback.rollback_script(bad)


def test_the_confirmation_is_a_new_ssh_connection() -> None:
    import ipaddress

    argv = commands.ssh_command("root", ipaddress.IPv4Address(IP), ["true"],
                                new_connection=True)
    assert "ControlPath=none" in argv and "ControlMaster=no" in argv
    assert "ControlPath=none" not in commands.ssh_command(
        "root", ipaddress.IPv4Address(IP), ["true"])


def test_only_settings_other_than_the_defaults_reach_the_deploy_argv() -> None:
    """A stack with the defaults deploys nothing again when these settings appear."""
    import ipaddress

    def argv(**kw: object) -> list[str]:
        return commands.deploy_and_check("python", "ulrich", ipaddress.IPv4Address(IP),
                                         ["colmena"], commands.SshSettings(), timeout=60,
                                         **kw)  # type: ignore[arg-type]

    plain = argv()
    assert "--no-rollback" not in plain and "--confirm-timeout" not in plain
    assert argv(rollback=True, confirm_timeout=None) == plain
    off = argv(rollback=False, confirm_timeout=0.0)
    assert off[off.index("--") - 3:off.index("--")] == ["--no-rollback", "--confirm-timeout", "0"]


def test_confirm_timeout_setting() -> None:
    assert rollback.confirm_timeout_setting(None) is None
    assert rollback.confirm_timeout_setting("2m") is None  # the default: nothing in the argv
    assert rollback.confirm_timeout_setting("0") == 0.0
    assert rollback.confirm_timeout_setting("5m") == 300.0
    with pytest.raises(K3sClusterError, match="k3scluster:confirmTimeout"):
        rollback.confirm_timeout_setting("soon")


def test_a_host_whose_gates_fail_on_its_old_system_too_is_named_so() -> None:
    """Guard.failed with the host's answers given (its ssh is tested above)."""
    prev = "/nix/store/" + "a" * 32 + "-nixos-system-rolf-prev"
    new = "/nix/store/" + "b" * 32 + "-nixos-system-rolf-new"
    sent: list[str] = []

    def run(script: str, new_connection: bool) -> tuple[int, str, str]:
        sent.append(script)
        if script == rollback.STATE_SCRIPT:
            return 0, f"{new}\n{new}\n", ""
        return 0, "", ""

    def gates() -> None:
        raise K3sClusterError("rolf: K3s server rolf-k3s-server (10.0.100.14) not ready after 6s")

    g = rollback.Guard("rolf", run, lambda _: None, confirm_timeout=0, prev=prev)
    err = g.failed(K3sClusterError("rolf: K3s server rolf-k3s-server (10.0.100.14) not ready "
                                   "after 10m"), gates)
    assert sent == [rollback.STATE_SCRIPT, rollback.rollback_script(prev)]
    assert err.message == (
        "rolf: K3s server rolf-k3s-server (10.0.100.14) not ready after 10m; rolf was rolled "
        f"back to {prev}, but its gates fail there too: rolf: K3s server rolf-k3s-server "
        "(10.0.100.14) not ready after 6s")


def _timer_fired_guard(switch_took: float) -> tuple[rollback.Guard, str]:
    """A Guard armed at 0 whose colmena returned at ``switch_took`` s; the host answers that
    the timer won the race and that it is back on its previous system."""
    prev = "/nix/store/" + "a" * 32 + "-nixos-system-karl-prev"
    now = [switch_took]

    def run(script: str, new_connection: bool) -> tuple[int, str, str]:
        if script == rollback.STATE_SCRIPT:
            return 0, f"{prev}\n{prev}\n", ""
        return 0, "fired\n", ""

    def sleep(s: float) -> None:
        now[0] += s

    g = rollback.Guard("karl", run, lambda _: None, confirm_timeout=120, prev=prev,
                       armed_at=0.0, clock=lambda: now[0], sleep=sleep)
    return g, prev


def test_a_switch_that_outlasts_the_timer_is_named_slow_not_cut_off() -> None:
    """A switch can outlast even the timer's wait for it with the host reachable all along
    (a start that hangs). The timer then rolls the host back while it still switches; the
    error says so instead of blaming its network or sshd."""
    from k3scluster.k3s_start import START_TIMEOUT_MIN

    took = 120 + rollback.SWITCH_WAIT + 5  # past what the timer waits for a running switch
    g, prev = _timer_fired_guard(switch_took=took)
    with pytest.raises(K3sClusterError) as err:
        g.after_switch()
    assert err.value.message == (
        f"karl: the switch returned only after {took} s, later than the dead-man switch waits "
        f"for a switch (120 s, then up to {rollback.SWITCH_WAIT} s for a running one): its "
        f"timer rolled the host back to {prev} while the switch still ran")
    assert "no ssh connection" not in err.value.message
    assert f"waits up to {START_TIMEOUT_MIN} minutes" in (err.value.hint or "")
    assert "journalctl" in (err.value.hint or "")
    assert g.rolled_back_by_timer

    # a switch that returned in time and then found no ssh is the cut-off host, as before
    g, prev = _timer_fired_guard(switch_took=5)
    with pytest.raises(K3sClusterError) as err:
        g.after_switch()
    assert err.value.message == (
        f"karl: no ssh connection after the switch within 120 s; the host rolled itself back "
        f"to {prev}")


def test_the_confirmation_has_the_timeout_from_the_end_of_the_switch() -> None:
    """colmena returned 605 s after the timer was armed (its timeout 120 s: the timer fired
    during the switch and waits for it); the host answers ssh only 100 s later: the deploy
    still confirms, as the timer gives it 120 s from the switch's end. Before, the deploy
    gave up at once (its deadline was 120 s after arming)."""
    prev = "/nix/store/" + "a" * 32 + "-nixos-system-karl-prev"
    now = [605.0]
    sent: list[str] = []

    def run(script: str, new_connection: bool) -> tuple[int, str, str]:
        sent.append(script)
        if now[0] < 705:
            return 255, "", "ssh: connect to host 10.0.100.6 port 22: Connection refused"
        return 0, "confirmed\n", ""

    def sleep(s: float) -> None:
        now[0] += s

    g = rollback.Guard("karl", run, lambda _: None, confirm_timeout=120, prev=prev,
                       armed_at=0.0, clock=lambda: now[0], sleep=sleep)
    g.after_switch()
    assert g.armed_at is None and not g.rolled_back_by_timer
    assert sent[-1] == rollback.confirm_script("") and now[0] >= 705
