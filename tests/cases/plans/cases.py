"""One case per plan rule: small edits of the example cluster and the exact diagnostics.

Each case is ``Case(name, edits, expected)``: ``name`` starts with the rule id it
shows (``RULES`` in k3scluster/plans/rules.py); ``edits`` change a copy of
examples/cluster; ``expected`` is the first line of every diagnostic
(``FILE:LINE: message``), in order. Hints are checked separately (every
diagnostic has one).

Lines of the example: hosts.csv 1 header, 2 olaf, 3 ulf, 4 rolf, 5 karl, 6 ulrich;
k3s.csv 1 header, 2 olaf-k3s-server (init-server), 3 olaf-k3s-agent, 4 ulf-k3s-server,
5 ulf-k3s-agent, 6 rolf-k3s-server, 7 karl-k3s-agent; network.yaml 2 gateway,
3 netmask, 4 nameservers, 8 nixos, 9 k3s.
"""

from __future__ import annotations

from dataclasses import dataclass

HASH = "$6$EXAMPLEonly$7Ene/g/er67PudChVEn8IDoBxDvi1vmWXPD8Xj9wK/iOoHdhm11lXgccD0NGa/pIqaRjLqDIHoD1mf9G/7dAw.\n"
H = "plans/hosts.csv"
K = "plans/k3s.csv"
N = "plans/network.yaml"


