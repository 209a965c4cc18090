"""Back to the system a host ran before its deploy (issue 17 item 5). No pulumi.

*The previous system* is the target of ``/run/current-system`` read over ssh just before colmena
runs (not "generation N": someone may have run ``nixos-rebuild`` or rolled back since). colmena
activates a host with ``nix-env -p /nix/var/nix/profiles/system --set <new>`` and
``<new>/bin/switch-to-configuration switch``; going back is the same with ``<prev>``
(:func:`rollback_script`): a new generation pointing at it, so the boot default follows. The
commands are the previous system's own (``<prev>/sw/bin/nix-env``): they exist whatever the new
system did to PATH.

*Rollback on a failed step* (``k3scluster:rollback``, default on): when colmena's switch or a
health gate fails, the host is set back to ``<prev>`` (when it left it: a colmena that failed
before activating changed nothing), its gates are waited for again, and the deploy fails naming
the host, what failed and that it is back on ``<prev>`` (or that the rollback failed too, and
what to do).

*The dead-man switch* (``k3scluster:confirmTimeout``, default :data:`CONFIRM_TIMEOUT` s, 0 off):
before the switch a transient timer is armed on the host (:func:`arm_script`: ``systemd-run
--on-active=<timeout>``, outside what ``switch-to-configuration`` manages) that rolls back to
``<prev>`` unless the deploying machine confirms in time over a *new* ssh connection (one made
after the switch proves that a fresh login works with the new network and sshd). The timer and
the confirmation race for one directory (``mkdir`` is atomic): whoever makes
``/run/k3scluster-confirm-<id>`` first wins, so a late confirmation never claims a rollback
that already started, and a fired timer never rolls back a confirmed deploy. A host that could
not be reached in time rolls itself back; the deploy then waits for ssh to come back, reads
``/run/current-system`` and fails saying so.

*The timeout counts from the end of the switch* (as deploy-rs's magic rollback does): a switch
waits for the units it starts, and a K3s agent's start waits up to START_TIMEOUT_MIN for a
server, a server's container as long. A timer that fires while ``switch-to-configuration``
runs (it holds ``flock(2)`` on :data:`SWITCH_LOCK`, the lock both the Rust and the Perl
implementation take), or before it started (the host still runs ``prev``: colmena's second
evaluation), waits for the switch to end (at most :data:`SWITCH_WAIT` s), then gives the
confirmation ``timeout`` s more, and rolls back only if it is still unclaimed; the deploy
waits ``timeout`` s from colmena's return accordingly.

Everything sent to the host is store paths and fixed words, quoted with ``shlex.quote``: no
secret. ``Runner``: ``run(script, new_connection)`` -> (exit code, stdout, stderr) over ssh
(255: no connection).
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from k3scluster.errors import K3sClusterError
from k3scluster.k3s_start import START_TIMEOUT_MIN

PROFILE = "/nix/var/nix/profiles/system"
CONFIRM_TIMEOUT = 120.0  # k3scluster:confirmTimeout's default (seconds)
UNIT_PREFIX = "k3scluster-confirm-"
# switch-to-configuration's lock (nixpkgs switch-to-configuration-ng main.rs: Flock::lock with
# LockExclusiveNonblock; the Perl one flock()s the same file): held while a switch runs
SWITCH_LOCK = "/run/nixos/switch-to-configuration.lock"
SWITCH_WAIT = 1800  # how long a fired timer waits for a running switch to end (seconds)
_STORE_PATH = re.compile(r"^/nix/store/[0-9a-z]{32}-[A-Za-z0-9+._?=-]+$")
NO_CONNECTION = 255  # ssh's exit code when it could not connect (or the session was cut)

Runner = Callable[[str, bool], tuple[int, str, str]]


def confirm_timeout_setting(raw: str | None) -> float | None:
    """``k3scluster:confirmTimeout``: seconds (``0`` off); None for the default, which the
    deploy argv then does not carry (a stack with the defaults deploys nothing again)."""
    from k3scluster.kube import parse_duration

    if raw is None or not str(raw).strip():
        return None
    if str(raw).strip() in ("0", "0s"):
        return 0.0
    value = parse_duration(raw, "k3scluster:confirmTimeout")
    return None if value == CONFIRM_TIMEOUT else value


def store_path(text: str, what: str) -> str:
    """``text`` when it is a store path; else a clear error naming ``what``."""
    text = text.strip()
    if not _STORE_PATH.match(text):
        raise K3sClusterError(
            f"{what} is not a Nix store path: {text or '(nothing)'}",
            hint="is it a NixOS host? Without a previous system there is nothing to roll back "
            "to: pulumi config set k3scluster:rollback false and k3scluster:confirmTimeout 0",
        )
    return text


def rollback_script(prev: str) -> str:
    """The shell text that makes ``prev`` the host's system again, as colmena activates one."""
    q = shlex.quote(store_path(prev, "the system to roll back to"))
    return f"{q}/sw/bin/nix-env -p {PROFILE} --set {q} && {q}/bin/switch-to-configuration switch"


