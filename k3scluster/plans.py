"""Read a cluster directory into a ``Cluster``, checking every rule in one pass.

``load(root)`` never raises for a user mistake: whatever is in the directory
(binary garbage, a directory where a file should be, a YAML list instead of a
mapping, ...) becomes a ``Diagnostic`` at ``FILE:LINE`` with a hint. The cluster
is returned only when there is no error; warnings do not stop it.

Every diagnostic is raised under a rule id (``RULES``): the plan-format reference
(docs/plan-format.md) documents each one and the tests hold one case per rule.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import ipaddress
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from k3scluster.errors import Diagnostic, PlanError, Severity
from k3scluster.model import (
    DEFAULT_K3S_VERSION,
    DEFAULT_NAMESERVERS,
    DEFAULT_NIXOS_RELEASE,
    BootMode,
    Cluster,
    Host,
    K3sNode,
    K3sType,
    Location,
    Network,
    SecretFile,
    Secrets,
    SshKey,
)
from k3scluster.pins import NIXPKGS_PINS, is_commit, is_tarball_hash

HOSTS_CSV = "plans/hosts.csv"
K3S_CSV = "plans/k3s.csv"
NETWORK_YAML = "plans/network.yaml"

HOST_REQUIRED = ("name", "interface", "ip", "admin")
HOST_OPTIONAL = ("disk", "boot")
K3S_REQUIRED = ("host", "name", "type", "ip")
# hosts.csv columns that cannot be used: the NixOS config gets them from elsewhere
HOST_RESERVED = {"k3s": "config.cluster.<host>.k3s holds the host's K3s rows"}
NETWORK_REQUIRED = ("gateway", "netmask")
NETWORK_OPTIONAL = ("nameservers", "nixos", "k3s", "nixpkgs")
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

# rule id -> what it checks (documented in docs/plan-format.md, one test case each)
RULES: dict[str, str] = {
    "cluster-dir": "the cluster directory exists and is a directory",
    "file-missing": "plans/hosts.csv and plans/network.yaml exist",
    "file-unreadable": "a plan or secret is a readable file (not a directory)",
    "file-encoding": "plan files are UTF-8 text without NUL bytes",
    "dir-invalid": "nixConfigs/, secrets/, manifests/ are directories when present",
    "csv-syntax": "the CSV can be parsed (quotes closed)",
    "csv-header": "header names are not empty and not repeated",
    "csv-column-missing": "every required column is in the header",
    "csv-field-count": "every row has as many fields as the header",
    "no-hosts": "hosts.csv has at least one host",
    "host-name": "host names are RFC 1123 labels (a-z, 0-9, '-', at most 63)",
    "k3s-name": "K3s names are RFC 1123 labels (Kubernetes node names, no '_')",
    "name-duplicate": "names are unique across hosts and K3s nodes, ignoring case",
    "interface-name": "interface names are at most 15 characters of a-z, 0-9, '-', '_', '.'",
    "admin-name": "the admin is a valid Linux user name other than root",
    "ip-invalid": "addresses are IPv4 addresses",
    "ip-outside-subnet": "host and K3s addresses lie in gateway/netmask",
    "ip-reserved": "no address is the subnet's network or broadcast address",
    "ip-duplicate": "no address is used twice (hosts, K3s nodes, gateway)",
    "boot-mode": "boot is efi or bios",
    "disk-serial": "a disk serial holds only characters a /dev/disk/by-id name can",
    "k3s-type": "type is init-server, server or agent",
    "k3s-host-unknown": "every K3s row names a host of hosts.csv",
    "k3s-host-slot": "at most one server and one agent per host",
    "k3s-init-server": "exactly one init-server when there are K3s rows",
    "k3s-no-server": "agents need servers",
    "k3s-no-agent": "servers need agents to run pods (servers are agentless)",
    "k3s-server-count": "an odd number of servers (etcd quorum)",
    "yaml-syntax": "network.yaml is valid YAML: one mapping",
    "network-key-missing": "gateway and netmask are set",
    "network-key-unknown": "network.yaml has no unknown keys",
    "network-key-duplicate": "no key is repeated in network.yaml",
    "network-value": "a network.yaml key has the right shape (single value / list)",
    "netmask": "netmask is a prefix length 1-30, '/24', or a dotted mask",
    "gateway": "the gateway is in the subnet and not its network/broadcast address",
    "nixos-release": "nixos is a release like 25.05 that k3scluster has a nixpkgs pin for",
    "nixpkgs-pin": "nixpkgs, when set, is {rev: <40-hex commit>, sha256: <tarball hash>}",
    "k3s-version": "k3s is a version like v1.31.12+k3s1",
    "token-missing": "secrets/token exists",
    "token-invalid": "the token is one line of printable characters",
    "passwd-missing": "every host has a password hash (secrets/passwd or secrets/HOSTpasswd)",
    "passwd-invalid": "a password file holds one crypt hash ($y$, $6$, $5$, $2b$)",
    "passwd-unknown-host": "a HOSTpasswd file names a host of hosts.csv",
    "ssh-key-missing": "every host has at least one ssh public key",
    "ssh-key-invalid": "files ending in .pub hold ssh public keys",
    "secret-permissions": "secret files are not readable by group/others",
    "nixconfig-unknown": "nixConfigs files (.nix) are named after a host or K3s node",
    "bios-grub-device": "a BIOS host's nixConfigs tell GRUB its disk (boot.loader.grub.device)",
    "manifest-name": "manifest file names are RFC 1123 names (lowercase a-z, 0-9, '-', '.')",
    "manifest-yaml": "manifests are valid YAML/JSON Kubernetes objects",
    "manifest-other": "manifests/ holds only .yaml, .yml and .json files",
}

# the rules that only warn: the cluster still loads
WARNING_RULES = frozenset(
    {
        "k3s-server-count",
        "k3s-no-agent",
        "network-key-unknown",
        "passwd-unknown-host",
        "secret-permissions",
        "nixconfig-unknown",
        "bios-grub-device",
        "manifest-other",
    }
)

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_IFACE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SERIAL = re.compile(r"^[a-z0-9#+\-.:=@_]+$")
_NIXOS = re.compile(r"^[0-9]{2}\.(05|11)$")
_K3S_VERSION = re.compile(r"^v1\.[0-9]+\.[0-9]+\+k3s[0-9]+$")
_CRYPT = re.compile(r"^\$(y|gy|7|2[aby]|5|6)\$[A-Za-z0-9./$=,]{8,}$")
_MANIFEST = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_PREFIX = re.compile(r"^/?([0-9]{1,2})$")
_GRUB_DEVICE = re.compile(r"grub[\s\S]*?\b(devices?|mirroredBoots)\b")
_RESERVED_USERS = frozenset({"root", "nobody", "daemon", "sshd", "nixbld"})
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ssh-dss",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)

_PASSWD_HINT = (
    "make a hash with `mkpasswd -m yescrypt` or `openssl passwd -6` and write it alone into "
    "secrets/passwd (every host) or secrets/<host>passwd (one host)"
)
_INIT_HINT = "`k3scluster init DIR` creates the missing files without touching existing ones"


@dataclass(frozen=True)
class LoadResult:
    """What ``load`` found: the cluster (None when there is any error) and every diagnostic."""

    cluster: Cluster | None
    diagnostics: tuple[Diagnostic, ...]
    # the rule id of each diagnostic, in the same order (see RULES)
    rules: tuple[str, ...] = field(default=(), compare=False)

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_error)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if not d.is_error)

    @property
    def ok(self) -> bool:
        return not self.errors


def load(root: Path) -> LoadResult:
    """Read and check the cluster directory ``root``; never raises for a user mistake."""
    return _Loader(Path(root)).run()


def load_or_raise(root: Path) -> tuple[Cluster, tuple[Diagnostic, ...]]:
    """The cluster and its warnings; ``PlanError`` (carrying every diagnostic) on any error."""
    result = load(root)
    if result.cluster is None:
        raise PlanError(result.diagnostics)
    return result.cluster, result.warnings


@dataclass
class _Table:
    header: tuple[str, ...]
    header_line: int
    rows: list[tuple[int, dict[str, str], tuple[tuple[str, str], ...]]]
    names: list[str] = field(default_factory=list)  # 'name' of every row, even a broken one


class _Loader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.found: list[tuple[str, Diagnostic]] = []
        self.names: dict[str, Location] = {}
        self.ips: dict[ipaddress.IPv4Address, tuple[str, Location]] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.host_rows: set[str] = set()  # every name in hosts.csv, valid or not
        # False when a table could not be read: checks against "all names" are then skipped
        self.hosts_complete = False
        self.k3s_complete = False
        self.k3s_rows: set[str] = set()

    # -- diagnostics -------------------------------------------------------

    def yaml_error(self, rule: str, file: str, exc: yaml.MarkedYAMLError, hint: str) -> None:
        """A YAML parse error at the line PyYAML marks (1 when it marks none)."""
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        self.error(rule, file, line, f"not valid YAML: {exc.problem or exc.context}", hint)

    def error(self, rule: str, file: str, line: int, message: str, hint: str = "") -> None:
        self._add(rule, Diagnostic(file, line, message, Severity.ERROR, hint))

    def warn(self, rule: str, file: str, line: int, message: str, hint: str = "") -> None:
        self._add(rule, Diagnostic(file, line, message, Severity.WARNING, hint))

    def _add(self, rule: str, diag: Diagnostic) -> None:
        assert rule in RULES and (rule in WARNING_RULES) == (not diag.is_error), rule
        self.found.append((rule, diag))

    # -- the pass ----------------------------------------------------------

    def run(self) -> LoadResult:
        root = self.root
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            self.error(
                "cluster-dir",
                str(root),
                0,
                f"the cluster directory {what}",
                f"give the path of a cluster directory; {_INIT_HINT}",
            )
            return self._result(None)
        network = self.read_network()
        hosts, host_columns = self.read_hosts()
        k3s, k3s_columns = self.read_k3s()
        secrets = self.read_secrets(hosts)
        nix_configs = self.read_nix_configs()
        self.check_bios_boot_disk(hosts, nix_configs)
        manifests = self.read_manifests()
        if any(d.is_error for _, d in self.found) or network is None:
            return self._result(None)
        cluster = Cluster(
            root=root.resolve(),
            hosts=tuple(hosts),
            k3s=tuple(k3s),
            network=network,
            secrets=secrets,
            nix_configs=nix_configs,
            manifests=manifests,
            host_columns=host_columns,
            k3s_columns=k3s_columns,
        )
        return self._result(cluster)

    def _result(self, cluster: Cluster | None) -> LoadResult:
        ordered = sorted(self.found, key=lambda rd: (rd[1].file, rd[1].line))
        return LoadResult(cluster, tuple(d for _, d in ordered), tuple(r for r, _ in ordered))

    # -- files -------------------------------------------------------------

    def read_text(self, rel: str, *, required: bool) -> str | None:
        """The UTF-8 text of ``rel``, or None (with a diagnostic when it is a mistake)."""
        path = self.root / rel
        if not path.exists():
            if required:
                self.error("file-missing", rel, 0, "missing file", _INIT_HINT)
            return None
        data = self.read_file(rel, path)
        return None if data is None else self.decode(rel, data)

    def read_file(self, rel: str, path: Path) -> bytes | None:
        """The bytes of a regular file, or None with a diagnostic saying why not."""
        if not path.is_file():
            self.error(
                "file-unreadable",
                rel,
                0,
                "is not a regular file (a directory?)",
                f"replace it with the file {rel}",
            )
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            self.error(
                "file-unreadable",
                rel,
                0,
                f"cannot be read: {exc.strerror}",
                "check the file's owner and permissions",
            )
            return None

    def decode(self, rel: str, data: bytes) -> str | None:
        nul = data.find(b"\0")
        if nul >= 0:
            self.error(
                "file-encoding",
                rel,
                data.count(b"\n", 0, nul) + 1,
                "binary data (a NUL byte), not a text file",
                "write the file as plain UTF-8 text",
            )
            return None
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self.error(
                "file-encoding",
                rel,
                data.count(b"\n", 0, exc.start) + 1,
                f"not UTF-8 text (byte 0x{data[exc.start]:02x})",
                "save the file as UTF-8 (in a spreadsheet: 'CSV UTF-8')",
            )
            return None

    def read_table(
        self, rel: str, text: str, required: tuple[str, ...], reserved: dict[str, str] | None = None
    ) -> _Table | None:
        reserved = reserved or {}

        def lines() -> Iterator[str]:
            # comment lines become blank lines, so csv's line_num stays the file's line
            for line in io.StringIO(text, newline=""):
                yield "\n" if line.lstrip().startswith("#") else line

        reader = csv.reader(lines(), strict=True)
        table: _Table | None = None
        ok_header = True
        while True:
            start = reader.line_num + 1
            try:
                raw = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                if str(exc) == "unexpected end of data":  # the file ends inside a quote
                    message, line = 'a quote (") opened in this row is not closed', start
                else:
                    message, line = f"not valid CSV: {exc}", reader.line_num or start
                self.error(
                    "csv-syntax",
                    rel,
                    line,
                    message,
                    "close the quote, or remove it: plan values need no quotes",
                )
                return None
            if any("\n" in v or "\r" in v for v in raw):
                self.error(
                    "csv-syntax",
                    rel,
                    start,
                    'a quote (") opened in this row is not closed',
                    "close the quote, or remove it: plan values need no quotes",
                )
                return None
            values = [v.strip().lower() for v in raw]
            if not any(values):
                continue
            if table is None:
                table = _Table(tuple(values), start, [])
                seen: set[str] = set()
                for i, name in enumerate(values, 1):
                    if not name:
                        ok_header = False
                        self.error(
                            "csv-header",
                            rel,
                            start,
                            f"column {i} of the header has no name",
                            "name the column or delete it (and its values)",
                        )
                    elif name in seen:
                        ok_header = False
                        self.error(
                            "csv-header",
                            rel,
                            start,
                            f"column {name!r} appears twice",
                            "keep one column of each name",
                        )
                    elif name in reserved:
                        ok_header = False
                        self.error(
                            "csv-header",
                            rel,
                            start,
                            f"column {name!r} is reserved",
                            f"rename it: {reserved[name]}",
                        )
                    seen.add(name)
                missing = [c for c in required if c not in seen]
                if missing:
                    ok_header = False
                    self.error(
                        "csv-column-missing",
                        rel,
                        start,
                        f"missing column(s): {', '.join(missing)}",
                        f"the header needs at least: {','.join(required)}"
                        + (
                            " (columns are separated by commas, not semicolons or tabs)"
                            if len(table.header) == 1 and re.search(r"[;\t]", table.header[0])
                            else ""
                        ),
                    )
                continue
            if "name" in table.header and len(values) > table.header.index("name"):
                table.names.append(values[table.header.index("name")])
            if len(values) != len(table.header):
                self.error(
                    "csv-field-count",
                    rel,
                    start,
                    f"{len(values)} fields, but the header has {len(table.header)}",
                    "give every row one value per header column (leave optional ones "
                    "empty: a,b,,d)",
                )
                continue
            columns = tuple(zip(table.header, values))
            table.rows.append((start, dict(columns), columns))
        if table is None:
            return _Table((), 0, [])  # nothing but comments and blank lines
        return table if ok_header else None

    # -- network.yaml ------------------------------------------------------

    def read_network(self) -> Network | None:
        rel = NETWORK_YAML
        text = self.read_text(rel, required=True)
        if text is None:
            return None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            self.yaml_error("yaml-syntax", rel, exc, "fix the YAML syntax (key: value, one per line)")
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
            self.error(
                "yaml-syntax",
                rel,
                1,
                f"not valid YAML: {type(exc).__name__}",
                "fix the YAML syntax (key: value, one per line)",
            )
            return None
        example = "gateway: 192.168.1.1 and netmask: 24, one per line"
        if node is None:
            self.error(
                "network-key-missing",
                rel,
                1,
                "empty file: gateway and netmask are missing",
                f"write {example}",
            )
            return None
        if not isinstance(node, yaml.MappingNode):
            self.error(
                "yaml-syntax",
                rel,
                node.start_mark.line + 1,
                "must be a mapping of keys, not a list or a single value",
                f"write {example}",
            )
            return None
        keys: dict[str, yaml.Node] = {}
        lines: dict[str, int] = {}
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
            if key in keys:
                self.error(
                    "network-key-duplicate",
                    rel,
                    line,
                    f"{key!r} is set twice (first at line {lines[key]})",
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
            keys[key] = vnode
            lines[key] = line

        values: dict[str, str | None] = {}

        def scalar(key: str) -> str | None:
            if key not in values:
                values[key] = _scalar(key)
            return values[key]

        def _scalar(key: str) -> str | None:
            vnode = keys.get(key)
            if vnode is None:
                return None
            if not isinstance(vnode, yaml.ScalarNode):
                self.error(
                    "network-value",
                    rel,
                    lines[key],
                    f"{key} must be a single value",
                    f"write {key}: VALUE",
                )
                return None  # reported here
            return str(vnode.value).strip()

        ok = True
        for key in NETWORK_REQUIRED:
            if key not in keys:
                ok = False
                self.error("network-key-missing", rel, 1, f"{key} is missing", f"write {example}")
        raw_gateway = scalar("gateway")
        gateway = None
        if raw_gateway is not None:
            gateway = self.parse_ip(rel, lines["gateway"], "gateway", raw_gateway)
        raw_mask = scalar("netmask")
        net = self.parse_netmask(rel, lines.get("netmask", 1), raw_mask, gateway)
        if gateway is None or net is None:
            ok = False
        else:
            mline = lines["gateway"]
            if gateway not in net:
                ok = False
                self.error(
                    "gateway",
                    rel,
                    mline,
                    f"gateway {gateway} is outside the subnet {net}",
                    "fix the gateway or the netmask",
                )
            elif gateway in (net.network_address, net.broadcast_address):
                ok = False
                self.error(
                    "gateway",
                    rel,
                    mline,
                    f"gateway {gateway} is the {self._reserved_kind(gateway, net)} "
                    f"address of {net}",
                    "use the router's address in the subnet",
                )
            else:
                self.subnet = net  # host addresses are checked only against a sound subnet
                self.ips[gateway] = ("the gateway", Location(rel, mline))
        nameservers = self.parse_nameservers(
            rel, keys.get("nameservers"), lines.get("nameservers", 1)
        )
        nixos = scalar("nixos")
        if nixos is not None and not _NIXOS.match(nixos):
            ok = False
            self.error(
                "nixos-release",
                rel,
                lines["nixos"],
                f"nixos {nixos!r} is not a release",
                f'write a NixOS release like nixos: "{DEFAULT_NIXOS_RELEASE}"',
            )
        pin_ok, pin = self.parse_nixpkgs_pin(rel, keys.get("nixpkgs"), lines.get("nixpkgs", 1))
        ok = ok and pin_ok
        release = nixos or DEFAULT_NIXOS_RELEASE
        if pin is None and _NIXOS.match(release) and release not in NIXPKGS_PINS:
            ok = False
            self.error(
                "nixos-release",
                rel,
                lines.get("nixos", 1),
                f"k3scluster knows no nixpkgs commit for NixOS {release}",
                f"use one of {', '.join(sorted(NIXPKGS_PINS))}, or pin nixpkgs yourself: "
                "nixpkgs: {rev: <40-hex commit>, sha256: <nix-prefetch-url --unpack hash>}",
            )
        k3s = scalar("k3s")
        if k3s is not None and not _K3S_VERSION.match(k3s):
            ok = False
            self.error(
                "k3s-version",
                rel,
                lines["k3s"],
                f"k3s {k3s!r} is not a K3s version",
                f"write a K3s release like k3s: {DEFAULT_K3S_VERSION} "
                "(see github.com/k3s-io/k3s/releases)",
            )
        if not ok or nameservers is None or gateway is None or net is None:
            return None
        return Network(
            gateway=gateway,
            network=net,
            nameservers=nameservers,
            nixos_release=nixos or DEFAULT_NIXOS_RELEASE,
            k3s_version=k3s or DEFAULT_K3S_VERSION,
            location=Location(rel, 1),
            nixpkgs_rev=pin[0] if pin else None,
            nixpkgs_sha256=pin[1] if pin else None,
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
            self.error("nixpkgs-pin", rel, line, "nixpkgs must be a mapping of rev and sha256", hint)
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

    # -- addresses and names -----------------------------------------------

    def parse_ip(self, rel: str, line: int, what: str, raw: str) -> ipaddress.IPv4Address | None:
        if not raw:
            self.error(
                "ip-invalid",
                rel,
                line,
                f"{what}: no address",
                "write an IPv4 address like 192.168.1.10",
            )
            return None
        try:
            return ipaddress.IPv4Address(raw)
        except ValueError:
            v6 = ":" in raw
            self.error(
                "ip-invalid",
                rel,
                line,
                f"{what}: {raw!r} is not an IPv4 address"
                + (" (IPv6 is not supported)" if v6 else ""),
                "write an IPv4 address like 192.168.1.10 (no leading zeros)",
            )
            return None

    @staticmethod
    def _reserved_kind(ip: ipaddress.IPv4Address, net: ipaddress.IPv4Network) -> str:
        return "network" if ip == net.network_address else "broadcast"

    def check_ip(self, rel: str, line: int, what: str, raw: str) -> ipaddress.IPv4Address | None:
        ip = self.parse_ip(rel, line, what, raw)
        if ip is None:
            return None
        net = self.subnet
        if net is not None:
            if ip not in net:
                self.error(
                    "ip-outside-subnet",
                    rel,
                    line,
                    f"{what}: {ip} is outside the subnet {net}",
                    f"use an address in {net} (gateway/netmask of {NETWORK_YAML})",
                )
                return None
            if ip in (net.network_address, net.broadcast_address):
                self.error(
                    "ip-reserved",
                    rel,
                    line,
                    f"{what}: {ip} is the {self._reserved_kind(ip, net)} address of {net}",
                    f"use an address between {net.network_address + 1} and "
                    f"{net.broadcast_address - 1}",
                )
                return None
        earlier = self.ips.get(ip)
        if earlier is not None:
            self.error(
                "ip-duplicate",
                rel,
                line,
                f"{what}: {ip} is already used by {earlier[0]} ({earlier[1]})",
                "give every host, K3s node and the gateway an address of its own",
            )
            return None
        self.ips[ip] = (what, Location(rel, line))
        return ip

    def check_name(self, rule: str, rel: str, line: int, what: str, name: str) -> bool:
        if not _LABEL.match(name):
            kind = "a host name" if rule == "host-name" else "a K3s (Kubernetes node) name"
            self.error(
                rule,
                rel,
                line,
                f"{what} {name!r} is not valid as {kind}",
                "use 1 to 63 characters: lowercase letters, digits and '-' (not first or "
                "last), no '_' or '.'",
            )
            return False
        earlier = self.names.get(name)
        if earlier is not None:
            self.error(
                "name-duplicate",
                rel,
                line,
                f"{what} {name!r} is already used at {earlier}",
                "names must differ (ignoring case) across hosts.csv and k3s.csv",
            )
            return False
        self.names[name] = Location(rel, line)
        return True

    # -- hosts.csv ---------------------------------------------------------

    def read_hosts(self) -> tuple[list[Host], tuple[str, ...]]:
        rel = HOSTS_CSV
        text = self.read_text(rel, required=True)
        if text is None:
            return [], ()
        table = self.read_table(rel, text, HOST_REQUIRED, HOST_RESERVED)
        if table is None:
            return [], ()
        self.hosts_complete = True
        self.host_rows.update(table.names)
        if not table.header_line:
            self.error(
                "no-hosts",
                rel,
                1,
                "no header and no hosts",
                f"write the header {','.join(HOST_REQUIRED)} and one row per host",
            )
            return [], ()
        if not table.rows:
            self.error(
                "no-hosts",
                rel,
                table.header_line,
                "no hosts",
                "add one row per machine: name,interface,ip,admin",
            )
        hosts = []
        for line, v, columns in table.rows:
            ok = self.check_name("host-name", rel, line, "host", v["name"])
            iface = v["interface"]
            if len(iface) > 15 or not _IFACE.match(iface):
                ok = False
                why = (
                    "is longer than 15 characters" if len(iface) > 15 else "has invalid characters"
                )
                self.error(
                    "interface-name",
                    rel,
                    line,
                    f"interface {iface!r} {why}",
                    "use the name `ip link` shows on the host (at most 15 characters, "
                    "letters, digits, '-', '_', '.')",
                )
            ip = self.check_ip(rel, line, f"host {v['name']}", v["ip"])
            admin = v["admin"]
            if not _USER.match(admin) or admin in _RESERVED_USERS:
                ok = False
                self.error(
                    "admin-name",
                    rel,
                    line,
                    f"admin {admin!r} is not usable as the admin user name",
                    "use a Linux user name (a-z, 0-9, '_', '-', starting with a letter, at "
                    "most 32) other than root or a system user",
                )
            disk = v.get("disk") or None
            if disk is not None and not _SERIAL.match(disk):
                ok = False
                self.error(
                    "disk-serial",
                    rel,
                    line,
                    f"disk serial {disk!r} has characters a /dev/disk/by-id name cannot hold",
                    "copy the serial from `lsblk -dno NAME,SERIAL` on the machine "
                    "(letters, digits and - _ . : # + = @), or leave disk empty",
                )
            boot = v.get("boot") or "efi"
            if boot not in {b.value for b in BootMode}:
                ok = False
                self.error(
                    "boot-mode",
                    rel,
                    line,
                    f"unknown boot mode {boot!r}",
                    "write efi or bios (empty means efi)",
                )
            if ok and ip is not None:
                hosts.append(
                    Host(
                        name=v["name"],
                        interface=iface,
                        ip=ip,
                        admin=admin,
                        disk=disk,
                        boot=BootMode(boot),
                        columns=columns,
                        location=Location(rel, line),
                    )
                )
        return hosts, table.header

    # -- k3s.csv -----------------------------------------------------------

    def read_k3s(self) -> tuple[list[K3sNode], tuple[str, ...]]:
        rel = K3S_CSV
        text = self.read_text(rel, required=False)
        if text is None:
            self.k3s_complete = not (self.root / rel).exists()
            return [], ()
        table = self.read_table(rel, text, K3S_REQUIRED)
        if table is None:
            return [], ()
        self.k3s_complete = True
        # nixConfigs/<name>.nix is used for servers; agents run in podman, not NixOS
        agent_names = {v["name"] for _, v, _ in table.rows if v["type"] == "agent"}
        self.k3s_rows.update(n for n in table.names if n not in agent_names)
        nodes: list[K3sNode] = []
        slots: dict[tuple[str, str], tuple[str, int]] = {}
        inits: list[int] = []
        servers = agents = 0
        first_agent = 0
        for line, v, columns in table.rows:
            ok = self.check_name("k3s-name", rel, line, "K3s node", v["name"])
            host = v["host"]
            if self.hosts_complete and host not in self.host_rows:
                ok = False
                self.error(
                    "k3s-host-unknown",
                    rel,
                    line,
                    f"host {host!r} is not in {HOSTS_CSV}",
                    f"add the host to {HOSTS_CSV} or fix the name",
                )
            ktype: K3sType | None
            try:
                ktype = K3sType(v["type"])
            except ValueError:
                ktype = None
                ok = False
                self.error(
                    "k3s-type",
                    rel,
                    line,
                    f"unknown type {v['type']!r}",
                    "write init-server (exactly one), server or agent",
                )
            if ktype is not None:
                role = "agent" if ktype is K3sType.AGENT else "server"
                if role == "agent":
                    agents += 1
                    first_agent = first_agent or line
                else:
                    servers += 1
                if ktype is K3sType.INIT_SERVER:
                    inits.append(line)
                    if len(inits) > 1:
                        self.error(
                            "k3s-init-server",
                            rel,
                            line,
                            f"a second init-server (the first is at {rel}:{inits[0]})",
                            "keep one init-server; make the others server",
                        )
                earlier = slots.get((host, role))
                if earlier is not None:
                    ok = False
                    self.error(
                        "k3s-host-slot",
                        rel,
                        line,
                        f"host {host!r} already has a K3s {role} ({earlier[0]} at "
                        f"{rel}:{earlier[1]})",
                        "a host runs at most one server and one agent",
                    )
                else:
                    slots[(host, role)] = (v["name"], line)
            ip = self.check_ip(rel, line, f"K3s node {v['name']}", v["ip"])
            if ok and ip is not None and ktype is not None:
                nodes.append(
                    K3sNode(
                        host=host,
                        name=v["name"],
                        type=ktype,
                        ip=ip,
                        columns=columns,
                        location=Location(rel, line),
                    )
                )
        if table.rows:
            if not inits:
                self.error(
                    "k3s-init-server",
                    rel,
                    table.header_line,
                    "no init-server",
                    "make exactly one row type init-server: the server that starts the cluster",
                )
            if agents and not servers:
                self.error(
                    "k3s-no-server",
                    rel,
                    first_agent,
                    "agents but no server",
                    "add an init-server row: agents join a server",
                )
            if servers and not agents:
                self.warn(
                    "k3s-no-agent",
                    rel,
                    table.header_line,
                    "servers but no agent: nothing can run pods (the servers run no kubelet)",
                    "add an agent row (type agent) on one or more hosts",
                )
            if servers and servers % 2 == 0:
                self.warn(
                    "k3s-server-count",
                    rel,
                    table.header_line,
                    f"{servers} servers: an even number adds no fault tolerance to etcd",
                    "use 1, 3 or 5 servers (init-server counts)",
                )
        return nodes, table.header

    # -- secrets/ ----------------------------------------------------------

    def read_secrets(self, hosts: list[Host]) -> Secrets:
        sdir = self.root / "secrets"
        token: SecretFile | None = None
        passwd: SecretFile | None = None
        host_passwd: dict[str, SecretFile] = {}
        keys: list[SshKey] = []
        passwd_owners: set[str] = set()
        key_owners: set[str | None] = set()
        host_names = self.host_rows
        entries: list[Path] = []
        if sdir.exists() and not sdir.is_dir():
            self.error(
                "dir-invalid",
                "secrets",
                0,
                "is not a directory",
                "move the file away; secrets/ is a directory of secret files",
            )
        elif sdir.is_dir():
            try:
                entries = sorted(sdir.iterdir())
            except OSError as exc:
                self.error(
                    "file-unreadable",
                    "secrets",
                    0,
                    f"cannot be read: {exc.strerror}",
                    "check the directory's owner and permissions",
                )
        for path in entries:
            name = path.name
            rel = f"secrets/{name}"
            lname = name.lower()
            kind = "token" if name == "token" else None
            owner: str | None = None
            if kind is None and lname.endswith("passwd"):
                kind, owner = "passwd", lname[: -len("passwd")]
                if owner and owner not in host_names:
                    if self.hosts_complete:
                        self.warn(
                            "passwd-unknown-host",
                            rel,
                            0,
                            f"password file for {owner!r}, which is not a host",
                            f"name it secrets/<host>passwd after a host of {HOSTS_CSV}, or "
                            "secrets/passwd for every host",
                        )
                    continue
                passwd_owners.add(owner)
            elif kind is None and lname.endswith(".pub"):
                kind, stem = "pub", lname[: -len(".pub")]
                owner = stem if stem in host_names else None
                key_owners.add(owner)
            if kind is None:
                continue  # README.md and other notes
            data = self.read_secret(rel, path, check_mode=kind != "pub")
            if data is None:
                continue
            if kind == "token":
                if self.check_token(rel, data):
                    token = SecretFile.from_path(self.root, path)
            elif kind == "passwd":
                if self.check_passwd(rel, data):
                    secret = SecretFile.from_path(self.root, path)
                    if owner:
                        host_passwd[owner] = secret
                    else:
                        passwd = secret
            else:
                text = self.check_pub(rel, data)
                if text is not None:
                    keys.append(SshKey(rel, text, owner))
        if not (sdir / "token").exists() and not (sdir / "token").is_symlink():
            self.error(
                "token-missing",
                "secrets/token",
                0,
                "missing K3s token",
                "`k3scluster init DIR` creates it; never regenerate the token of a "
                "cluster that exists (K3s rejects nodes with a new token)",
            )
        # a file that exists but is wrong is reported once, as invalid, not again as missing
        for h in hosts:
            if not {"", h.name} & passwd_owners:
                self.error(
                    "passwd-missing",
                    HOSTS_CSV,
                    h.location.line,
                    f"host {h.name!r} has no password hash",
                    _PASSWD_HINT,
                )
            if not {None, h.name} & key_owners:
                self.error(
                    "ssh-key-missing",
                    HOSTS_CSV,
                    h.location.line,
                    f"host {h.name!r} has no ssh public key: nobody could log in",
                    f"put a public key into secrets/{h.name}.pub (this host) or "
                    "secrets/<any>.pub (every host)",
                )
        return Secrets(
            token=token,
            passwd=passwd,
            host_passwd=tuple(sorted(host_passwd.items())),
            ssh_keys=tuple(keys),
        )

    def read_secret(self, rel: str, path: Path, *, check_mode: bool) -> bytes | None:
        """The bytes of a file in secrets/ (None: reported), warning when others may read it."""
        data = self.read_file(rel, path)
        if data is None:
            return None
        try:
            mode = path.stat().st_mode
        except OSError:  # gone since it was read: it was read, so use what was read
            mode = 0
        if check_mode and mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.warn(
                "secret-permissions",
                rel,
                0,
                f"readable by group/others (mode {stat.S_IMODE(mode):04o})",
                f"chmod 600 {rel}",
            )
        return data

    def check_token(self, rel: str, data: bytes) -> bool:
        text = data.decode("utf-8", errors="replace").strip()
        if not text or not text.isprintable() or any(c.isspace() for c in text):
            self.error(
                "token-invalid",
                rel,
                0,
                "the token must be one line of printable characters without spaces",
                "restore the token from your backup (`k3scluster init DIR` makes one "
                "only for a new cluster)",
            )
            return False
        return True

    def check_passwd(self, rel: str, data: bytes) -> bool:
        text = data.decode("utf-8", errors="replace").strip()
        if "\n" in text or not _CRYPT.match(text):
            self.error(
                "passwd-invalid", rel, 0, "not a crypt password hash ($y$…, $6$…)", _PASSWD_HINT
            )
            return False
        return True

    def check_pub(self, rel: str, data: bytes) -> str | None:
        text = self.decode(rel, data)
        if text is None:
            return None
        if "PRIVATE KEY" in text:
            self.error(
                "ssh-key-invalid",
                rel,
                1,
                "is a PRIVATE key",
                "delete it from here and keep it safe; put its public half here "
                "(`ssh-keygen -y -f KEY > " + rel + "`)",
            )
            return None
        lines = []
        for i, line in enumerate(io.StringIO(text, newline=""), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not _valid_key_line(line):
                self.error(
                    "ssh-key-invalid",
                    rel,
                    i,
                    "not an ssh public key",
                    "use a line from ~/.ssh/id_ed25519.pub (ssh-ed25519 AAAA… comment)",
                )
                return None
            lines.append(line)
        if not lines:
            self.error(
                "ssh-key-invalid",
                rel,
                1,
                "holds no ssh public key",
                "put a key line (ssh-ed25519 AAAA… comment) into it or delete the file",
            )
            return None
        return "\n".join(lines)

    # -- nixConfigs/ and manifests/ ----------------------------------------

    def list_dir(self, rel: str) -> list[Path]:
        d = self.root / rel
        if not d.exists():
            return []
        if not d.is_dir():
            self.error(
                "dir-invalid",
                rel,
                0,
                "is not a directory",
                f"move the file away; {rel}/ is a directory",
            )
            return []
        try:
            return sorted(d.iterdir())
        except OSError as exc:
            self.error(
                "file-unreadable",
                rel,
                0,
                f"cannot be read: {exc.strerror}",
                "check the directory's owner and permissions",
            )
            return []

    def read_nix_configs(self) -> tuple[str, ...]:
        hosts = self.host_rows
        names = hosts | self.k3s_rows
        complete = self.hosts_complete and self.k3s_complete
        found = []
        for path in self.list_dir("nixConfigs"):
            if not path.name.endswith(".nix") or path.is_dir():
                continue
            found.append(path.name)
            stem = path.name[: -len(".nix")]
            if stem.endswith(".hardware") and stem[: -len(".hardware")] in hosts:
                continue
            if stem in names or not complete:
                continue
            self.warn(
                "nixconfig-unknown",
                f"nixConfigs/{path.name}",
                0,
                "named after no host or K3s node: it is not used",
                "name it <host>.nix, <k3s-name>.nix or <host>.hardware.nix; keep shared "
                "modules in a subdirectory (nixConfigs/common/…) and import them",
            )
        return tuple(found)

    def check_bios_boot_disk(self, hosts: list[Host], nix_configs: tuple[str, ...]) -> None:
        """GRUB on BIOS needs the disk for its boot code; a serial alone cannot name it."""
        for host in hosts:
            if host.boot is not BootMode.BIOS:
                continue
            texts = []
            for fname in (f"{host.name}.nix", f"{host.name}.hardware.nix"):
                if fname in nix_configs:
                    try:
                        texts.append((self.root / "nixConfigs" / fname).read_text(errors="replace"))
                    except OSError:
                        pass  # reported by the render step if it matters
            if any(_GRUB_DEVICE.search(t) for t in texts):
                continue
            serial = host.disk.upper() if host.disk else "<serial>"
            self.warn(
                "bios-grub-device",
                host.location.file,
                host.location.line,
                f"host {host.name} boots by BIOS, but nixConfigs/{host.name}.nix does not set "
                "boot.loader.grub.device: NixOS will not build it",
                f'add boot.loader.grub.device = "/dev/disk/by-id/ata-<model>_{serial}"; to '
                f"nixConfigs/{host.name}.nix (`ls -l /dev/disk/by-id` on the machine, or the "
                "installer's log, names the disk)",
            )

    def read_manifests(self) -> tuple[str, ...]:
        found = []
        for path in self.list_dir("manifests"):
            rel = f"manifests/{path.name}"
            if path.is_dir() or not path.name.lower().endswith(MANIFEST_SUFFIXES):
                if not path.name.startswith("."):
                    self.warn(
                        "manifest-other",
                        rel,
                        0,
                        "is not deployed (not a .yaml, .yml or .json file)",
                        "move it out of manifests/ or rename it",
                    )
                continue
            stem = path.name.rsplit(".", 1)[0]
            if not _MANIFEST.match(stem) or not path.name.endswith(MANIFEST_SUFFIXES):
                self.error(
                    "manifest-name",
                    rel,
                    0,
                    "K3s rejects this file name",
                    "rename it: lowercase letters, digits, '-' and '.', starting and "
                    "ending with a letter or digit (e.g. my-app.yaml)",
                )
                continue
            text = self.read_text(rel, required=True)
            if text is None:
                continue
            if self.check_manifest(rel, text):
                found.append(path.name)
        return tuple(found)

    def check_manifest(self, rel: str, text: str) -> bool:
        hint = "fix the YAML; `kubectl apply --dry-run=client -f FILE` shows the same problem"
        try:
            docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
            objs = list(yaml.safe_load_all(text))
        except yaml.MarkedYAMLError as exc:
            self.yaml_error("manifest-yaml", rel, exc, hint)
            return False
        except yaml.reader.ReaderError as exc:
            self.error(
                "manifest-yaml",
                rel,
                text.count("\n", 0, exc.position) + 1,
                f"not valid YAML: {exc.reason}",
                hint,
            )
            return False
        except (yaml.YAMLError, RecursionError) as exc:
            self.error("manifest-yaml", rel, 1, f"not valid YAML: {type(exc).__name__}", hint)
            return False
        ok = True
        for node, obj in zip(docs, objs):
            if obj is None:
                continue
            line = node.start_mark.line + 1
            if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
                ok = False
                self.error(
                    "manifest-yaml",
                    rel,
                    line,
                    "a document that is not a Kubernetes object (apiVersion and kind)",
                    "every document (between ---) must be a mapping with apiVersion, "
                    "kind and metadata",
                )
        return ok


def _valid_key_line(line: str) -> bool:
    """``TYPE BASE64 [comment]`` whose blob is a well-formed key of that type."""
    parts = line.split()
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        return False
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return False
    fields = []
    pos = 0
    while pos < len(blob):  # the blob is a sequence of length-prefixed strings
        if pos + 4 > len(blob):
            return False
        n = int.from_bytes(blob[pos : pos + 4], "big")
        pos += 4
        if pos + n > len(blob):
            return False
        fields.append(blob[pos : pos + n])
        pos += n
    if len(fields) < 2 or fields[0] != parts[0].encode():
        return False
    return parts[0] != "ssh-ed25519" or (len(fields) == 2 and len(fields[1]) == 32)
