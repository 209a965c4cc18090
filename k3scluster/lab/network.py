"""The lab network of a stack: its bridge (the plan's gateway), the VMs' taps in it, and the
optional NAT (an nftables table of the stack's own).

``net_up`` is idempotent and heals: it makes what is missing (after a reboot of this machine
nothing is left), puts every tap of the stack back into the bridge (a bridge made again has no
ports), and turns NAT on or off as the spec says. What it finds before it turns IP forwarding
on is written to ``<lab>/network.json`` with the spec, and ``net_down`` (or NAT turned off)
puts it back. ``vm-start`` reads that file to make the bridge again when it is missing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from k3scluster.errors import K3sClusterError
from k3scluster.lab import netcheck
from k3scluster.lab.lock import make_lab_dir, network_lock
from k3scluster.lab.process import run, say
from k3scluster.lab.spec import NetSpec, VmSpec, lab_owner

NAT_TABLE_PREFIX = "k3scluster_"
NETWORK_FILE = "network.json"
FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def link(name: str) -> dict[str, Any] | None:
    proc = run(["ip", "-j", "-d", "link", "show", "dev", name], check=False)
    if proc.returncode != 0:
        return None
    data = json.loads(proc.stdout or "[]")
    return data[0] if data else None


def nat_table(owner: str) -> str:
    """The lab's nftables table, named by its owner (``lab_owner``: stack and lab id)."""
    from k3scluster.lab.spec import _hex

    return NAT_TABLE_PREFIX + _hex("nat", owner)[:8]


def owner_of(alias: object) -> str:
    """Whose a link is, by its alias (``k3scluster:<owner>[:<host>]``), for messages."""
    text = str(alias or "")
    if not text.startswith("k3scluster:"):
        return "it is no k3scluster lab's link" + (f" (its alias is {text!r})" if text else "")
    return f"it belongs to lab {text.removeprefix('k3scluster:')!r}"


FORWARDING_COMMENT = "k3scluster ip_forward before: "


def nat_ruleset(net: NetSpec, forwarding_before: str | None = None) -> str:
    """nft script: masquerade the lab subnet out of every other interface, forward it. The
    table's comment keeps IP forwarding as the first lab's NAT found it (``_nat_on``)."""
    comment = (
        f'  comment "{FORWARDING_COMMENT}{forwarding_before}"\n'
        if forwarding_before in ("0", "1") else ""
    )
    return f"""table ip {nat_table(net.owner)} {{
{comment}  chain lab_postrouting {{
    type nat hook postrouting priority srcnat;
    ip saddr {net.subnet} oifname != "{net.bridge}" masquerade
  }}
  chain lab_forward {{
    type filter hook forward priority filter;
    iifname "{net.bridge}" accept
    oifname "{net.bridge}" ct state established,related accept
  }}
}}
"""


def _network_file(net: NetSpec) -> Path | None:
    lab = net.lab_path
    return lab / NETWORK_FILE if lab is not None else None


def _read_record(net: NetSpec) -> dict[str, Any]:
    f = _network_file(net)
    try:
        data = json.loads(f.read_text()) if f else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_owner(data: dict[str, Any]) -> str | None:
    """The lab (``lab_owner``) whose network a record describes; None when it names none."""
    spec = data.get("spec")
    if not isinstance(spec, dict) or not spec.get("stack"):
        return None
    return lab_owner(str(spec["stack"]), str(spec.get("lab_id") or ""))


def _foreign_record(net: NetSpec) -> str | None:
    """The other lab whose network the lab directory's record describes (two stacks share
    the lab directory), else None."""
    owner = _record_owner(_read_record(net))
    return owner if owner is not None and owner != net.owner else None


def _recorded(net: NetSpec) -> dict[str, Any]:
    """This lab's record ({} when there is none, or it is another lab's)."""
    return {} if _foreign_record(net) else _read_record(net)