def marker(unit_id: str) -> str:
    """The directory the timer and the confirmation race to make."""
    return f"/run/{UNIT_PREFIX}{unit_id}"


def wait_for_switch_script(prev: str, unit_id: str, timeout: float) -> str:
    """Shell text run when the timer fires, before it claims :func:`marker`: the confirmation
    gets ``timeout`` s from the end of the switch. While a ``switch-to-configuration`` holds
    :data:`SWITCH_LOCK` it waits for the switch to end (``flock -s -w``: the lock is free
    again), then ``timeout`` s more; while the host still runs ``prev`` (colmena has not
    switched yet: its second evaluation) it looks again every second, and gives ``timeout`` s
    after it saw the host switch; again for another switch; at most :data:`SWITCH_WAIT` s in
    all; it ends at once when the confirmation made :func:`marker`. The lock is only taken
    shared and let go at once (a switch that starts in that instant fails to lock and says
    so); no lock file: no switch ran since boot."""
    q = shlex.quote(store_path(prev, "the system to roll back to"))
    b, lock, t = f"{q}/sw/bin", SWITCH_LOCK, max(1, round(timeout))
    return (f"end=$(( $({b}/date +%s) + {SWITCH_WAIT} )); seen=; "
            f"while left=$(( end - $({b}/date +%s) )); [ \"$left\" -gt 0 ]; do "
            f"[ -d {marker(unit_id)} ] && exit 0; "
            f"if [ -e {lock} ] && ! {b}/flock -n -s {lock} true; then "
            f"{b}/flock -s -w \"$left\" {lock} true || break; seen=; {b}/sleep {t}; "
            f"elif [ \"$({b}/readlink /run/current-system)\" = {q} ]; then "
            f"seen=prev; {b}/sleep 1; "
            f"elif [ -n \"$seen\" ]; then seen=; {b}/sleep {t}; "
            "else break; fi; done")


def arm_script(prev: str, unit_id: str, timeout: float) -> str:
    """``systemd-run`` of a transient timer that, ``timeout`` s later (and ``timeout`` s after
    a switch that has not started or not ended then: :func:`wait_for_switch_script`), rolls
    the host back to ``prev`` unless the confirmation made :func:`marker` first. Its service
    runs with PATH ``<prev>/sw/bin``: systemd gives a transient unit none of the caller's
    environment, and on NixOS its default PATH is the systemd package's ``bin`` alone (nixpkgs
    systemd: ``@defaultPathNormal@`` is ``$out/bin/``), where the shell finds no ``mkdir``: the
    timer would give up as if the confirmation had won, and never roll back."""
    body = (f"{wait_for_switch_script(prev, unit_id, timeout)}; "
            f"mkdir {marker(unit_id)} 2>/dev/null || exit 0; {rollback_script(prev)}")
    return " ".join([
        f"{shlex.quote(prev)}/sw/bin/systemd-run",
        f"--unit={UNIT_PREFIX}{unit_id}",
        shlex.quote(f"--setenv=PATH={store_path(prev, 'the system to roll back to')}/sw/bin"),
        f"--on-active={max(1, round(timeout))}s",
        "--timer-property=AccuracySec=1s",
        "/bin/sh", "-c", shlex.quote(body),
    ])


def confirm_script(unit_id: str) -> str:
    """Run over a new connection after the switch: ``confirmed`` when it made the marker first
    (the timer is stopped), ``fired`` when the timer did (it is rolling the host back)."""
    unit = f"{UNIT_PREFIX}{unit_id}.timer"
    return (f"if mkdir {marker(unit_id)} 2>/dev/null; then "
            f"/run/current-system/sw/bin/systemctl stop {unit}; echo confirmed; "
            "else echo fired; fi")


