"""``k3scluster init DIR``: a new cluster directory with example plans and the K3s tokens.

Never overwrites anything: every file is written to a temporary file and linked
into place, which fails when the name exists (O_EXCL semantics). Re-running adds
only what is missing, so an existing token is never replaced (K3s rejects nodes
that come with a new token).

One exception to "adds what is missing": a directory that already holds a cluster
(secrets/token was there before this run) never gets secrets/agent-token by default.
Adding an agent token to a cluster that runs may keep its servers from restarting
(README: "The agent token"; check's warning agent-token-missing), so that move is
made only when asked for (``add_agent_token``, ``k3scluster init --agent-token``).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from k3scluster.errors import K3sClusterError
from k3scluster.pins import NEWEST_NIXOS_RELEASE, NIXPKGS_PINS

DIRS = ("plans", "nixConfigs", "secrets", "manifests")

HOSTS_CSV = """\
# One row per machine. Lines starting with # are comments.
#   name       host name (a-z, 0-9, '-'), also the colmena node name
#   interface  the network card the host uses (`ip link`), at most 15 characters
#   ip         the host's address, inside gateway/netmask of network.yaml
#   admin      the user created on the host (wheel, your ssh keys)
#   disk       optional: serial of the disk the installer wipes (`lsblk -dno NAME,SERIAL`)
#   boot       optional: efi (default) or bios
#   platform   optional column: x86_64-linux (default) or aarch64-linux
#   stateVersion  optional column: the host's system.stateVersion, when it was installed
#              with another release than network.yaml's stateVersion
# Further columns are yours: they reach the NixOS config as config.cluster.<host>.<column>.
name,interface,ip,admin,disk,boot
# node1,eno1,192.168.1.10,alice,S4EVNX0R123456,efi
"""

K3S_CSV = """\
# One row per K3s node (empty = no Kubernetes). A host runs at most one server
# (a NixOS container) and one agent (a podman container).
#   host  a name from hosts.csv
#   name  the Kubernetes node name (a-z, 0-9, '-')
#   type  init-server (exactly one: starts the cluster), server or agent
#   ip    the node's own address in the subnet
# Use an odd number of servers (1, 3, 5): etcd needs a majority.
host,name,type,ip
# node1,node1-server,init-server,192.168.1.20
# node1,node1-agent,agent,192.168.1.21
"""

NETWORK_YAML = f"""\
# The one subnet every host and K3s node lives in: gateway/netmask.
gateway: 192.168.1.1
netmask: 24
# The NixOS release the hosts run (k3scluster pins it to one nixpkgs commit), and the
# release they are first installed with (system.stateVersion): when you upgrade, change
# nixos and keep stateVersion as it is.
nixos: "{NEWEST_NIXOS_RELEASE}"
stateVersion: "{NEWEST_NIXOS_RELEASE}"
# The K3s minor release of servers and agents alike (they run the patch level the
# pinned nixpkgs packages). Upgrade K3s one minor release at a time.
k3s: "{NIXPKGS_PINS[NEWEST_NIXOS_RELEASE].k3s_default}"
# Optional (default shown):
# nameservers: [8.8.8.8]
"""

SECRETS_README = """\
# Secrets of this cluster

Keep this folder private (mode 0700) and backed up; never publish it.
- `token`: the K3s token, made by `k3scluster init`. Never change it once the cluster runs.
  Only the K3s servers get it: whoever holds it can join as a server.
- `agent-token`: the token the K3s agents join with, made by `k3scluster init`. Without it (a
  cluster made before agent tokens) the agents join with `token`; adding one to a cluster that
  runs is not known to be safe (the k3scluster README: "The agent token").
- `passwd`: the password hash of the admin user on every host; `<host>passwd` for one host.
  Make one with `mkpasswd -m yescrypt` or `openssl passwd -6`.
