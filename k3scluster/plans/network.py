"""network.yaml: one mapping of gateway, netmask, nameservers, nixos, k3s and nixpkgs."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import yaml

from k3scluster.model import (
    DEFAULT_NAMESERVERS,
    DEFAULT_NIXOS_RELEASE,
    DEFAULT_STATE_VERSION,
    Location,
    Network,
)
from k3scluster.pins import (
    K3S_EXAMPLE,
    NEWEST_NIXOS_RELEASE,
    NIXPKGS_PINS,
    is_commit,
    is_tarball_hash,
    k3s_package_attr,
    minor_key,
    parse_k3s_minor,
)
from k3scluster.plans.files import NETWORK_YAML, Files
from k3scluster.plans.names import Names, reserved_kind
from k3scluster.plans.nixos import STATE_VERSION, check_state_version

NETWORK_REQUIRED = ("gateway", "netmask")
# keys are lowercased: stateVersion is read as stateversion
NETWORK_OPTIONAL = ("nameservers", "nixos", "k3s", "nixpkgs", "stateversion")

_NIXOS = re.compile(r"^[0-9]{2}\.(05|11)$")
_PREFIX = re.compile(r"^/?([0-9]{1,2})$")
_SYNTAX_HINT = "fix the YAML syntax (key: value, one per line)"
_EXAMPLE = "gateway: 192.168.1.1 and netmask: 24, one per line"


@dataclass
class _Keys:
    """The known keys of network.yaml: value node and line of each."""

    nodes: dict[str, yaml.Node] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    # scalar values once read (None: absent, or reported as not a single value)
    values: dict[str, str | None] = field(default_factory=dict)


class NetworkReader(Files, Names):
    def read_network(self) -> Network | None:
        rel = NETWORK_YAML
        node = self._network_mapping(rel)
        if node is None:
            return None
        keys = self._network_keys(rel, node)
        ok = True
        for key in NETWORK_REQUIRED:
            if key not in keys.nodes:
                ok = False
                self.error("network-key-missing", rel, 1, f"{key} is missing", f"write {_EXAMPLE}")
        gateway, net = self._gateway_and_subnet(rel, keys)
        if gateway is None or net is None or self.subnet is None:
            ok = False
        nameservers = self.parse_nameservers(
            rel, keys.nodes.get("nameservers"), keys.lines.get("nameservers", 1)
        )
        release_ok, nixos, pin = self._release(rel, keys)
        ok = ok and release_ok
        k3s = self._scalar(rel, keys, "k3s")
        k3s_minor = parse_k3s_minor(k3s) if k3s is not None else None
        if k3s is not None and k3s_minor is None:
            ok = False
            self.error(
                "k3s-version",
                rel,
                keys.lines["k3s"],
                f"k3s {k3s!r} is not a K3s minor release",
                f'write the K3s minor release like k3s: "{K3S_EXAMPLE}": servers and agents '
                "run the patch level the pinned nixpkgs packages",
            )
        elif pin is None and release_ok:
            release = nixos or DEFAULT_NIXOS_RELEASE
            ok = self._k3s_release(rel, keys, release, k3s_minor, nixos is not None) and ok
        if nixos is None and pin is None and release_ok:
            self._nixos_missing(rel, k3s_minor)
        self.nixos_line = keys.lines.get("nixos", 1)
        state_version = self._scalar(rel, keys, STATE_VERSION)
        if state_version is not None and not check_state_version(
            self, rel, keys.lines[STATE_VERSION], state_version, "stateVersion"
        ):
            ok = False
        if not ok or nameservers is None or gateway is None or net is None:
            return None
        return Network(
            gateway=gateway,
            network=net,
            nameservers=nameservers,
            nixos_release=nixos or DEFAULT_NIXOS_RELEASE,
            k3s_minor=k3s_minor,
            location=Location(rel, 1),
            nixpkgs_rev=pin[0] if pin else None,
            nixpkgs_sha256=pin[1] if pin else None,
            state_version=state_version,
        )

    def _network_mapping(self, rel: str) -> yaml.MappingNode | None:
        """The YAML mapping of network.yaml; None when there is none (reported)."""
        text = self.read_text(rel, required=True)
        if text is None:
            return None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            self.yaml_error("yaml-syntax", rel, exc, _SYNTAX_HINT)
            return None
        except yaml.reader.ReaderError as exc:
            self.error(
                "yaml-syntax",
                rel,
                text.count("\n", 0, exc.position) + 1,
                f"not valid YAML: {exc.reason}",
                "remove the control character",
            )
            return None
        except (yaml.YAMLError, RecursionError) as exc:
            self.error("yaml-syntax", rel, 1, f"not valid YAML: {type(exc).__name__}", _SYNTAX_HINT)
            return None
        if node is None:
            self.error(
                "network-key-missing",
                rel,
                1,
                "empty file: gateway and netmask are missing",
                f"write {_EXAMPLE}",
            )
            return None
        if not isinstance(node, yaml.MappingNode):
            self.error(
                "yaml-syntax",
                rel,
                node.start_mark.line + 1,
                "must be a mapping of keys, not a list or a single value",
                f"write {_EXAMPLE}",
            )
            return None
        return node

    def _network_keys(self, rel: str, node: yaml.MappingNode) -> _Keys:
        """The known keys, reporting keys that are not words, repeated or unknown."""
        keys = _Keys()
        known = NETWORK_REQUIRED + NETWORK_OPTIONAL
        for knode, vnode in node.value:
            line = knode.start_mark.line + 1
            if not isinstance(knode, yaml.ScalarNode):
                self.error(
                    "yaml-syntax",
                    rel,
                    line,
                    "a key must be a plain word",
                    f"use the keys {', '.join(known)}",
                )
                continue
            key = knode.value.strip().lower()
            if key in keys.nodes:
                self.error(
                    "network-key-duplicate",
                    rel,
                    line,
                    f"{key!r} is set twice (first at line {keys.lines[key]})",
                    "keep one",
                )
                continue
            if key not in known:
                self.warn(
                    "network-key-unknown",
                    rel,
                    line,
                    f"unknown key {key!r} is ignored",
                    f"the keys are {', '.join(known)}",
                )
                continue
            keys.nodes[key] = vnode
            keys.lines[key] = line
        return keys

    def _scalar(self, rel: str, keys: _Keys, key: str) -> str | None:
        """The single value of ``key`` (None when absent, or reported as not a single value)."""
        if key not in keys.values:
            vnode = keys.nodes.get(key)
            value: str | None = None
            if isinstance(vnode, yaml.ScalarNode):
                value = str(vnode.value).strip()
            elif vnode is not None:
                self.error(
                    "network-value",
                    rel,
                    keys.lines[key],
                    f"{key} must be a single value",
                    f"write {key}: VALUE",
                )
            keys.values[key] = value
        return keys.values[key]

    def _gateway_and_subnet(
        self, rel: str, keys: _Keys
    ) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv4Network | None]:
        """The gateway and the subnet it decides; ``self.subnet`` is set when both are sound."""
        raw_gateway = self._scalar(rel, keys, "gateway")
        gateway = None
        if raw_gateway is not None:
            gateway = self.parse_ip(rel, keys.lines["gateway"], "gateway", raw_gateway)
        raw_mask = self._scalar(rel, keys, "netmask")
        net = self.parse_netmask(rel, keys.lines.get("netmask", 1), raw_mask, gateway)
        if gateway is None or net is None:
            return gateway, net
        mline = keys.lines["gateway"]
        if gateway not in net:
            self.error(
                "gateway",
                rel,
                mline,
                f"gateway {gateway} is outside the subnet {net}",
                "fix the gateway or the netmask",
            )
        elif gateway in (net.network_address, net.broadcast_address):
            self.error(
                "gateway",
                rel,
                mline,
                f"gateway {gateway} is the {reserved_kind(gateway, net)} address of {net}",
                "use the router's address in the subnet",
            )
        else:
            self.subnet = net  # host addresses are checked only against a sound subnet
            self.gateway = gateway
            self.network_lines = dict(keys.lines)
            self.ips[gateway] = ("the gateway", Location(rel, mline))
        return gateway, net

    def _release(self, rel: str, keys: _Keys) -> tuple[bool, str | None, tuple[str, str] | None]:
        """(ok, nixos, nixpkgs pin): the release asked for and the nixpkgs it builds from."""
        ok = True
        nixos = self._scalar(rel, keys, "nixos")
        if nixos is not None and not _NIXOS.match(nixos):
            ok = False
            self.error(
                "nixos-release",
                rel,
                keys.lines["nixos"],
                f"nixos {nixos!r} is not a release",
                f'write a NixOS release like nixos: "{DEFAULT_NIXOS_RELEASE}"',
            )
        pin_ok, pin = self.parse_nixpkgs_pin(
            rel, keys.nodes.get("nixpkgs"), keys.lines.get("nixpkgs", 1)
        )
        ok = ok and pin_ok
        release = nixos or DEFAULT_NIXOS_RELEASE
        if pin is None and _NIXOS.match(release) and release not in NIXPKGS_PINS:
            ok = False
            self.error(
                "nixos-release",
                rel,
                keys.lines.get("nixos", 1),
                f"k3scluster knows no nixpkgs commit for NixOS {release}",
                f"use one of {', '.join(sorted(NIXPKGS_PINS))}, or pin nixpkgs yourself: "
                "nixpkgs: {rev: <40-hex commit>, sha256: <nix-prefetch-url --unpack hash>}",
            )
        return ok, nixos, pin

    def _k3s_release(
        self, rel: str, keys: _Keys, release: str, asked: str | None, named: bool
    ) -> bool:
        """Does k3scluster's nixpkgs pin for ``release`` package the K3s minor release the
        plan needs (``asked``, or the release's default without `k3s:`)? True: yes or
        unknown (only a pin with a record of its k3s_1_XX attributes, or of the newest one
        it can have, can tell)."""
        pin = NIXPKGS_PINS.get(release)
        if pin is None:
            return True
        minor = asked or pin.k3s_default
        known = pin.k3s_minors
        if known is not None and minor in known:
            return True
        if known is None and (
            pin.k3s_newest is None or minor_key(minor) <= minor_key(pin.k3s_newest)
        ):
            return True
        why = "has no" if known is not None else "cannot have"
        line = keys.lines.get("k3s", keys.lines.get("nixos", 1))
        usable = (
            "use one of " + ", ".join(f'k3s: "{m}"' for m in known) + ", another nixos:,"
            if known is not None
            else f'write nixos: "{NEWEST_NIXOS_RELEASE}" (or another release that has it),'
        )
        self.error(
            "k3s-release",
            rel,
            line,
            f"the nixpkgs k3scluster pins for NixOS {release}"
            + ("" if named else " (no nixos: in the plan)")
            + f" {why} pkgs.{k3s_package_attr(minor)} (K3s {minor})",
            usable + " or pin nixpkgs yourself: nixpkgs: {rev: <commit>, sha256: <hash>}"
            " (K3s upgrades one minor release at a time)",
        )
        return False

    def _nixos_missing(self, rel: str, k3s_minor: str | None) -> None:
        """A plan without `nixos:` silently runs DEFAULT_NIXOS_RELEASE: say which, and until
        when NixOS supported it."""
        pin = NIXPKGS_PINS[DEFAULT_NIXOS_RELEASE]
        eol = f", end of life since {pin.end_of_life}" if pin.end_of_life else ""
        k3s = (
            f" and K3s {pin.k3s_default} (no k3s: either)" if k3s_minor is None else ""
        )
        # A cluster that runs keeps what it runs, written out: a jump to the newest release
        # would skip K3s minor releases (it packages none that such a cluster runs).
        runs_now = f'the line nixos: "{DEFAULT_NIXOS_RELEASE}"' + (
            f' and k3s: "{pin.k3s_default}"' if k3s_minor is None else ""
        )
        self.warn(
            "nixos-missing",
            rel,
            1,
            f"no nixos: the hosts run NixOS {DEFAULT_NIXOS_RELEASE}{eol}{k3s}",
            f"a cluster that runs: add {runs_now} (what the hosts run now), then move NixOS "
            "and K3s forward one release at a time (K3s upgrades one minor release at a "
            f'time); a new cluster: nixos: "{NEWEST_NIXOS_RELEASE}" (what `k3scluster init` '
            "writes)"
            + (
                f', k3s: "{NIXPKGS_PINS[NEWEST_NIXOS_RELEASE].k3s_default}"'
                if k3s_minor is None
                else " and a k3s: it packages"
            )
            + f'. stateVersion: "{DEFAULT_STATE_VERSION}" if it is not there (the release the '
            "hosts were installed with; never change it afterwards)",
        )

    def parse_nixpkgs_pin(
        self, rel: str, node: yaml.Node | None, line: int
    ) -> tuple[bool, tuple[str, str] | None]:
        """``nixpkgs: {rev, sha256}`` -> (ok, (rev, sha256) or None when absent or wrong)."""
        if node is None:
            return True, None
        hint = (
            "write nixpkgs: {rev: <40-hex commit of NixOS/nixpkgs>, sha256: <hash of its "
            "unpacked tarball: nix-prefetch-url --unpack https://github.com/NixOS/nixpkgs/"
            "archive/<rev>.tar.gz>}"
        )
        if not isinstance(node, yaml.MappingNode):
            self.error(
                "nixpkgs-pin", rel, line, "nixpkgs must be a mapping of rev and sha256", hint
            )
            return False, None
        found: dict[str, str] = {}
        good = True
        for knode, vnode in node.value:
            key = str(knode.value).strip().lower() if isinstance(knode, yaml.ScalarNode) else ""
            kline = knode.start_mark.line + 1
            if key not in ("rev", "sha256") or not isinstance(vnode, yaml.ScalarNode):
                self.error("nixpkgs-pin", rel, kline, "nixpkgs takes only rev and sha256", hint)
                good = False
                continue
            value = str(vnode.value).strip()
            if key == "rev" and not is_commit(value.lower()):
                self.error(
                    "nixpkgs-pin", rel, kline, f"nixpkgs rev {value!r} is not a full commit", hint
                )
                good = False
            elif key == "sha256" and not is_tarball_hash(value):
                self.error(
                    "nixpkgs-pin",
                    rel,
                    kline,
                    f"nixpkgs sha256 {value!r} is not a nix32 or sha256-… hash",
                    hint,
                )
                good = False
            found[key] = value.lower() if key == "rev" else value
        if good and set(found) != {"rev", "sha256"}:
            self.error("nixpkgs-pin", rel, line, "nixpkgs needs both rev and sha256", hint)
            good = False
        return (True, (found["rev"], found["sha256"])) if good else (False, None)

    def parse_netmask(
        self, rel: str, line: int, raw: str | None, gateway: ipaddress.IPv4Address | None
    ) -> ipaddress.IPv4Network | None:
        hint = 'write a prefix length (netmask: 24 or "/24") or a mask (netmask: 255.255.255.0)'
        if raw is None:
            return None  # missing: reported already
        if raw == "":
            self.error("netmask", rel, line, "netmask is empty", hint)
            return None
        prefix: int | None = None
        m = _PREFIX.match(raw)
        try:
            if m:
                prefix = int(m.group(1))
            elif "/" in raw:
                net = ipaddress.IPv4Network(raw, strict=True)
                prefix = net.prefixlen
                if not 1 <= prefix <= 30:
                    raise ValueError
                return net
            else:
                mask = int(ipaddress.IPv4Address(raw))
                inv = ~mask & 0xFFFFFFFF
                if inv & (inv + 1):
                    raise ValueError
                prefix = 32 - inv.bit_length()
        except ValueError:
            self.error("netmask", rel, line, f"netmask {raw!r} is not a netmask", hint)
            return None
        if not 1 <= prefix <= 30:
            self.error(
                "netmask",
                rel,
                line,
                f"netmask /{prefix} leaves no room for a gateway and hosts"
                if prefix > 30
                else f"netmask /{prefix} is not a home subnet",
                "use a prefix length between 1 and 30, usually 24",
            )
            return None
        if gateway is None:
            return None
        return ipaddress.IPv4Network(f"{gateway}/{prefix}", strict=False)

    def parse_nameservers(
        self, rel: str, vnode: yaml.Node | None, line: int
    ) -> tuple[ipaddress.IPv4Address, ...] | None:
        if vnode is None:
            return DEFAULT_NAMESERVERS
        if isinstance(vnode, yaml.ScalarNode):
            items = [vnode] if vnode.value.strip() else []
        elif isinstance(vnode, yaml.SequenceNode):
            items = list(vnode.value)
        else:
            items = []
        if not items:
            self.error(
                "network-value",
                rel,
                line,
                "nameservers must be a list of addresses",
                "write nameservers: [192.168.1.1, 8.8.8.8] or leave the key out (default 8.8.8.8)",
            )
            return None
        result = []
        for item in items:
            iline = item.start_mark.line + 1
            if not isinstance(item, yaml.ScalarNode):
                self.error(
                    "network-value",
                    rel,
                    iline,
                    "a nameserver must be an address",
                    "write one IPv4 address per list item",
                )
                return None
            ip = self.parse_ip(rel, iline, "nameserver", str(item.value).strip())
            if ip is None:
                return None
            result.append(ip)
        return tuple(result)