STATE_SCRIPT = f"readlink /run/current-system; readlink -f {PROFILE}"


@dataclass
class Guard:
    """One host's deploy, made undoable: :meth:`before` colmena, :meth:`after_switch` when it
    returned, :meth:`failed` when the switch or a gate failed."""

    host: str
    run: Runner
    progress: Callable[[str], None]
    rollback: bool = True
    confirm_timeout: float = CONFIRM_TIMEOUT
    wait: float = 600.0  # how long to wait for ssh to come back after the timer fired
    unit_id: str = ""
    prev: str | None = None
    armed_at: float | None = None
    rolled_back_by_timer: bool = False
    clock: Callable[[], float] = field(default=time.monotonic)
    sleep: Callable[[float], None] = field(default=time.sleep)

    def before(self, push: Callable[[], None]) -> None:
        """Read the system the host runs now; with a dead-man switch, ``push`` the new closure
        (colmena's build and copy, which may take long, happen before the timer runs) and arm
        the timer. Errors here mean nothing was deployed."""
        code, out, err = self.run("readlink /run/current-system", False)
        if code != 0:
            raise K3sClusterError(
                f"{self.host}: cannot read the system it runs before the deploy: "
                f"{_last(err) or f'exit {code}'}; nothing was deployed",
                hint="check that the host is up and accepts your ssh key for root",
            )
        self.prev = store_path(out, f"{self.host}: /run/current-system")
        self.progress(f"{self.host}: runs {self.prev} before the deploy")
        if self.confirm_timeout <= 0:
            return
        push()
        code, out, err = self.run(arm_script(self.prev, self.unit_id, self.confirm_timeout), False)
        if code != 0:
            raise K3sClusterError(
                f"{self.host}: cannot arm the dead-man switch (systemd-run): "
                f"{_last(err) or f'exit {code}'}; nothing was deployed",
                hint="to deploy without it: pulumi config set k3scluster:confirmTimeout 0",
            )
        self.armed_at = self.clock()
        self.progress(f"{self.host}: armed {UNIT_PREFIX}{self.unit_id}.timer: back to {self.prev} "
                      f"unless confirmed within {self.confirm_timeout:g} s of the switch's end")

    def after_switch(self) -> None:
        """Confirm over a new ssh connection within ``confirm_timeout`` of colmena's return
        (the timer waits for a running switch, then as long: :func:`wait_for_switch_script`),
        tried again until then; raises when the host could not be reached in time and rolled
        itself back."""
        if self.armed_at is None:
            return
        switch_took = self.clock() - self.armed_at  # colmena's switch returned only now
        deadline = self.clock() + self.confirm_timeout
        last = ""
        while True:
            code, out, err = self.run(confirm_script(self.unit_id), True)
            if code == 0 and "confirmed" in out:
                self.armed_at = None
                self.progress(f"{self.host}: a new ssh connection works after the switch: "
                              "the dead-man switch is disarmed")
                return
            if code == 0 and "fired" in out:
                break  # the timer won the race: it is rolling the host back
            last = _last(err) or f"exit {code}"
            if self.clock() >= deadline:
                break
            self.progress(f"{self.host}: no new ssh connection after the switch yet ({last})")
            self.sleep(min(2.0, max(0.1, deadline - self.clock())))
        self.armed_at = None
        raise self._rolled_itself_back(last, switch_took)

    def _rolled_itself_back(self, last: str, switch_took: float = 0.0) -> K3sClusterError:
        """After the timer fired: wait for ssh and for the host to be back on ``prev``.
        ``switch_took``: seconds from arming to colmena's return; when that is past what the
        timer waits for a running switch, the switch itself outlasted it (a start that hangs,
        not a lost host)."""
        self.rolled_back_by_timer = True
        within = f"{self.confirm_timeout:g} s"
        end = self.clock() + self.wait
        current = None
        while self.clock() < end:
            code, out, _err = self.run(STATE_SCRIPT, True)
            lines = out.split()
            if code == 0 and lines:
                current = lines[0]
                if current == self.prev and switch_took >= self.confirm_timeout + SWITCH_WAIT:
                    return self._slow_switch(switch_took)
                if current == self.prev:
                    return K3sClusterError(
                        f"{self.host}: no ssh connection after the switch within {within}; "
                        f"the host rolled itself back to {self.prev}",
                        hint="the new configuration cuts the host off (its network or sshd): "
                        "fix it and run again",
                    )
            self.sleep(2.0)
        if current is None:
            return K3sClusterError(
                f"{self.host}: no ssh connection after the switch within {within}, nor "
                f"{self.wait:g} s after (last: {last}); its armed timer should have rolled it "
                f"back to {self.prev}",
                hint="look at the host's console: journalctl -u "
                f"{UNIT_PREFIX}{self.unit_id}.service",
            )
        return K3sClusterError(
            f"{self.host}: no ssh connection after the switch within {within}; its armed timer "
            f"did not bring it back to {self.prev}: it runs {current}",
            hint=f"on the host: journalctl -u {UNIT_PREFIX}{self.unit_id}.service; to go back by "
            f"hand, on the host: {rollback_script(self.prev or '')}",
        )

    def _slow_switch(self, took: float) -> K3sClusterError:
        """The switch returned after the timer stopped waiting for it (``confirm_timeout`` +
        :data:`SWITCH_WAIT` s): the timer rolled the host back while it was still switching (a
        start that waits counts: an agent asks for a K3s server up to START_TIMEOUT_MIN, a
        server's container starts within as long). Saying that the host was cut off would send
        the operator looking at its network for nothing."""
        return K3sClusterError(
            f"{self.host}: the switch returned only after {took:.0f} s, later than the "
            f"dead-man switch waits for a switch ({self.confirm_timeout:g} s, then up to "
            f"{SWITCH_WAIT} s for a running one): its timer rolled the host back to "
            f"{self.prev} while the switch still ran",
            hint="a unit's start kept the switch waiting (a K3s agent waits up to "
            f"{START_TIMEOUT_MIN} minutes for a server that answers, a K3s server's container "
            "as long to start): see why on the host (journalctl -b -u podman-k3s-agent, "
            "-u container@k3s-server); the timer waits for a running switch "
            f"{SWITCH_WAIT // 60} minutes after k3scluster:confirmTimeout",
        )

    def failed(self, err: K3sClusterError, gates: Callable[[], None]) -> K3sClusterError:
        """The switch or a gate failed with ``err``: back to ``prev`` (``rollback``), the gates
        (``gates``, raising when they fail) again; ``err`` with what became of the host."""
        if self.prev is None or self.rolled_back_by_timer:
            return err  # nothing deployed yet, or the timer already rolled it back (said so)
        if self.armed_at is not None:  # colmena failed: disarm before anything else
            try:
                self.after_switch()
            except K3sClusterError as timer:
                return K3sClusterError(f"{err.message}; then {timer.message}", hint=timer.hint)
        if not self.rollback:
            return K3sClusterError(
                f"{err.message}; {self.host} stays on the new configuration "
                "(k3scluster:rollback is false)", hint=err.hint)
        code, out, why = self.run(STATE_SCRIPT, False)
        lines = out.split()
        if code == 0 and len(lines) >= 2 and lines[0] == lines[1] == self.prev:
            return K3sClusterError(
                f"{err.message}; {self.host} still runs {self.prev} (nothing to roll back)",
                hint=err.hint)
        self.progress(f"{self.host}: {err.message}; rolling back to {self.prev}")
        code, out, why = self.run(rollback_script(self.prev), False)
        if code != 0:
            return K3sClusterError(
                f"{err.message}; rolling {self.host} back to {self.prev} failed too: "
                f"{_last(why) or _last(out) or f'exit {code}'}",
                hint=f"on the host: {rollback_script(self.prev)} (or pick a generation in "
                "its boot menu)",
            )
        try:
            gates()
        except K3sClusterError as again:
            return K3sClusterError(
                f"{err.message}; {self.host} was rolled back to {self.prev}, but its gates fail "
                f"there too: {again.message}", hint=again.hint)
        return K3sClusterError(
            f"{err.message}; {self.host} was rolled back to {self.prev} and passes its gates "
            "there", hint=err.hint)


def _last(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""
