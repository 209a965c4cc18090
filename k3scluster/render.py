"""Render a ``Cluster`` into the NixOS configurations colmena deploys.

``render_files`` is pure: it maps relative paths under OUT to file text. Plan
data reaches Nix in two ways only: ``cluster.json`` (read by
``modules/cluster.nix`` with ``builtins.fromJSON``) and values in the templates
that pass the ``nix`` filter (k3scluster/nix.py). Secrets appear only as paths:
colmena reads them on the deploying machine (``deployment.keys``), so they never
enter the Nix store nor any rendered file.

Layout of OUT::

    hive.nix                  colmena hive: pinned nixpkgs, one node per host
    cluster.json              plan data (no secrets), config.cluster.<host>.<column>
    cluster.svg, cluster.md   the picture and tables of the cluster (k3scluster.diagram; only
                              render_to_dir writes them, no host depends on them)
    modules/cluster.nix       declares options.cluster, reads cluster.json
    modules/base.nix          every host: network, users, ssh, firewall
    modules/k3s-common.nix    K3s hosts: what server and agent share on the host
    modules/k3s-release.nix   the cluster's K3s package and the agents' image tag from it
    modules/k3s-server.nix    K3s server in the NixOS container `k3s-server`
    modules/k3s-server-start.sh  before each K3s server start: restart, join or init
    modules/k3s-agent.nix     K3s agent in the podman container `k3s-agent`
    modules/k3s-agent-start.sh   before each K3s agent start: the server it registers with
    hosts/<host>.nix          the host's values and imports
    installers/<host>/...     k3scluster.installer
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import jinja2

from k3scluster import commands, diagram, installer
from k3scluster.bootdisk import boot_disk_rules
from k3scluster.errors import K3sClusterError
from k3scluster.k3s_start import (
    AGENT_ENV_FILE,
    AGENT_SCRIPT_PATH,
    AGENT_SCRIPT_TEMPLATE,
    AGENT_SERVERS_ETC,
    ENV_FILE,
    ETCD_WAL_DIR,
    MANIFEST_DIR,
    PRUNE_PATH,
    PRUNE_TEMPLATE,
    SCRIPT_PATH,
    SCRIPT_TEMPLATE,
    SCRIPT_VALUES,
    START_TIMEOUT_MIN,
    other_servers,
    registration_servers,
    sh_value,
)
from k3scluster.macs import agent_mac, host_macvlan_mac, server_mac
from k3scluster.model import DEFAULT_STATE_VERSION, Cluster, Host, K3sType, SecretFile
from k3scluster.nix import NixPath, nix_value
from k3scluster.pins import (
    NIXPKGS_PINS,
    NIXPKGS_SYSTEM,
    NixpkgsPin,
    is_commit,
    k3s_package_attr,
)

T = TypeVar("T")
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

# Where colmena puts the secrets on a host (deployment.keys.*.destDir): persistent,
# unlike the default /run/keys (a tmpfs, empty after a reboot until the next deploy).
SECRETS_DIR = "/var/lib/k3scluster/secrets"
TOKEN_KEY = "k3s-token"
# The agents' own token, in a directory of its own: the agent container binds that
# directory (not the file: colmena replaces a key by renaming a new file over it), so it
# sees nothing but this token. The server container binds both directories.
AGENT_SECRETS_DIR = "/var/lib/k3scluster/agent-secrets"
AGENT_TOKEN_KEY = "k3s-agent-token"
AGENT_NETWORK = "k3s-macvlan"
# Marker written into OUT: write_tree only ever replaces a directory that holds it
# (or an empty one), so a wrong --out can never wipe a directory of the user's.
MARKER = ".k3scluster-render"
# the manifests/ file names of the render (read back by removed_manifests)
MANIFEST_LIST = "manifests.json"


# eth0, eth1, …: names the kernel gives and NixOS replaces unless predictable names are off
_KERNEL_NIC = re.compile(r"eth[0-9]+")


def nixpkgs_pin(cluster: Cluster) -> NixpkgsPin:
    """The pin for the cluster's NixOS release; network.yaml ``nixpkgs: {rev, sha256}`` wins."""
    net = cluster.network
    rev, sha = net.nixpkgs_rev, net.nixpkgs_sha256
    if bool(rev) != bool(sha):
        raise K3sClusterError(
            "plans/network.yaml: nixpkgs needs both rev and sha256",
            "nixpkgs: {rev: <40-hex commit>, sha256: <hash of the unpacked tarball>}",
        )
    if rev and sha:
        if not is_commit(rev):
            raise K3sClusterError(
                f"plans/network.yaml: nixpkgs rev {rev!r} is not a full commit hash",
                "give the 40-hex-digit commit of NixOS/nixpkgs",
            )
        return NixpkgsPin(rev=rev, sha256=sha, source="plans/network.yaml")
    pin = NIXPKGS_PINS.get(net.nixos_release)
    if pin is None:
        known = ", ".join(sorted(NIXPKGS_PINS))
        raise K3sClusterError(
            f"no nixpkgs pin is known for NixOS {net.nixos_release}",
            f"use one of {known}, or pin it in plans/network.yaml: "
            "nixpkgs: {rev: <commit>, sha256: <hash of the unpacked tarball>}",
        )
    return pin


