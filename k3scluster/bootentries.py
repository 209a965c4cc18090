"""Whether a NixOS system needs a reboot: the one rule, and its two readers.

What decides it is the toplevel's boot entries (:data:`BOOT_FILES`: the kernel and initrd
links, the kernel-params file). An entry differs when it is readable in both systems and its
link target (a link) or its text (a file) is not the same. ``k3scluster build`` compares a
deployed and a built system in the local store (:func:`boot_changes`); ``status`` and each
host's deploy run :func:`boot_script` on the host, comparing its booted and current systems.
The deploy records what it saw (its record's ``"reboot"``); :func:`hosts_needing_reboot` reads
those records for the stack output ``needsReboot`` and :func:`reboot_warning` words the warning
the run ends with.

Plain library code: it imports neither pulumi nor ``k3scluster.components`` (which use it).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path

BOOT_FILES = ("kernel", "initrd", "kernel-params")


def _boot_entry(path: Path) -> str | None:
    try:
        return os.readlink(path) if path.is_symlink() else path.read_text()
    except OSError:
        return None


def boot_changes(deployed: str, built: str) -> list[str]:
    """Which of the systems' kernel, initrd and kernel parameters differ (those readable in
    both): any of them means the host runs the new system only after a reboot."""
    changed = []
    for name in BOOT_FILES:
        a, b = _boot_entry(Path(deployed) / name), _boot_entry(Path(built) / name)
        if a is not None and b is not None and a != b:
            changed.append(name)
    return changed


def boot_script(booted: str = "/run/booted-system", current: str = "/run/current-system") -> str:
    """Shell: one line ``reboot:<entry>`` per boot entry that differs between ``booted`` and
    ``current``, then ``reboot-checked`` (missing when either has no kernel: not a NixOS
    system as far as this can tell)."""
    entries = " ".join(BOOT_FILES)
    return (
        'e() { if [ -L "$1" ]; then readlink "$1"; else cat "$1"; fi 2>/dev/null; }; '
        f'b={shlex.quote(booted)} c={shlex.quote(current)}; if [ -e "$b/kernel" ] && [ -e "$c/kernel" ]; then '
        f'for f in {entries}; do x=$(e "$b/$f") && y=$(e "$c/$f") && [ "$x" != "$y" ] '
        '&& echo "reboot:$f"; done; echo reboot-checked; fi'
    )


def hosts_needing_reboot(records: Mapping[str, object]) -> list[str]:
    """The hosts (sorted) whose deploy record says a boot entry changed since the host booted
    (``"reboot"``: a non-empty list). No record, or a record that could not tell (None), is
    not in the list."""
    return sorted(
        host for host, rec in records.items()
        if isinstance(rec, dict) and isinstance(rec.get("reboot"), list) and rec["reboot"]
    )


def reboot_warning(hosts: list[str], ips: Mapping[str, str]) -> str | None:
    """The warning a run ends with when hosts run a system their booted kernel, initrd or
    kernel parameters do not match; None when no host needs a reboot."""
    if not hosts:
        return None
    return (
        f"{len(hosts)} host(s) need a reboot to run their new kernel, initrd or kernel "
        f"parameters: {', '.join(hosts)}. k3scluster does not reboot them: reboot them one "
        "at a time, each after draining its K3s node (`kubectl drain NODE "
        "--ignore-daemonsets --delete-emptydir-data`), and wait for it to come back Ready "
        "(then `kubectl uncordon NODE`) before the next: "
        + "; ".join(f"ssh root@{ips.get(h, h)} systemctl reboot" for h in hosts)
        + ". The stack output `needsReboot` lists them until their next deploy; `k3scluster "
        "status` checks each host itself."
    )
