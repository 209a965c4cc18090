"""What the program sees of a lab when it runs (``pulumi preview`` / ``up``): is the bridge
there, is each installed VM running? A machine that restarted has neither; the steps take
the answer as an input, so ``up`` shows them as updates and runs ``net-up`` / ``vm-up``
again, which make the bridge, the taps and the VMs' QEMUs again.

``ok`` is also the answer before the lab was ever made (nothing to heal) and when this user
cannot tell (the lab's files are root's): a preview never shows a change it cannot see.
After a heal the next preview shows each healed step once more (its input goes from
``down`` back to ``ok``); that update does nothing (``vm-up`` of a running VM).
"""

from __future__ import annotations

import json
from pathlib import Path

from k3scluster.lab.network import NETWORK_FILE
from k3scluster.lab.process import qemu_running
from k3scluster.lab.spec import MARKER, NetSpec, VmSpec

OK, DOWN = "ok", "down"


def _exists(path: Path) -> bool | None:
    try:
        return path.exists()
    except OSError:  # (PermissionError: another user's lab)
        return None


def network_state(net: NetSpec) -> str:
    if _exists(Path("/sys/class/net") / net.bridge):
        return OK
    lab = net.lab_path
    made = _exists(lab / NETWORK_FILE) if lab is not None else False
    return DOWN if made else OK


def vm_state(spec: VmSpec) -> str:
    if qemu_running(spec.name):
        return OK
    try:
        manifest = json.loads((spec.path / MARKER).read_text())
    except (OSError, ValueError):
        return OK
    return DOWN if isinstance(manifest, dict) and manifest.get("installed") else OK