@dataclass(frozen=True)
class Sub:
    """Replace ``old`` (which must occur exactly once) by ``new`` in ``path``."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Write:
    """Write ``content`` to ``path`` (a new secret file is made 0600)."""

    path: str
    content: str | bytes


@dataclass(frozen=True)
class Remove:
    path: str


@dataclass(frozen=True)
class Mkdir:
    path: str


@dataclass(frozen=True)
class Chmod:
    path: str
    mode: int


Edit = Sub | Write | Remove | Mkdir | Chmod


@dataclass(frozen=True)
class Case:
    name: str
    edits: tuple[Edit, ...]
    expected: tuple[str, ...]

    @property
    def rule(self) -> str:
        return self.name.split(":")[0]


def case(name: str, *edits: Edit, expected: tuple[str, ...] | list[str] = ()) -> Case:
    return Case(name, tuple(edits), tuple(expected))


CASES = [
    case("clean"),
    case(
        "cluster-dir",
        Remove("."),
        expected=["ROOT: the cluster directory does not exist"],
    ),
    case("file-missing", Remove(N), expected=[f"{N}: missing file"]),
    case(
        "file-unreadable",
        Remove(H),
        Mkdir(H),
        expected=[f"{H}: is not a regular file (a directory?)"],
    ),
    case(
        "file-encoding",
        Write(K, b"host,name,type,ip\nolaf,olaf-k3s-server,init-server,10.0.100.10\xff\n"),
        expected=[f"{K}:2: not UTF-8 text (byte 0xff)"],
    ),
    case(
        "file-encoding:nul",
        Write(N, b"gateway: 10.0.100.1\nnetmask: 24\n\x00\x01\x02"),
        expected=[f"{N}:3: binary data (a NUL byte), not a text file"],
    ),
    case(
        "dir-invalid",
        Remove("manifests"),
        Write("manifests", "x"),
        expected=["manifests: is not a directory"],
    ),
    case(
        "csv-syntax",
        Sub(H, "ulrich,eno1,", 'ulrich,"eno1,'),
        expected=[f'{H}:6: a quote (") opened in this row is not closed'],
    ),
    case(
        "csv-syntax:strict",
        Sub(H, "ulf,enp1s0,", 'ulf,"enp1s0"x,'),
        expected=[f"{H}:3: not valid CSV: ',' expected after '\"'"],
    ),
    case(
        "csv-header",
        Sub(H, "boot,location", "boot,name"),
        expected=[f"{H}:1: column 'name' appears twice"],
    ),
    case(
        "csv-header:empty",
        Sub(H, "boot,location", "boot,"),
        expected=[f"{H}:1: column 7 of the header has no name"],
    ),
    # a header in another order than the values is one error, not two per row
    case(
        "csv-header:order",
        Sub(H, "name,interface,ip,admin", "name,interface,admin,ip"),
        expected=[f"{H}:1: column 'ip' holds no address, but column 'admin' holds one in every row"],
    ),
    case(
        "csv-header:host-name-swapped",
        Sub(K, "host,name,type,ip", "name,host,type,ip"),
        expected=[
            (
                f"{K}:1: column 'host' names no host of {H}, but column 'name' names one in "
                "every row"
            )
        ],
    ),
    case(
        "csv-header:reserved",
        Sub(H, "boot,location", "boot,K3s"),
        expected=[f"{H}:1: column 'k3s' is reserved"],
    ),
    case(
        "nixconfig-unknown:agent",
        Write("nixConfigs/karl-k3s-agent.nix", "{ ... }: { }\n"),
        expected=[
            "nixConfigs/karl-k3s-agent.nix: warning: named after no host or K3s node: it is not used"
        ],
    ),
    case(
        "csv-column-missing",
        Sub(K, "host,name,type,ip", "host,name,kind,ip"),
        expected=[f"{K}:1: missing column(s): type"],
    ),
    case(
        "csv-column-missing:rows-not-counted",
        Sub(K, "host,name,type,ip", "host,name,type"),
        expected=[f"{K}:1: missing column(s): ip"],
    ),
    case(
        "csv-field-count",
        Sub(H, "manfred,,efi,rack-middle", "manfred,,efi"),
        expected=[f"{H}:3: 6 fields, but the header has 7"],
    ),
    # a header that miscounts is one error at the header, not one per row
    case(
        "csv-field-count:header",
        Sub(H, "boot,location", "boot"),
        expected=[f"{H}:1: the header names 6 columns, but every row has 7 fields"],
    ),
    case(
        "csv-field-count:header-semicolon",
        Sub(H, "disk,boot", "disk;boot"),
        expected=[f"{H}:1: the header names 6 columns, but every row has 7 fields"],
    ),
    case(
        "csv-field-count:header-extra",
        Sub(K, "host,name,type,ip", "host,name,type,ip,notes"),
        expected=[f"{K}:1: the header names 5 columns, but every row has 4 fields"],
    ),
    case(
        "csv-row-duplicate",
        Sub(
            K,
            "olaf,olaf-k3s-agent",
            "olaf,olaf-k3s-server,init-server,10.0.100.10\nolaf,olaf-k3s-agent",
        ),
        expected=[f"{K}:3: this row repeats line 2"],
    ),
    case(
        "csv-row-duplicate:host",
        Sub(H, "karl,", "ulrich,eno1,10.0.100.6,manfred,,efi,closet\nkarl,"),
        expected=[f"{H}:7: this row repeats line 5"],
    ),
    case(
        "no-hosts",
        Write(H, "# nothing yet\nname,interface,ip,admin\n"),
        Write(K, ""),
        Remove("nixConfigs"),
        expected=[f"{H}:2: no hosts"],
    ),
    case(
        "no-hosts:empty",
        Write(H, ""),
        Write(K, ""),
        Remove("nixConfigs"),
        expected=[f"{H}:1: no header and no hosts"],
    ),
    case(
        "host-name",
        Sub(H, "ulrich,", "ul_rich,"),
        expected=[f"{H}:6: host 'ul_rich' is not valid as a host name"],
    ),
    case(
        "host-name:long",
        Sub(H, "ulrich,", "u" * 64 + ","),
        expected=[f"{H}:6: host '{'u' * 64}' is not valid as a host name"],
    ),
    case(
        "k3s-name",
        Sub(K, "karl-k3s-agent", "karl.k3s.agent"),
        expected=[f"{K}:7: K3s node 'karl.k3s.agent' is not valid as a K3s (Kubernetes node) name"],
    ),
    case(
        "name-duplicate",
        Sub(K, "ulf-k3s-agent", "ULF"),
        expected=[f"{K}:5: K3s node 'ulf' is already used at {H}:3"],
    ),
    case(
        "interface-name",
        Sub(H, "eno2", "enp0s20f0u1u2u3u4"),
        expected=[f"{H}:4: interface 'enp0s20f0u1u2u3u4' is longer than 15 characters"],
    ),
    case(
        "interface-name:chars",
        Sub(H, "eno2", "eth/0"),
        expected=[f"{H}:4: interface 'eth/0' has invalid characters"],
    ),
    case(
        "admin-name",
        Sub(H, "eni1,10.0.100.5,manfred", "eni1,10.0.100.5,root"),
        expected=[f"{H}:5: admin 'root' is not usable as the admin user name"],
    ),
    case(
        "ip-invalid",
        Sub(H, "10.0.100.3", "10.0.100.300"),
        expected=[f"{H}:3: host ulf: '10.0.100.300' is not an IPv4 address"],
    ),
    case(
        "ip-outside-subnet",
        Sub(H, "10.0.100.3", "10.0.101.3"),
        expected=[f"{H}:3: host ulf: 10.0.101.3 is outside the subnet 10.0.100.0/24"],
    ),
    # rows of their own outside the subnet stay errors of their rows
    case(
        "ip-outside-subnet:rows-elsewhere",
        *(Sub(K, f"10.0.100.1{n}", f"10.0.200.1{n}") for n in range(6)),
        expected=[
            f"{K}:{n + 2}: K3s node {k}: 10.0.200.1{n} is outside the subnet 10.0.100.0/24"
            for n, k in enumerate(
                [
                    "olaf-k3s-server",
                    "olaf-k3s-agent",
                    "ulf-k3s-server",
                    "ulf-k3s-agent",
                    "rolf-k3s-server",
                    "karl-k3s-agent",
                ]
            )
        ],
    ),
    case(
        "ip-reserved",
        Sub(K, "10.0.100.15", "10.0.100.255"),
        expected=[
            (
                f"{K}:7: K3s node karl-k3s-agent: 10.0.100.255 is the broadcast address of "
                "10.0.100.0/24"
            )
        ],
    ),
    case(
        "ip-duplicate",
        Sub(K, "10.0.100.15", "10.0.100.2"),
        expected=[
            f"{K}:7: K3s node karl-k3s-agent: 10.0.100.2 is already used by host olaf ({H}:2)"
        ],
    ),
    case(
        "ip-duplicate:gateway",
        Sub(H, "10.0.100.3", "10.0.100.1"),
        expected=[f"{H}:3: host ulf: 10.0.100.1 is already used by the gateway ({N}:2)"],
    ),
    case(
        "boot-mode",
        Sub(H, "WD-WCC4N1234567,bios", "WD-WCC4N1234567,uefi"),
        expected=[f"{H}:4: unknown boot mode 'uefi'"],
    ),
    case(
        "platform",
        Sub(H, "name,interface,ip,admin,disk,boot,location", "name,interface,ip,admin,disk,boot,platform"),
        Sub(H, "rack-top", "x86_64-linux"),
        Sub(H, "rack-middle", "aarch64-linux"),
        Sub(H, "rack-bottom", ""),
        Sub(H, "desk", "arm64"),
        Sub(H, "closet", ""),
        expected=[f"{H}:5: unknown platform 'arm64'"],
    ),
    case(
        "boot-platform",
        Sub(H, "name,interface,ip,admin,disk,boot,location", "name,interface,ip,admin,disk,boot,platform"),
        Sub(H, "rack-top", "aarch64-linux"),
        Sub(H, "rack-middle", ""),
        Sub(H, "rack-bottom", "aarch64-linux"),
        Sub(H, "desk", "x86_64-linux"),
        Sub(H, "closet", ""),
        expected=[f"{H}:4: boot=bios on platform 'aarch64-linux': BIOS boot (GRUB i386-pc) exists only on x86_64-linux"],
    ),
    case(
        "interface-eth",
        Sub(H, "karl,eni1,", "karl,eth0,"),
        expected=[
            (
                f"{H}:5: warning: interface 'eth0' is a kernel name: NixOS renames NICs "
                "(enp1s0, eno1, …) unless predictable names are off, which k3scluster then "
                "turns off for this host"
            )
        ],
    ),
    case(
        "disk-serial",
        Sub(H, "S4EVNX0R123456", "S4EVNX0R/123456"),
        expected=[
            (
                f"{H}:2: disk serial 's4evnx0r/123456' has characters a /dev/disk/by-id name "
                "cannot hold"
            )
        ],
    ),
    case(
        "k3s-type",
        Sub(K, "karl-k3s-agent,agent", "karl-k3s-agent,worker"),
        expected=[f"{K}:7: unknown type 'worker'"],
    ),
    case(
        "k3s-host-unknown",
        Sub(K, "karl,karl-k3s-agent", "carl,karl-k3s-agent"),
        expected=[f"{K}:7: host 'carl' is not in {H}"],
    ),
    case(
        "k3s-host-slot",
        Sub(K, "olaf,olaf-k3s-agent", "ulf,olaf-k3s-agent"),
        expected=[f"{K}:5: host 'ulf' already has a K3s agent (olaf-k3s-agent at {K}:3)"],
    ),
    case(
        "k3s-init-server",
        Sub(K, "init-server", "server"),
        expected=[f"{K}:1: no init-server"],
    ),
    case(
        "k3s-init-server:second",
        Sub(K, "ulf-k3s-server,server", "ulf-k3s-server,init-server"),
        expected=[f"{K}:4: a second init-server (the first is at {K}:2)"],
    ),
    case(
        "k3s-no-server",
        Write(K, "host,name,type,ip\nkarl,karl-k3s-agent,agent,10.0.100.15\n"),
        Remove("nixConfigs/olaf-k3s-server.nix"),
        expected=[f"{K}:1: no init-server", f"{K}:2: agents but no server"],
    ),
    case(
        "k3s-server-count",
        Sub(K, "karl-k3s-agent,agent", "karl-k3s-agent,server"),
        expected=[f"{K}:1: warning: 4 servers: an even number adds no fault tolerance to etcd"],
    ),
    case(
        "k3s-server-count:two",
        Sub(K, "rolf,rolf-k3s-server,server,10.0.100.14", "rolf,rolf-k3s-agent,agent,10.0.100.14"),
        expected=[(f"{K}:1: warning: 2 servers: an even number adds no fault tolerance to etcd "
                  "(with 2, its quorum is both: a deploy or reboot that restarts either server "
                  "stops the Kubernetes API until it is back)")],
    ),
    case(
        "yaml-syntax",
        Sub(N, "gateway: 10.0.100.1", "gateway: [10.0.100.1"),
        expected=[f"{N}:3: not valid YAML: expected ',' or ']', but got ':'"],
    ),
    case(
        "yaml-syntax:list",
        Write(N, "- gateway: 10.0.100.1\n- netmask: 24\n"),
        expected=[f"{N}:1: must be a mapping of keys, not a list or a single value"],
    ),
    case(
        "network-key-missing",
        Sub(N, "netmask: 24\n", ""),
        expected=[f"{N}:1: netmask is missing"],
    ),
    case(
        "network-key-missing:gateway",
        Write(N, "netmask: 24\nnixos: \"25.05\"\n"),
        expected=[f"{N}:1: gateway is missing"],
    ),
    case(
        "netmask:empty",
        Sub(N, "netmask: 24", "netmask:"),
        expected=[f"{N}:3: netmask is empty"],
    ),
    case(
        "ip-invalid:gateway-empty",
        Sub(N, "gateway: 10.0.100.1", "gateway: ''"),
        expected=[f"{N}:2: gateway: no address"],
    ),
    case(
        "network-key-missing:empty",
        Write(N, "# nothing\n"),
        expected=[f"{N}:1: empty file: gateway and netmask are missing"],
    ),
    case(
        "network-key-unknown",
        Write(N, "gateway: 10.0.100.1\nnetmask: 24\nnameserver: 1.1.1.1\nnixos: \"25.05\"\n"),
        expected=[f"{N}:3: warning: unknown key 'nameserver' is ignored"],
    ),
    case(
        "network-key-duplicate",
        Write(N, "gateway: 10.0.100.1\nnetmask: 24\nnetmask: 16\nnixos: \"25.05\"\n"),
        expected=[f"{N}:3: 'netmask' is set twice (first at line 2)"],
    ),
    case(
        "network-value",
        Sub(N, "netmask: 24", "netmask: [24]"),
        expected=[f"{N}:3: netmask must be a single value"],
    ),
    case(
        "network-value:nameservers",
        Write(N, "gateway: 10.0.100.1\nnetmask: 24\nnameservers: {a: b}\nnixos: \"25.05\"\n"),
        expected=[f"{N}:3: nameservers must be a list of addresses"],
    ),
    case(
        "netmask",
        Sub(N, "netmask: 24", "netmask: 255.0.255.0"),
        expected=[f"{N}:3: netmask '255.0.255.0' is not a netmask"],
    ),
    case(
        "netmask:31",
        Sub(N, "netmask: 24", 'netmask: "/31"'),
        expected=[f"{N}:3: netmask /31 leaves no room for a gateway and hosts"],
    ),
    # a netmask too narrow for the plan is one error, not one per address
    case(
        "netmask:too-narrow",
        Sub(N, "netmask: 24", "netmask: 29"),
        expected=[
            (f"{N}:3: netmask /29 makes the subnet 10.0.100.0/29, which leaves 6 of the 11 host "
            "and K3s addresses outside")
        ],
    ),
    case(
        "netmask:too-narrow-dotted",
        Sub(N, "netmask: 24", "netmask: 255.255.255.252"),
        expected=[
            (f"{N}:3: netmask /30 makes the subnet 10.0.100.0/30, which leaves 9 of the 11 host "
            "and K3s addresses outside")
        ],
    ),
    case(
        "gateway",
        Sub(N, "gateway: 10.0.100.1", "gateway: 10.0.100.0"),
        expected=[f"{N}:2: gateway 10.0.100.0 is the network address of 10.0.100.0/24"],
    ),
    case(
        "gateway:outside",
        Sub(N, "netmask: 24", "netmask: 10.0.200.0/24"),
        expected=[f"{N}:2: gateway 10.0.100.1 is outside the subnet 10.0.200.0/24"],
    ),
    # the gateway decides the subnet: a typo in it is one error, not one per address
    case(
        "gateway:hosts-elsewhere",
        Sub(N, "gateway: 10.0.100.1", "gateway: 10.0.10.1"),
        expected=[
            (f"{N}:2: gateway 10.0.10.1 is outside the subnet 10.0.100.0/24 that the hosts and "
            "K3s nodes are in")
        ],
    ),
    case(
        "gateway:most-hosts-elsewhere",
        Sub(N, "gateway: 10.0.100.1", "gateway: 10.0.10.1"),
        Sub(H, "10.0.100.3", "10.0.101.3"),
        expected=[
            f"{H}:3: host ulf: 10.0.101.3 is outside the subnet 10.0.100.0/24",
            (f"{N}:2: gateway 10.0.10.1 is outside the subnet 10.0.100.0/24 that 10 of the 11 "
            "host and K3s addresses are in"),
        ],
    ),
    case(
        "nixos-release",
        Sub(N, 'nixos: "26.05"', "nixos: 25.04"),
        expected=[f"{N}:8: nixos '25.04' is not a release"],
    ),
    case(
        "nixos-release",
        Sub(N, 'nixos: "26.05"', 'nixos: "21.11"'),
        expected=[f"{N}:8: k3scluster knows no nixpkgs commit for NixOS 21.11"],
    ),
    case(
        "state-version",
        Sub(N, 'stateVersion: "25.05"', "stateVersion: 25.5"),
        expected=[f"{N}:12: stateVersion '25.5' is not a NixOS release"],
    ),
    case(
        "state-version",
        Sub(H, "name,interface,ip,admin,disk,boot,location", "name,interface,ip,admin,disk,boot,stateVersion"),
        expected=[f"{H}:2: the stateVersion column 'rack-top' is not a NixOS release"] + [
            f"{H}:{n}: the stateVersion column '{v}' is not a NixOS release"
            for n, v in ((3, "rack-middle"), (4, "rack-bottom"), (5, "desk"), (6, "closet"))
        ],
    ),
    case(
        "state-version-missing",
        Sub(N, 'stateVersion: "25.05"\n', ""),
        Sub(N, 'nixos: "26.05"', 'nixos: "25.11"'),
        Sub(N, 'k3s: "1.35"', 'k3s: "1.34"'),
        expected=[
            (
                f"{N}:8: warning: nixos is 25.11 but no stateVersion is recorded: "
                "olaf, ulf, rolf, karl, ulrich keep system.stateVersion 25.05"
            )
        ],
    ),
    case(
        "nixpkgs-pin",
        Sub(
            N,
            'k3s: "1.35"',
            'k3s: "1.35"\nnixpkgs:\n  rev: ac62194c\n  sha256: nope\n  branch: x',
        ),
        expected=[
            f"{N}:11: nixpkgs rev 'ac62194c' is not a full commit",
            f"{N}:12: nixpkgs sha256 'nope' is not a nix32 or sha256-… hash",
            f"{N}:13: nixpkgs takes only rev and sha256",
        ],
    ),
    case(
        "nixpkgs-pin",
        Sub(N, 'k3s: "1.35"', 'k3s: "1.35"\nnixpkgs: [a, b]'),
        expected=[f"{N}:10: nixpkgs must be a mapping of rev and sha256"],
    ),
    case(
        "k3s-version",
        Sub(N, 'k3s: "1.35"', "k3s: 1.31.12"),
        expected=[f"{N}:9: k3s '1.31.12' is not a K3s minor release"],
    ),
    case(
        "k3s-release",
        Sub(N, 'k3s: "1.35"', 'k3s: "1.31"'),
        expected=[f"{N}:9: the nixpkgs k3scluster pins for NixOS 26.05 has no pkgs.k3s_1_31 (K3s 1.31)"],
    ),
    case(
        "k3s-release",
        Sub(N, 'nixos: "26.05"', 'nixos: "25.11"'),
        Sub(N, 'k3s: "1.35"', "k3s: v1.35.2+k3s1"),
        expected=[f"{N}:9: the nixpkgs k3scluster pins for NixOS 25.11 has no pkgs.k3s_1_35 (K3s 1.35)"],
    ),
    # issue 19 item 4: a plan without nixos: is told what it runs, and refused a K3s that
    # the release it falls back to cannot have
    case(
        "k3s-release:no-nixos",
        Sub(N, 'nixos: "26.05"\n', ""),
        expected=[
            (
                f"{N}:1: warning: no nixos: the hosts run NixOS 25.05, end of life since "
                "2025-12-31"
            ),
            (
                f"{N}:8: the nixpkgs k3scluster pins for NixOS 25.05 (no nixos: in the plan) "
                "cannot have pkgs.k3s_1_35 (K3s 1.35)"
            ),
        ],
    ),
    case(
        "k3s-release:24.11",
        Sub(N, 'nixos: "26.05"', 'nixos: "24.11"'),
        Sub(N, 'k3s: "1.35"', 'k3s: "1.34"'),
        expected=[f"{N}:9: the nixpkgs k3scluster pins for NixOS 24.11 cannot have pkgs.k3s_1_34 (K3s 1.34)"],
    ),
    case(
        "nixos-missing",
        Sub(N, 'nixos: "26.05"\n', ""),
        Sub(N, 'k3s: "1.35"\n', ""),
        expected=[
            (
                f"{N}:1: warning: no nixos: the hosts run NixOS 25.05, end of life since "
                "2025-12-31 and K3s 1.31 (no k3s: either)"
            )
        ],
    ),
    case("token-missing", Remove("secrets/token"), expected=["secrets/token: missing K3s token"]),
    case(
        "agent-token-missing",
        Remove("secrets/agent-token"),
        expected=[
            (
                "secrets/agent-token: warning: no K3s agent token: the agents join with "
                "secrets/token, which lets its holder join as a server (they get it in a "
                "directory of their own, as before)"
            )
        ],
    ),
    case(
        "agent-token-same",
        # the server token's value (without its newline: K3s strips it)
        Write("secrets/agent-token", "EXAMPLE-TOKEN-replace-me-with-k3scluster-init-0123456789abcdef"),
        expected=[
            (
                "secrets/agent-token: warning: is the same as secrets/token: the agents hold "
                "the server token after all"
            )
        ],
    ),
    case(
        "agent-token-invalid",
        Write("secrets/agent-token", "two words\n"),
        expected=[
            (
                "secrets/agent-token: the token must be one line of printable characters "
                "without spaces"
            )
        ],
    ),
    # no secrets/ at all is one error, not a missing token, hash and key per host
    case(
        "file-missing:secrets",
        Remove("secrets"),
        expected=[
            ("secrets: missing directory: it holds the K3s token, the password hashes and the "
            "ssh public keys")
        ],
    ),
    case(
        "token-invalid",
        Write("secrets/token", "two words\n"),
        expected=[
            "secrets/token: the token must be one line of printable characters without spaces"
        ],
    ),
    case(
        "passwd-missing",
        Remove("secrets/passwd"),
        Write("secrets/olafpasswd", HASH),
        expected=[
            f"{H}:{n}: host '{h}' has no password hash"
            for n, h in [(3, "ulf"), (4, "rolf"), (5, "karl"), (6, "ulrich")]
        ],
    ),
    case(
        "passwd-missing:none",
        Remove("secrets/passwd"),
        expected=["secrets/passwd: missing: none of the 5 hosts has a password hash"],
    ),
    case(
        "passwd-invalid",
        Write("secrets/passwd", "hunter2\n"),
        expected=["secrets/passwd: not a crypt password hash ($y$…, $6$…)"],
    ),
    case(
        "passwd-unknown-host",
        Write("secrets/carlpasswd", HASH),
        expected=["secrets/carlpasswd: warning: password file for 'carl', which is not a host"],
    ),
    case(
        "ssh-key-missing",
        Remove("secrets/manfred.pub"),
        expected=[
            f"{H}:{n}: host '{h}' has no ssh public key: nobody could log in"
            for n, h in [(3, "ulf"), (4, "rolf"), (5, "karl"), (6, "ulrich")]
        ],
    ),
    case(
        "ssh-key-missing:none",
        Remove("secrets/manfred.pub"),
        Remove("secrets/olaf.pub"),
        expected=["secrets: no ssh public key (*.pub): nobody could log in to any of the 5 hosts"],
    ),
    case(
        "ssh-key-invalid",
        Write("secrets/manfred.pub", "# my key\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA garbage\n"),
        expected=["secrets/manfred.pub:2: not an ssh public key"],
    ),
    case(
        "ssh-key-invalid:private",
        Write("secrets/olaf.pub", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...\n"),
        expected=["secrets/olaf.pub:1: is a PRIVATE key"],
    ),
    case(
        "secret-permissions",
        Chmod("secrets/token", 0o644),
        expected=["secrets/token: warning: readable by group/others (mode 0644)"],
    ),
    case(
        "nixconfig-unknown",
        Write("nixConfigs/common.nix", "{ ... }: { }\n"),
        expected=[
            "nixConfigs/common.nix: warning: named after no host or K3s node: it is not used"
        ],
    ),
    case(
        "k3s-no-agent",
        Write(
            "plans/k3s.csv",
            "host,name,type,ip\nolaf,olaf-k3s-server,init-server,10.0.100.10\n",
        ),
        expected=[
            ("plans/k3s.csv:1: warning: servers but no agent: nothing can run pods "
            "(the servers run no kubelet)")
        ],
    ),
    case(
        "bios-grub-device",
        Sub(H, "manfred,WD-WCC4N1234567,bios", "manfred,,bios"),
        Write("nixConfigs/rolf.nix", "{ ... }: { time.timeZone = \"UTC\"; }\n"),
        expected=[
            (f"{H}:4: host rolf boots by BIOS, but it has no disk serial and "
            "nixConfigs/rolf.nix does not set boot.loader.grub.device: GRUB has no disk and "
            "NixOS will not build it")
        ],
    ),
    # the plan's serial names GRUB's disk (/dev/k3scluster-bootdisk): nothing by hand
    case(
        "clean:bios-serial-names-the-grub-disk",
        Write("nixConfigs/rolf.nix", "{ ... }: { time.timeZone = \"UTC\"; }\n"),
    ),
    case(
        "clean:bios-nixconfigs-set-the-grub-disk",
        Sub(H, "manfred,WD-WCC4N1234567,bios", "manfred,,bios"),
        Write("nixConfigs/rolf.nix", "{ ... }: { boot.loader.grub.device = \"/dev/sda\"; }\n"),
    ),
    case(
        "manifest-name",
        Write("manifests/Hello_World.yaml", "apiVersion: v1\nkind: Namespace\n"),
        expected=["manifests/Hello_World.yaml: K3s rejects this file name"],
    ),
    case(
        "manifest-yaml",
        Write("manifests/bad.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: [x}\n"),
        expected=["manifests/bad.yaml:3: not valid YAML: expected ',' or ']', but got '}'"],
    ),
    case(
        "manifest-yaml:not-an-object",
        Write("manifests/list.json", '{"apiVersion": "v1", "kind": "List"}\n---\n- a\n- b\n'),
        expected=[
            (
                "manifests/list.json:3: a document that is not a Kubernetes object "
                "(apiVersion and kind)"
            )
        ],
    ),
    case(
        "manifest-other",
        Write("manifests/README.md", "notes\n"),
        expected=[
            "manifests/README.md: warning: is not deployed (not a .yaml, .yml or .json file)"
        ],
    ),
]