# -- rendering ---------------------------------------------------------------


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters["nix"] = nix_value
    env.filters["sh"] = sh_value
    return env


def _rel(here: Path, cluster: Cluster, relpath: str) -> NixPath:
    """The path of ``relpath`` (relative to the cluster dir) as seen from ``here``, a
    directory of the render output, already resolved (the caller resolves it once)."""
    target = cluster.root / relpath
    return NixPath(Path(os.path.relpath(target.resolve(), here)).as_posix())


def _safe_comment(text: str) -> str:
    # Only validated names and file names go into comments; refuse anything that
    # could end the comment line.
    if any(c in text for c in "\n\r"):
        raise ValueError(f"refusing a line break in a comment: {text!r}")
    return text


@dataclass(frozen=True)
class VmRender:
    """What a VM stack's render differs in (``k3scluster:vms``; ``lab.spec.vm_render``).

    Each host's NIC is named by its VM's MAC (``macs``), the VM's initrd has QEMU's drivers
    (``profiles/qemu-guest.nix``), and its hardware configuration is the one read from the
    VM into the stack's lab (``hardware_file``), never ``nixConfigs/<host>.hardware.nix``:
    that file describes the real machine, and what a VM stack learns stays in that stack.
    """

    macs: Mapping[str, str]
    lab_dir: Path

    def hardware_file(self, host: str) -> Path:
        return self.lab_dir / host / "hardware.nix"


def hardware_config(cluster: Cluster, host: str, vm: VmRender | None) -> str | None:
    """The user's ``nixConfigs/<host>.hardware.nix`` when this stack imports it: a hardware
    stack does when it exists, a VM stack never."""
    return None if vm is not None else cluster.hardware_config(host)


def hardware_input_key(host: str, vm: VmRender | None) -> str:
    """The name, in ``host_inputs``, of the host's hardware configuration's digest."""
    return f"vmHardware:{host}" if vm is not None else f"nixConfig:nixConfigs/{host}.hardware.nix"


# Values derived from the last cluster asked about, so that asking per host stays cheap:
# _shared_nix_configs lists nixConfigs/, which made host_inputs of every host quadratic in
# the number of hosts. (Cluster.k3s_on, server_on and agent_on keep their own index.)
_MEMO: list[tuple[Cluster, dict[object, Any]]] = []


def _memo(cluster: Cluster, key: object, compute: Callable[[], T]) -> T:
    if not _MEMO or _MEMO[0][0] is not cluster:
        _MEMO[:] = [(cluster, {})]
    cache = _MEMO[0][1]
    if key not in cache:
        cache[key] = compute()
    return cast(T, cache[key])


def _agent_join_token(cluster: Cluster) -> SecretFile | None:
    """What the agents join with: ``secrets/agent-token``, or in a cluster without one (made
    before agent tokens existed) the server token, as before (README: "The agent token")."""
    s = cluster.secrets
    return s.agent_token if s.agent_token is not None else s.token


def _agent_key_on(cluster: Cluster, host: str) -> bool:
    """Whether ``host`` gets the key AGENT_TOKEN_KEY (in AGENT_SECRETS_DIR, the directory the
    agent container binds): with an agent token every K3s host (the servers read it as
    --agent-token-file), without one only the agents (holding the server token)."""
    if cluster.secrets.agent_token is not None:
        return bool(cluster.k3s_on(host))
    return cluster.agent_on(host) is not None


def _tags(cluster: Cluster, host: str) -> list[str]:
    tags = []
    server = cluster.server_on(host)
    if server is not None:
        tags.append("k3s-server")
        if server.type is K3sType.INIT_SERVER:
            tags.append("k3s-init-server")
    if cluster.agent_on(host) is not None:
        tags.append("k3s-agent")
    return tags or ["no-k3s"]


def _passwd_key(host: Host) -> str:
    return f"passwd-{host.admin}"


def _key_lines(cluster: Cluster, host: str) -> list[str]:
    lines: list[str] = []
    for key in cluster.secrets.keys_for(host):
        for line in key.text.splitlines():
            line = line.strip()
            if line and line not in lines:
                lines.append(line)
    return lines