def _record(net: NetSpec, **extra: Any) -> None:
    f = _network_file(net)
    if f is None:
        return
    make_lab_dir(f.parent)
    data = {**_recorded(net), **extra, "spec": json.loads(net.to_json())}
    tmp = f.with_name(f".{f.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(f)


def recorded_net(lab: Path) -> NetSpec | None:
    """The network spec the last ``net-up`` of this lab wrote (to make the bridge again),
    with the lab directory where it was found (its spec records it relative to the project,
    and ``k3scluster vms`` may run anywhere)."""
    try:
        data = json.loads((lab / NETWORK_FILE).read_text())
        return dataclasses.replace(NetSpec(**data["spec"]), lab_dir=str(lab))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _forwarding() -> str:
    try:
        return FORWARD.read_text().strip()
    except OSError:
        return ""


def _other_labs_nat(net: NetSpec) -> list[str]:
    """The NAT tables of the other VM labs on this machine (this network namespace)."""
    if not shutil.which("nft"):
        return []
    out = run(["nft", "list", "tables"], check=False).stdout
    names = re.findall(rf"^table ip ({NAT_TABLE_PREFIX}\w+)$", out, flags=re.MULTILINE)
    return [n for n in names if n != nat_table(net.owner)]


def _forwarding_as_found(net: NetSpec) -> str:
    """IP forwarding as it was before any lab's NAT: another lab's NAT table says (it
    turned forwarding on; what it found is in its comment), else as it is now."""
    for table in _other_labs_nat(net):
        text = run(["nft", "list", "table", "ip", table], check=False).stdout
        found = re.search(rf'comment "{FORWARDING_COMMENT}([01])"', text)
        if found:
            return found.group(1)
    return _forwarding()


def _nat_on(net: NetSpec) -> None:
    before = _recorded(net).get("forwardingBefore")
    if before is None:
        before = _forwarding_as_found(net)
        _record(net, forwardingBefore=before)
    run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    run(["nft", "delete", "table", "ip", nat_table(net.owner)], check=False)
    proc = subprocess.run(
        ["nft", "-f", "-"], input=nat_ruleset(net, before), capture_output=True, text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise K3sClusterError(
            f"nft could not add the lab's NAT: {proc.stderr.strip()}",
            hint="install nftables, or pulumi config set k3scluster:vmNat false",
        )
    say(f"NAT for {net.subnet} (nft table ip {nat_table(net.owner)})")


def _nat_off(net: NetSpec) -> None:
    if shutil.which("nft"):
        run(["nft", "delete", "table", "ip", nat_table(net.owner)], check=False)
    before = _recorded(net).get("forwardingBefore")
    others = _other_labs_nat(net) if before is not None else []
    if others:  # their NAT needs it; the last one puts it back (its table's comment)
        say(f"IP forwarding stays on: another lab's NAT (nft table ip {others[0]}) uses it")
    elif before in ("0", "1") and _forwarding() != before:
        run(["sysctl", "-q", "-w", f"net.ipv4.ip_forward={before}"])
        say(f"IP forwarding back to {before}, as it was before the lab's NAT")
    if before is not None:
        _record(net, forwardingBefore=None)


def _reattach_taps(net: NetSpec) -> None:
    """Every tap of this stack (by its alias) back into the bridge."""
    prefix = net.alias + ":"
    for entry in netcheck.ip_json("link"):
        if str(entry.get("ifalias", "")).startswith(prefix) and entry.get("master") != net.bridge:
            run(["ip", "link", "set", "dev", entry["ifname"], "master", net.bridge])
            run(["ip", "link", "set", "dev", entry["ifname"], "up"])
            say(f"tap {entry['ifname']} back in {net.bridge}")


def _foreign(name: str, found: dict[str, Any], alias: str, what: str) -> K3sClusterError:
    return K3sClusterError(
        f"a link named {name} exists and is not {what} (alias {alias!r}): "
        f"{owner_of(found.get('ifalias'))}; nothing was changed",
        hint="another lab on this machine (a stack of the same name in another cluster "
        "directory or Pulumi project) or something else owns it: delete or rename it yourself "
        "if it is stale",
    )


def net_up(net: NetSpec) -> None:
    """The lab's bridge, gateway, taps and NAT as the spec says; one process at a time
    (``network_lock``)."""
    with network_lock(net.lab_path):
        _net_up(net)


def _net_up(net: NetSpec) -> None:
    alias = net.alias
    other = _foreign_record(net)
    if other is not None:
        raise K3sClusterError(
            f"{_network_file(net)} records the network of lab {other!r}, not of "
            f"{net.owner!r}: two stacks share this lab directory; nothing was changed",
            hint="give one of them another k3scluster:renderDir (if that lab is gone, "
            "delete its lab directory yourself)",
        )
    # before anything is created: the subnet must be free on this machine
    netcheck.check_machine(ipaddress.IPv4Network(net.subnet), net.bridge, alias, net.location)
    found = link(net.bridge)
    if found is not None and found.get("ifalias") != alias:
        raise _foreign(net.bridge, found, alias, "this lab's bridge")
    made = found is None
    if made:
        run(["ip", "link", "add", "name", net.bridge, "type", "bridge"])
        say(f"created bridge {net.bridge}")
    try:
        if made:
            run(["ip", "link", "set", "dev", net.bridge, "alias", alias])
        _bridge_up(net)
    except BaseException:
        if made:  # nothing left that the state does not know
            run(["ip", "link", "delete", "dev", net.bridge], check=False)
            _undo_nat(net)
        raise
    say(f"lab network {net.bridge}: {net.gateway}")


def _undo_nat(net: NetSpec) -> None:
    """After a failed net-up that made the bridge: its NAT table gone and IP forwarding back
    as it was found (``_nat_off``), so the machine routes nothing for a lab that is not
    there. A failure here is said, not raised: the net-up's own error is the one to show."""
    try:
        _nat_off(net)
    except Exception as err:  # noqa: BLE001 - the original error follows
        say(f"could not undo the lab's NAT and forwarding: {err}")


def _bridge_up(net: NetSpec) -> None:
    addrs = netcheck.ip_json("addr", "show", "dev", net.bridge)
    have = {
        f"{a.get('local')}/{a.get('prefixlen')}"
        for entry in addrs for a in entry.get("addr_info", []) if a.get("family") == "inet"
    }
    for old in sorted(have - {net.gateway}):  # a changed gateway or prefix
        run(["ip", "addr", "del", old, "dev", net.bridge])
    if net.gateway not in have:
        run(["ip", "addr", "add", net.gateway, "dev", net.bridge])
    run(["ip", "link", "set", "dev", net.bridge, "up"])
    _record(net)
    _reattach_taps(net)
    if net.nat:
        _nat_on(net)
    else:
        _nat_off(net)


def net_down(net: NetSpec) -> None:
    with network_lock(net.lab_path):
        _net_down(net)


def _net_down(net: NetSpec) -> None:
    found = link(net.bridge)
    if found is None:
        say(f"bridge {net.bridge} is gone already")
    elif found.get("ifalias") != net.alias:
        say(f"{net.bridge} is not this lab's bridge (alias {net.alias!r}): "
            f"{owner_of(found.get('ifalias'))}; not deleted")
    else:
        run(["ip", "link", "delete", "dev", net.bridge])
        say(f"deleted bridge {net.bridge}")
    _nat_off(net)
    f = _network_file(net)
    if f is not None and _foreign_record(net) is None:  # another lab's record stays
        f.unlink(missing_ok=True)


def ensure_bridge(spec: VmSpec) -> None:
    """The VM's bridge, made again from the lab's record when it is missing (after a reboot
    of this machine)."""
    if link(spec.bridge) is not None:
        return
    net = recorded_net(spec.path.parent)
    if net is None or net.bridge != spec.bridge:
        raise K3sClusterError(
            f"the lab bridge {spec.bridge} does not exist and this lab has no record of it",
            hint="run pulumi up",
        )
    say(f"the lab bridge {spec.bridge} is missing (this machine restarted?): making it again")
    net_up(net)


def ensure_tap(spec: VmSpec) -> None:
    found = link(spec.tap)
    if found is not None and found.get("ifalias") != spec.tap_alias:
        raise _foreign(spec.tap, found, spec.tap_alias, f"{spec.host}'s tap of this lab")
    ensure_bridge(spec)
    if found is None:
        run(["ip", "tuntap", "add", "dev", spec.tap, "mode", "tap"])
        run(["ip", "link", "set", "dev", spec.tap, "alias", spec.tap_alias])
    run(["ip", "link", "set", "dev", spec.tap, "master", spec.bridge])
    run(["ip", "link", "set", "dev", spec.tap, "up"])


def delete_tap(spec: VmSpec) -> None:
    found = link(spec.tap)
    if found is None:
        return
    if found.get("ifalias") == spec.tap_alias:
        run(["ip", "link", "delete", "dev", spec.tap])
    else:
        say(f"{spec.tap} is not {spec.host}'s tap of this lab: "
            f"{owner_of(found.get('ifalias'))}; not deleted")