- `*.pub`: ssh public keys. `<host>.pub` applies to that host only, any other `.pub` to every host.
"""

GITIGNORE = """\
# Rendered files, rebuilt by `k3scluster render`
/.k3scluster/
# Secrets: keep them out of version control (the .pub files are not secret)
/secrets/token
/secrets/agent-token
/secrets/*passwd
"""

# relative path -> (content, mode)
FILES: tuple[tuple[str, str, int], ...] = (
    ("plans/hosts.csv", HOSTS_CSV, 0o644),
    ("plans/k3s.csv", K3S_CSV, 0o644),
    ("plans/network.yaml", NETWORK_YAML, 0o644),
    ("secrets/README.md", SECRETS_README, 0o644),
    (".gitignore", GITIGNORE, 0o644),
)
TOKEN = "secrets/token"
AGENT_TOKEN = "secrets/agent-token"

# Why init left the agent token out, and how to add it deliberately (printed by the CLI).
AGENT_TOKEN_HELD_BACK = (
    "secrets/token exists, so this directory holds a cluster that may be running: adding "
    "an agent token to a running cluster may keep its servers from restarting ('passwd "
    "newer than datastore'; README: \"The agent token\"). The agents keep joining with "
    "secrets/token. To move the cluster to an agent token deliberately, after reading that "
    "section: k3scluster init --agent-token DIR, then pulumi up"
)


@dataclass(frozen=True)
class InitResult:
    root: Path
    created: tuple[str, ...]  # relative paths (directories end with /)
    kept: tuple[str, ...]  # existing paths left as they were
    # missing files init left out on purpose: relative path -> why, and how to add it
    held_back: tuple[tuple[str, str], ...] = ()


def init_cluster(root: Path, add_agent_token: bool = False) -> InitResult:
    """Create what is missing of a cluster directory at ``root``; never overwrite.

    The agent token is written for a new cluster (no secrets/token yet), and to an
    existing cluster's directory only with ``add_agent_token``.
    """
    root = Path(root)
    created: list[str] = []
    kept: list[str] = []
    held_back: list[tuple[str, str]] = []
    if root.exists() and not root.is_dir():
        raise K3sClusterError(
            f"{root} exists and is not a directory", "give a new or existing directory"
        )
    try:
        if not root.exists():
            root.mkdir(parents=True)
            created.append("./")
        for d in DIRS:
            path = root / d
            if path.is_dir():
                kept.append(f"{d}/")
                continue
            if path.exists():
                raise K3sClusterError(
                    f"{path} exists and is not a directory", "move it away, then run init again"
                )
            path.mkdir(mode=0o700 if d == "secrets" else 0o755)
            created.append(f"{d}/")
        for rel, text, mode in FILES:
            (created if _create(root / rel, text.encode(), mode) else kept).append(rel)
        # the tokens last: a fresh one only when there is none; an existing cluster's
        # directory gets no agent token unless asked for (see the module's docstring)
        existing_cluster = _exists(root / TOKEN)
        _create_token(root / TOKEN, TOKEN, created, kept)
        if existing_cluster and not add_agent_token and not _exists(root / AGENT_TOKEN):
            held_back.append((AGENT_TOKEN, AGENT_TOKEN_HELD_BACK))
        else:
            _create_token(root / AGENT_TOKEN, AGENT_TOKEN, created, kept)
    except OSError as exc:
        raise K3sClusterError(
            f"cannot create the cluster directory {root}: {exc.strerror} ({exc.filename})",
            "check that you may write there",
        ) from None
    return InitResult(root, tuple(created), tuple(kept), tuple(held_back))


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _create_token(path: Path, rel: str, created: list[str], kept: list[str]) -> None:
    """A fresh random token at ``path`` (0600) unless one is there."""
    token = (secrets.token_hex(32) + "\n").encode()
    (created if _create(path, token, 0o600) else kept).append(rel)


def _create(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``path`` atomically unless it exists; True when written.

    The content goes to a temporary file in the same directory (created 0600 by
    mkstemp), then is linked to its name: ``link`` fails if the name exists, so a
    file is never overwritten, and a reader never sees it half written.
    """
    if _exists(path):
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # file systems without hard links: exclusive create, then write
            return _create_excl(path, data, mode)
    finally:
        os.unlink(tmp)
    return True


def _create_excl(path: Path, data: bytes, mode: int) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)
    return True