def _host_data(cluster: Cluster, h: Host) -> dict[str, object]:
    """One host's entry of cluster.json: its columns and its K3s rows by role."""
    row: dict[str, object] = dict(h.columns)
    if "k3s" in row:
        raise K3sClusterError(
            f"{h.location}: hosts.csv has a column named 'k3s'",
            "rename it: config.cluster.<host>.k3s holds the host's K3s rows",
        )
    k3s: dict[str, object] = {}
    for node in cluster.k3s_on(h.name):
        k3s[node.role] = dict(node.columns)
    row["k3s"] = k3s
    return row


def cluster_data(cluster: Cluster) -> dict[str, object]:
    """The content of cluster.json: plan data only, never a secret."""
    hosts: dict[str, object] = {h.name: _host_data(cluster, h) for h in cluster.hosts}
    return {"hosts": hosts, "network": _network_data(cluster)}


def _network_data(cluster: Cluster) -> dict[str, object]:
    net = cluster.network
    return {
        "gateway": str(net.gateway),
        "network": str(net.network),
        "prefixLength": net.prefix_length,
        "nameservers": [str(n) for n in net.nameservers],
        "nixos": net.nixos_release,
        "stateVersion": net.state_version or DEFAULT_STATE_VERSION,
        "k3s": net.k3s,
        "apiEndpoint": cluster.api_endpoint,
    }


