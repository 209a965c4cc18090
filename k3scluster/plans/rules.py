"""The rule registry: every rule id, whether it warns, and what it checks.

Each diagnostic is raised under one of these ids (``Diagnostics.error``/``warn`` assert it);
docs/plan-format.md has one row per rule and tests/cases/plans/cases.py one case per rule.
Grouped by the file or concern that checks them; add a rule to its group.
"""

from __future__ import annotations

ERROR = "error"
WARNING = "warning"

# (rule id, severity, what it checks), grouped by the module that raises it
_REGISTRY: tuple[tuple[str, str, str], ...] = (
    # files.py: the directory and its files
    ("cluster-dir", ERROR, "the cluster directory exists and is a directory"),
    ("file-missing", ERROR, "plans/hosts.csv, plans/network.yaml and secrets/ exist"),
    ("file-unreadable", ERROR, "a plan or secret is a readable file (not a directory)"),
    ("file-encoding", ERROR, "plan files are UTF-8 text without NUL bytes"),
    ("dir-invalid", ERROR, "nixConfigs/, secrets/, manifests/ are directories when present"),
    # table.py: CSV reading
    ("csv-syntax", ERROR, "the CSV can be parsed (quotes closed)"),
    (
        "csv-header",
        ERROR,
        "header names are not empty, not repeated, and in the order of the values",
    ),
    ("csv-column-missing", ERROR, "every required column is in the header"),
    ("csv-field-count", ERROR, "every row has as many fields as the header"),
    ("csv-row-duplicate", ERROR, "no row is repeated (a copied row is one error, not several)"),
    # hosts.py, k3s.py and names.py: rows, names and addresses
    ("no-hosts", ERROR, "hosts.csv has at least one host"),
    ("host-name", ERROR, "host names are RFC 1123 labels (a-z, 0-9, '-', at most 63)"),
    ("k3s-name", ERROR, "K3s names are RFC 1123 labels (Kubernetes node names, no '_')"),
    ("name-duplicate", ERROR, "names are unique across hosts and K3s nodes, ignoring case"),
    (
        "interface-name",
        ERROR,
        "interface names are at most 15 characters of a-z, 0-9, '-', '_', '.'",
    ),
    ("admin-name", ERROR, "the admin is a valid Linux user name other than root"),
    ("ip-invalid", ERROR, "addresses are IPv4 addresses"),
    ("ip-outside-subnet", ERROR, "host and K3s addresses lie in gateway/netmask"),
    ("ip-reserved", ERROR, "no address is the subnet's network or broadcast address"),
    ("ip-duplicate", ERROR, "no address is used twice (hosts, K3s nodes, gateway)"),
    ("boot-mode", ERROR, "boot is efi or bios"),
    ("disk-serial", ERROR, "a disk serial holds only characters a /dev/disk/by-id name can"),
    ("platform", ERROR, "platform is x86_64-linux or aarch64-linux"),
    ("boot-platform", ERROR, "boot=bios only on platform x86_64-linux (GRUB i386-pc)"),
    (
        "interface-eth",
        WARNING,
        "an interface is not a kernel name eth<N> (NixOS renames NICs by default)",
    ),
    ("k3s-type", ERROR, "type is init-server, server or agent"),
    ("k3s-host-unknown", ERROR, "every K3s row names a host of hosts.csv"),
    ("k3s-host-slot", ERROR, "at most one server and one agent per host"),
    ("k3s-init-server", ERROR, "exactly one init-server when there are K3s rows"),
    ("k3s-no-server", ERROR, "agents need servers"),
    ("k3s-no-agent", WARNING, "servers need agents to run pods (servers are agentless)"),
    ("k3s-server-count", WARNING, "an odd number of servers (etcd quorum)"),
    # network.py: network.yaml
    ("yaml-syntax", ERROR, "network.yaml is valid YAML: one mapping"),
    ("network-key-missing", ERROR, "gateway and netmask are set"),
    ("network-key-unknown", WARNING, "network.yaml has no unknown keys"),
    ("network-key-duplicate", ERROR, "no key is repeated in network.yaml"),
    ("network-value", ERROR, "a network.yaml key has the right shape (single value / list)"),
    (
        "netmask",
        ERROR,
        "netmask is a prefix length 1-30, '/24', or a dotted mask, wide enough for the plan",
    ),
    (
        "gateway",
        ERROR,
        "the gateway is in the subnet the plan's addresses share, not its network/broadcast",
    ),
    (
        "nixos-release",
        ERROR,
        "nixos is a release like 25.05 that k3scluster has a nixpkgs pin for",
    ),
    (
        "nixpkgs-pin",
        ERROR,
        "nixpkgs, when set, is {rev: <40-hex commit>, sha256: <tarball hash>}",
    ),
    ("k3s-version", ERROR, "k3s is a K3s minor release like 1.35 (or a tag like v1.35.2+k3s1)"),
    (
        "k3s-release",
        ERROR,
        "the pinned nixpkgs packages the K3s minor release the plan needs (k3s, or its default)",
    ),
    ("nixos-missing", WARNING, "network.yaml names the NixOS release (nixos:)"),
    # nixos.py: system.stateVersion (network.yaml key and hosts.csv column)
    ("state-version", ERROR, "stateVersion (network.yaml or hosts.csv) is a release like 25.05"),
    (
        "state-version-missing",
        WARNING,
        "stateVersion is recorded when nixos is not the default stateVersion 25.05",
    ),
    # secrets.py: secrets/
    ("token-missing", ERROR, "secrets/token exists"),
    ("token-invalid", ERROR, "the token is one line of printable characters"),
    (
        "agent-token-missing",
        WARNING,
        "secrets/agent-token exists (else the agents join with the server token)",
    ),
    ("agent-token-invalid", ERROR, "the agent token is one line of printable characters"),
    ("agent-token-same", WARNING, "the agent token is not the server token"),
    (
        "passwd-missing",
        ERROR,
        "every host has a password hash (secrets/passwd or secrets/HOSTpasswd)",
    ),
    ("passwd-invalid", ERROR, "a password file holds one crypt hash ($y$, $6$, $5$, $2b$)"),
    ("passwd-unknown-host", WARNING, "a HOSTpasswd file names a host of hosts.csv"),
    ("ssh-key-missing", ERROR, "every host has at least one ssh public key"),
    ("ssh-key-invalid", ERROR, "files ending in .pub hold ssh public keys"),
    ("secret-permissions", WARNING, "secret files are not readable by group/others"),
    # nixconfigs.py: nixConfigs/
    (
        "nixconfig-unknown",
        WARNING,
        "nixConfigs files (.nix) are named after a host or K3s node",
    ),
    (
        "bios-grub-device",
        ERROR,
        "a BIOS host has a disk serial or its nixConfigs set boot.loader.grub.device",
    ),
    # manifests.py: manifests/
    (
        "manifest-name",
        ERROR,
        "manifest file names are RFC 1123 names (lowercase a-z, 0-9, '-', '.')",
    ),
    ("manifest-yaml", ERROR, "manifests are valid YAML/JSON Kubernetes objects"),
    ("manifest-other", WARNING, "manifests/ holds only .yaml, .yml and .json files"),
)

# rule id -> what it checks (documented in docs/plan-format.md, one test case each)
RULES: dict[str, str] = {rule: text for rule, _, text in _REGISTRY}

# the rules that only warn: the cluster still loads
WARNING_RULES = frozenset(rule for rule, severity, _ in _REGISTRY if severity == WARNING)

assert len(RULES) == len(_REGISTRY), "a rule id is registered twice"