def _json(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _host_context(
    cluster: Cluster, host: Host, out: Path, vm: VmRender | None = None
) -> dict[str, object]:
    net = cluster.network
    if len(host.interface) > 15:
        raise K3sClusterError(
            f"{host.location}: interface {host.interface!r} is longer than 15 characters",
            "Linux interface names have at most 15 characters: use the name `ip link` shows",
        )
    here = (out / "hosts").resolve()  # where the host's file is written
    passwd = cluster.secrets.passwd_for(host.name)
    imports = []
    own = cluster.nix_config(host.name)
    if own:
        imports.append({"path": _rel(here, cluster, own), "comment": _safe_comment(own)})
    hardware = hardware_config(cluster, host.name, vm)
    if vm is not None:
        lab_file = vm.hardware_file(host.name)
        missing = {
            "path": NixPath(Path(os.path.relpath(lab_file.resolve(), here)).as_posix()),
            "comment": f"The lab's {lab_file.parent.name}/{lab_file.name}",
            "into": "the lab",
        }
    else:
        hardware_rel = f"nixConfigs/{host.name}.hardware.nix"
        missing = {
            "path": _rel(here, cluster, hardware_rel),
            "comment": hardware_rel,
            "into": "nixConfigs/",
        }
    if hardware:
        imports.append(
            {"path": _rel(here, cluster, hardware), "comment": _safe_comment(hardware)}
        )
    ctx: dict[str, object] = {
        "host": host,
        "location": _safe_comment(str(host.location)),
        "imports": imports,
        "hardware_missing": None if hardware else missing,
        "values": {
            "name": host.name,
            "interface": host.interface,
            "address": str(host.ip),
            "prefixLength": net.prefix_length,
            "gateway": str(net.gateway),
            "nameservers": [str(n) for n in net.nameservers],
            "admin": host.admin,
            "passwordFile": f"{SECRETS_DIR}/{_passwd_key(host)}" if passwd else None,
            "stateVersion": net.state_version_of(host),
            "boot": host.boot.value,
            "macAddress": host_macvlan_mac(host.name),
            "platform": host.platform,
        },
        "kernel_interface_names": _KERNEL_NIC.fullmatch(host.interface) is not None,
        "ssh_keys": _key_lines(cluster, host.name),
        "boot_disk_rules": boot_disk_rules(host),
        "server": None,
        "agent": None,
        "k3s": None,
    }
    init = cluster.init_server
    server = cluster.server_on(host.name)
    agent = cluster.agent_on(host.name)
    if (server or agent) and init is None:
        raise K3sClusterError(
            "K3s rows but no init-server in plans/k3s.csv",
            "make exactly one row type init-server",
        )
    if server or agent:
        ctx["k3s"] = {"minor": net.k3s, "packageAttr": k3s_package_attr(net.k3s)}
    if server is not None:
        assert init is not None
        container_cfg = cluster.nix_config(server.name)
        ctx["server"] = {
            "node": server,
            "location": _safe_comment(str(server.location)),
            "values": {
                "name": server.name,
                "address": str(server.ip),
                # the planned init-server: starts a new cluster only when it has no
                # etcd data and none of `servers` answers (k3scluster/k3s_start.py)
                "clusterInit": server.type is K3sType.INIT_SERVER,
                "servers": other_servers(cluster, server),
                "macAddress": server_mac(server.name),
            },
            "manifests": [
                {"name": m, "path": _rel(here, cluster, f"manifests/{m}")}
                for m in sorted(cluster.manifests)
            ],
            "imports": [
                {
                    "path": _rel(here, cluster, container_cfg),
                    "comment": _safe_comment(container_cfg),
                }
            ]
            if container_cfg
            else [],
        }
    if agent is not None:
        assert init is not None
        ctx["agent"] = {
            "node": agent,
            "location": _safe_comment(str(agent.location)),
            "values": {
                "name": agent.name,
                "address": str(agent.ip),
                # where it registers: the first of these that answers (k3s-agent-start.sh)
                "servers": registration_servers(cluster),
                "subnet": str(net.network),
                "macAddress": agent_mac(agent.name),
            },
        }
    return ctx


def _hive_context(cluster: Cluster, out: Path) -> dict[str, object]:
    pin = nixpkgs_pin(cluster)
    here = out.resolve()  # where hive.nix is written
    nodes = []
    for host in cluster.hosts:
        keys = []
        passwd = cluster.secrets.passwd_for(host.name)
        if passwd is not None:
            keys.append(
                {
                    "name": _passwd_key(host),
                    "path": _rel(here, cluster, passwd.relpath),
                    "comment": _safe_comment(passwd.relpath),
                    "dest_dir": SECRETS_DIR,
                }
            )
        if cluster.server_on(host.name) is not None:
            token = cluster.secrets.token
            if token is None:
                raise K3sClusterError(
                    "secrets/token is missing but the plans have K3s servers",
                    "`k3scluster init DIR` creates it; never change it once the cluster runs",
                )
            keys.append(
                {
                    "name": TOKEN_KEY,
                    "path": _rel(here, cluster, token.relpath),
                    "comment": _safe_comment(token.relpath),
                    "dest_dir": SECRETS_DIR,
                }
            )
        if _agent_key_on(cluster, host.name):
            agent_token = _agent_join_token(cluster)
            if agent_token is None:
                raise K3sClusterError(
                    "secrets/token is missing but the plans have K3s agents",
                    "`k3scluster init DIR` creates it; never change it once the cluster runs",
                )
            keys.append(
                {
                    "name": AGENT_TOKEN_KEY,
                    "path": _rel(here, cluster, agent_token.relpath),
                    "comment": _safe_comment(agent_token.relpath),
                    "dest_dir": AGENT_SECRETS_DIR,
                }
            )
        nodes.append(
            {
                "name": host.name,
                "file": NixPath(f"./hosts/{host.name}.nix"),
                "target_host": str(host.ip),
                "via_env": commands.via_env(host.name),
                "tags": _tags(cluster, host.name),
                "keys": sorted(keys, key=lambda k: str(k["name"])),
            }
        )
    return {
        "pin": pin,
        "release": cluster.network.nixos_release,
        "system": NIXPKGS_SYSTEM,
        "nodes": nodes,
    }


# name of the template -> path under OUT, for the modules every hive shares
MODULES = {
    "module-cluster.nix.j2": "modules/cluster.nix",
    "module-base.nix.j2": "modules/base.nix",
    "module-k3s-common.nix.j2": "modules/k3s-common.nix",
    "module-k3s-release.nix.j2": "modules/k3s-release.nix",
    "module-k3s-server.nix.j2": "modules/k3s-server.nix",
    "module-k3s-agent.nix.j2": "modules/k3s-agent.nix",
}


def _common(cluster: Cluster) -> dict[str, object]:
    """The values every module and hive template gets."""
    return {
        "secrets_dir": SECRETS_DIR,
        "token_key": TOKEN_KEY,
        "agent_secrets_dir": AGENT_SECRETS_DIR,
        "agent_token_key": AGENT_TOKEN_KEY,
        # servers run --agent-token-file only when secrets/agent-token exists
        "own_agent_token": cluster.secrets.agent_token is not None,
        "agent_network": AGENT_NETWORK,
        "start_env": ENV_FILE,
        "manifest_dir": MANIFEST_DIR,
        "agent_start_env": AGENT_ENV_FILE,
        "agent_servers_etc": AGENT_SERVERS_ETC,
        "etcd_wal_dir": ETCD_WAL_DIR,
        "start_timeout_min": START_TIMEOUT_MIN,
    }


def cluster_files(cluster: Cluster, out: Path) -> dict[str, str]:
    """``cluster.json`` and ``hive.nix`` of the render (part of ``render_files``): the files
    that hold every host's plan values, the same in a VM stack. A deploy compares them with
    the render on disk (components/rendered.py) without rendering every host's files."""
    return {
        "cluster.json": _json(cluster_data(cluster)),
        "hive.nix": _environment()
        .get_template("hive.nix.j2")
        .render(**_common(cluster), **_hive_context(cluster, Path(out))),
    }


def render_files(
    cluster: Cluster,
    out: Path,
    vm: VmRender | None = None,
    held_agents: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Every file of the render, as relative path under OUT -> text. Pure.

    ``out`` is used only to compute the relative paths from the rendered files back
    into the cluster directory (nixConfigs, manifests, secrets). ``vm`` (VM stacks only)
    gives each host a systemd ``.link`` that names its VM NIC as planned, QEMU's guest
    profile, and the hardware configuration of the stack's lab (``VmRender``).
    ``held_agents`` (host -> K3s minor, during a K3s minor upgrade): a
    ``servers-first/<host>.nix`` hive for each, keeping its agent at that release.
    """
    out = Path(out)
    env = _environment()
    common = _common(cluster)
    files: dict[str, str] = cluster_files(cluster, out)
    for template, path in MODULES.items():
        files[path] = env.get_template(template).render(**common)
    files[SCRIPT_PATH] = env.get_template(SCRIPT_TEMPLATE).render(**SCRIPT_VALUES)
    files[AGENT_SCRIPT_PATH] = env.get_template(AGENT_SCRIPT_TEMPLATE).render(**SCRIPT_VALUES)
    files[PRUNE_PATH] = env.get_template(PRUNE_TEMPLATE).render()
    # the manifests of this render: the next preview and up compare with it (a manifest
    # that left the plans leaves its objects in the cluster: they say so). No host uses it.
    files[MANIFEST_LIST] = _json(sorted(cluster.manifests))
    for host in cluster.hosts:
        ctx = _host_context(cluster, host, out, vm)
        ctx["vm"] = {"mac": vm.macs[host.name]} if vm is not None else None
        files[f"hosts/{host.name}.nix"] = env.get_template("host.nix.j2").render(
            **common, **ctx
        )
        for rel, text in installer.render_installer(
            cluster, host.name, out, vm=vm is not None
        ).items():
            path = rel if rel.startswith("installers/") else f"installers/{host.name}/{rel}"
            files[path] = text
    for host_name, minor in sorted((held_agents or {}).items()):
        files[servers_first_path(host_name)] = servers_first_hive(
            host_name, k3s_package_attr(minor)
        )
    return dict(sorted(files.items()))


SERVERS_FIRST_DIR = "servers-first"


def servers_first_path(host: str) -> str:
    """Where ``servers_first_hive`` of ``host`` is rendered, under OUT."""
    return f"{SERVERS_FIRST_DIR}/{host}.nix"


def servers_first_hive(host: str, package_attr: str) -> str:
    """``servers-first/<host>.nix``: hive.nix with ``host``'s agent kept at ``package_attr``
    (``k3s_1_34``), for the deploy that moves the host's K3s server before its agent."""
    return _environment().get_template("hive-servers-first.nix.j2").render(
        hive=NixPath("../hive.nix"), host=host, package_attr=package_attr
    )


def removed_manifests(cluster: Cluster, out: Path) -> list[str]:
    """manifests/ files the render at ``out`` had and the plans no longer have.

    Their links leave the servers with the next deploy (k3s-manifests-prune.sh), but K3s
    deletes nothing it applied: the user must remove their objects. Empty when there is no
    earlier render (or it predates the list)."""
    try:
        before = json.loads((Path(out) / MANIFEST_LIST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(before, list):
        return []
    return sorted({str(m) for m in before} - set(cluster.manifests))


def removed_manifest_warning(name: str) -> str:
    return (
        f"manifests/{name} is no longer in the plans: the next deploy removes its link from "
        "every K3s server, but K3s deletes nothing it applied: its objects stay in the "
        f"cluster. Delete them yourself (`kubectl delete -f <a copy of {name}>`)."
    )


# -- writing -----------------------------------------------------------------


# files `pulumi up` writes into a render directory, kept when the tree is replaced: the
# kubeconfig (k3scluster:kubeconfigPath defaults to <renderDir>/kubeconfig, mode 0600)
KEPT = ("kubeconfig",)
# `k3scluster build` (colmena --keep-result) keeps each built system as an indirect GC root
# .gcroots/node-<host> beside hive.nix: Nix's gcroots/auto entry names that path, so the link
# must be there again after a render, or the next garbage collection deletes the build
GC_ROOTS = ".gcroots"


def write_tree(files: Mapping[str, str], out: Path, carry: Sequence[str] = ()) -> None:
    """Write ``files`` as the whole content of OUT, replacing an earlier render.

    Everything is written into a temporary directory beside OUT, which is then
    renamed into place: OUT is the old render or the new one, never a mix, and files
    of an earlier render that are gone now do not survive. Files are 0644, dirs 0755.
    ``carry``: directories of OUT whose files the earlier render had are kept as they are
    when ``files`` has none there (``k3scluster build`` keeps the servers-first hives of the
    stack's render, which it cannot make: they need the stack's records).
    """
    out = Path(out).absolute()
    if out.exists():
        if not out.is_dir():
            raise K3sClusterError(f"{out} exists and is not a directory", "choose another --out")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise K3sClusterError(
                f"{out} is not empty and was not made by `k3scluster render`",
                "give an empty or new directory as --out; nothing was changed",
            )
    for rel in files:
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or rel in ("", MARKER):
            raise ValueError(f"bad relative path in render: {rel!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    old: Path | None = None
    try:
        tmp.chmod(0o755)
        for rel in sorted(files):
            target = tmp / rel
            _mkdirs(tmp, target.parent)
            with open(target, "w", encoding="utf-8", newline="") as fh:
                fh.write(files[rel])
            target.chmod(0o644)
        marker = tmp / MARKER
        marker.write_text("made by k3scluster render; replaced as a whole on each render\n")
        marker.chmod(0o644)
        for keep in KEPT:  # what `pulumi up` wrote into OUT survives a render (same inode)
            if keep not in files and (out / keep).is_file() and not (out / keep).is_symlink():
                os.link(out / keep, tmp / keep)
        _copy_gc_roots(out / GC_ROOTS, tmp / GC_ROOTS)
        for kept_dir in carry:
            if not any(Path(rel).parts[0] == kept_dir for rel in files):
                _link_files(out / kept_dir, tmp / kept_dir)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)  # put the earlier render back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_gc_roots(src: Path, dst: Path) -> None:
    """The symlinks in ``src`` made again in ``dst`` (same targets); nothing else is copied."""
    if src.is_symlink() or not src.is_dir():
        return
    links = [p for p in sorted(src.iterdir()) if p.is_symlink()]
    if not links:
        return
    dst.mkdir()
    dst.chmod(0o755)
    for link in links:
        (dst / link.name).symlink_to(os.readlink(link))


def _link_files(src: Path, dst: Path) -> None:
    """The regular files directly in ``src`` linked (same inode) into a new ``dst``."""
    if src.is_symlink() or not src.is_dir():
        return
    files = [p for p in sorted(src.iterdir()) if p.is_file() and not p.is_symlink()]
    if not files:
        return
    dst.mkdir()
    dst.chmod(0o755)
    for f in files:
        os.link(f, dst / f.name)


def _mkdirs(base: Path, d: Path) -> None:
    missing = []
    while d != base and not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        m.mkdir()
        m.chmod(0o755)


def render_to_dir(
    cluster: Cluster,
    out: Path,
    notices: list[str] | None = None,
    vm: VmRender | None = None,
    held_agents: Mapping[str, str] | None = None,
    carry: Sequence[str] = (),
) -> dict[str, str]:
    """Render and write OUT, with the picture of the cluster (k3scluster.diagram); returns
    what was written (``carry``: as for :func:`write_tree`). A picture that cannot be drawn adds a line to ``notices`` and never
    stops the render. The picture's files are not in ``render_files``: no host depends on
    them."""
    # Graphviz draws the picture in its own process while this one renders the files
    with ThreadPoolExecutor(max_workers=1) as pool:
        drawing = pool.submit(diagram.picture_files, cluster, Path(out))
        files = render_files(cluster, out, vm, held_agents)
        pictures, notice = drawing.result()
    if notice is not None and notices is not None:
        notices.append(notice)
    clash = sorted(set(files) & set(pictures))
    if clash:
        raise ValueError(f"the picture would overwrite rendered files: {clash}")
    files.update(pictures)
    write_tree(files, out, carry)
    return dict(sorted(files.items()))


# -- what a host's system depends on -----------------------------------------


def _sha(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    return _sha(path.read_bytes()) if path.is_file() else _sha(b"<absent>")


def _shared_nix_configs(cluster: Cluster) -> list[str]:
    """nixConfigs files named after no host or node (imported by others, e.g. common/)."""
    base = cluster.root / "nixConfigs"
    if not base.is_dir():
        return []
    own = {f"{h.name}.nix" for h in cluster.hosts}
    own |= {f"{h.name}.hardware.nix" for h in cluster.hosts}
    own |= {f"{n.name}.nix" for n in cluster.k3s}
    shared = []
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(base).as_posix()
        if not p.is_file() or rel in own or any(part.startswith(".") for part in p.parts):
            continue
        if rel.endswith(".hardware.nix") and "/" not in rel:
            # a hardware configuration belongs to one machine (here: one no longer in the
            # plans); nothing else imports it, so it must not redeploy every host
            continue
        shared.append(f"nixConfigs/{rel}")
    return shared


def _dir_stamp(base: Path) -> tuple[tuple[str, int], ...]:
    """The modification times of ``base`` and every directory under it: a file added, removed
    or renamed anywhere below changes one of them."""
    stamp: list[tuple[str, int]] = []
    todo = [str(base)]
    while todo:
        d = todo.pop()
        try:
            stamp.append((d, os.stat(d).st_mtime_ns))
            with os.scandir(d) as entries:
                todo.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            stamp.append((d, -1))
    return tuple(sorted(stamp))


def _shared_nix_configs_now(cluster: Cluster) -> list[str]:
    """``_shared_nix_configs``, listed again only when nixConfigs/ changed since the last call
    for this cluster (host_inputs runs once per host)."""
    stamp = _dir_stamp(cluster.root / "nixConfigs")
    return _memo(cluster, ("shared", stamp), lambda: _shared_nix_configs(cluster))


def host_inputs(
    cluster: Cluster, host_name: str, files: Mapping[str, str], vm: VmRender | None = None
) -> dict[str, str]:
    """name -> sha256 hex of everything ``host_name``'s system depends on.

    Its rendered host file and the shared modules it imports, its slice of the plan
    data, the nixConfigs it imports, the manifests (server hosts), the versions and
    the nixpkgs pin, and the digests of its secrets (never their content). Another
    host's row changes this only where this host depends on it (the init-server's
    address, for every K3s host).
    """
    host = cluster.host(host_name)
    server = cluster.server_on(host_name)
    agent = cluster.agent_on(host_name)
    pin = nixpkgs_pin(cluster)
    inputs: dict[str, str] = {}

    used = [f"hosts/{host_name}.nix", "modules/cluster.nix", "modules/base.nix"]
    if server or agent:
        used.append("modules/k3s-common.nix")
        used.append("modules/k3s-release.nix")
    if server:
        used.append("modules/k3s-server.nix")
        used.append(SCRIPT_PATH)
        used.append(PRUNE_PATH)
    if agent:
        used.append("modules/k3s-agent.nix")
        used.append(AGENT_SCRIPT_PATH)
    for rel in used:
        inputs[f"file:{rel}"] = _sha(files[rel])
    keys = sorted(
        ([_passwd_key(host)] if cluster.secrets.passwd_for(host_name) else [])
        + ([TOKEN_KEY] if server else [])
        + ([AGENT_TOKEN_KEY] if _agent_key_on(cluster, host_name) else [])
    )
    inputs["deployment"] = _sha(
        _json({"targetHost": str(host.ip), "tags": _tags(cluster, host_name), "keys": keys})
    )
    inputs["plan:host"] = _sha(_json(_host_data(cluster, host)))
    # the API endpoint is the init-server's address: counted below, for K3s hosts only
    inputs["plan:network"] = _sha(_json(_network_data(cluster) | {"apiEndpoint": None}))
    init = cluster.init_server
    if (server or agent) and init is not None:
        inputs["plan:init-server"] = _sha(str(init.ip))
    inputs["version:nixos"] = _sha(cluster.network.nixos_release)
    if server or agent:
        inputs["version:k3s"] = _sha(cluster.network.k3s)
    inputs["nixpkgs"] = _sha(f"{pin.rev} {pin.sha256}")

    hardware = hardware_config(cluster, host_name, vm)
    nix_configs: list[str | None] = [cluster.nix_config(host_name), hardware]
    if server:
        nix_configs.append(cluster.nix_config(server.name))
    for cfg in nix_configs:
        if cfg:
            inputs[f"nixConfig:{cfg}"] = _file_sha(cluster.root / cfg)
    if vm is not None:
        # the VM's own, read from it into the lab (imported once it exists)
        inputs[hardware_input_key(host_name, vm)] = _file_sha(vm.hardware_file(host_name))
    elif not hardware:
        # imported once it exists (fetched from the machine before the first deploy)
        inputs[hardware_input_key(host_name, vm)] = _sha(b"<absent>")
    for rel in _shared_nix_configs_now(cluster):
        inputs[f"nixConfig:{rel}"] = _file_sha(cluster.root / rel)
    if server:
        for m in cluster.manifests:
            inputs[f"manifest:manifests/{m}"] = _file_sha(cluster.root / "manifests" / m)

    passwd = cluster.secrets.passwd_for(host_name)
    if passwd is not None:
        inputs[f"secret:{_passwd_key(host)}"] = passwd.sha256
    if server and cluster.secrets.token is not None:
        inputs[f"secret:{TOKEN_KEY}"] = cluster.secrets.token.sha256
    agent_token = _agent_join_token(cluster)
    if _agent_key_on(cluster, host_name) and agent_token is not None:
        inputs[f"secret:{AGENT_TOKEN_KEY}"] = agent_token.sha256
    return dict(sorted(inputs.items()))


# the inputs of ``host_inputs`` that ``host_plan`` shows in clear (a deploy step records the
# plan instead of their digests; ``host_digest`` still covers them)
PLAN_INPUTS = (
    "deployment", "plan:host", "plan:network", "plan:init-server", "version:nixos",
    "version:k3s", "nixpkgs",
)


def host_plan(cluster: Cluster, host_name: str) -> dict[str, str]:
    """A host's plan values in clear, one short string each, for its deploy step's inputs:
    ``pulumi preview --diff`` then shows what changed (``address: "10.0.100.2" =>
    "10.0.100.9"``). Everything ``PLAN_INPUTS`` digests, never a secret (secrets stay
    digests in ``host_inputs``): the row of hosts.csv (every column but the name; ``ip`` as
    ``address``), its K3s roles and rows, the init-server's address, the network, the
    releases and the nixpkgs commit."""
    host = cluster.host(host_name)
    own = _derived_plan(cluster, host_name)
    plan: dict[str, str] = {}
    for col, value in host.columns:
        if col != "name" and value:
            plan[_plan_name(col, own, {c for c, _ in host.columns})] = value
    plan.update(own)
    # the password key's name is the name of its secret: in host_inputs (secret:<key>)
    return plan


def _plan_name(col: str, own: Mapping[str, str], columns: set[str]) -> str:
    """The name ``host_plan`` shows hosts.csv column ``col`` under: its own, ``address`` for
    ``ip``, and ``<col> (hosts.csv)`` when a value ``host_plan`` derives has that name (a
    column ``roles``, ``network``, …, or ``address``): the derived value would replace the
    column's, whose change (which reaches the host's system as ``config.cluster.<host>.<col>``)
    the deploy step would then never see."""
    if col == "ip":
        return "address"
    if col not in own and col != "address":
        return col
    name, n = f"{col} (hosts.csv)", 2
    while name in own or name in columns:
        name, n = f"{col} (hosts.csv {n})", n + 1
    return name


def _derived_plan(cluster: Cluster, host_name: str) -> dict[str, str]:
    """The plan values ``host_plan`` derives (not columns of hosts.csv): the K3s roles and
    rows, the init-server's address, the network, the releases and the nixpkgs commit."""
    host = cluster.host(host_name)
    net = cluster.network
    plan: dict[str, str] = {}
    nodes = cluster.k3s_on(host_name)
    # the roles are colmena's tags too; the K3s release with them
    roles = ", ".join(n.type.value for n in nodes)
    plan["roles"] = f"{roles} (K3s {net.k3s})" if nodes else "no K3s"
    for node in nodes:
        extra = [f"{k}={v}" for k, v in node.columns if k not in ("host", "name", "type", "ip")]
        plan[f"k3s {node.type.value}"] = " ".join([node.name, str(node.ip), *extra])
    init = cluster.init_server
    if nodes and init is not None:
        plan["init-server"] = str(init.ip)
    dns = " ".join(str(n) for n in net.nameservers)
    plan["network"] = f"{net.network} via {net.gateway}, dns {dns}"
    pin = nixpkgs_pin(cluster)
    state = host.state_version or net.state_version or DEFAULT_STATE_VERSION
    plan["nixos"] = (
        f"{net.nixos_release} (stateVersion {state}, nixpkgs {pin.rev[:12]} {pin.sha256[:8]})"
    )
    return plan


# inputs a deploy step records as one entry each: "<names> @ <short digest over them>"
GROUPS = {"modules": "file:modules/", "manifests": "manifest:manifests/"}
GROUP_DIGEST = 12


def grouped_inputs(inputs: Mapping[str, T]) -> dict[str, T | str]:
    """``host_inputs`` as a deploy step records them: the shared modules and the manifests
    one line each (``"base.nix cluster.nix … @ 1a2b3c4d5e6f"``: which files, and a digest
    over them that ``group_digest`` recomputes), the host's own files, nixConfigs and
    secrets one line each."""
    out: dict[str, T | str] = {}
    members: dict[str, dict[str, str]] = {}
    for key, value in inputs.items():
        group = next((g for g, prefix in GROUPS.items() if key.startswith(prefix)), None)
        if group is None or not isinstance(value, str):
            out[key] = value
        else:
            members.setdefault(group, {})[key] = value
    for group, found in members.items():
        names = " ".join(k[len(GROUPS[group]) :] for k in sorted(found))
        out[group] = f"{names} @ {host_digest(found)[:GROUP_DIGEST]}"
    return dict(sorted(out.items()))


def group_digest(group: str, files: Mapping[str, str]) -> str:
    """The digest of a group entry from its files' sha256s (relative name -> sha256)."""
    prefix = GROUPS[group]
    return host_digest({prefix + k: v for k, v in files.items()})[:GROUP_DIGEST]


def host_digest(inputs: Mapping[str, str]) -> str:
    """One sha256 over the sorted ``name=digest`` lines of ``host_inputs``."""
    return _sha("".join(f"{k}={inputs[k]}\n" for k in sorted(inputs)))
