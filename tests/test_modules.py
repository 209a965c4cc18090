"""The rendered NixOS modules, evaluated: what a host, its K3s server container and its
K3s agent container get (issue 13).

nixpkgs is not available here: the modules are called with tests/nix/lib-stub.nix as
``lib`` (see tests/nixeval.py), so what they compute from the rendered host values is a
real ``nix-instantiate --eval`` of the rendered files. Which nixpkgs module reads each
option, and how, is written beside each test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from nixeval import LIB_STUB, container_config, host_args, module_config, module_expr, nix_eval

from k3scluster import macs, plans
from k3scluster.model import Cluster
from k3scluster.render import (
    AGENT_SECRETS_DIR,
    AGENT_TOKEN_KEY,
    SECRETS_DIR,
    TOKEN_KEY,
    render_to_dir,
)


def load(root: Path) -> Cluster:
    result = plans.load(root)
    assert result.cluster is not None, "\n".join(map(str, result.diagnostics))
    return result.cluster


@pytest.fixture
def out(example_dir: Path) -> Path:
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(load(example_dir), out)
    return out


TOKEN_FILE = f"{SECRETS_DIR}/{TOKEN_KEY}"
AGENT_TOKEN_FILE = f"{AGENT_SECRETS_DIR}/{AGENT_TOKEN_KEY}"


def warnings(result: plans.LoadResult) -> list[tuple[str, int]]:
    return [
        (rule, d.line)
        for d, rule in zip(result.diagnostics, result.rules, strict=True)
        if d.severity.value == "warning"
    ]


def agent_service(out: Path, host: str = "karl") -> dict[str, object]:
    svc = module_config(out, "k3s-agent", host, ".systemd.services.podman-k3s-agent")
    assert isinstance(svc, dict)
    return svc


def agent_container(out: Path, host: str = "karl") -> dict[str, object]:
    c = module_config(out, "k3s-agent", host, ".virtualisation.oci-containers.containers.k3s-agent")
    assert isinstance(c, dict)
    return c


# -- item 8: first boot before the first deploy ---------------------------------------
# colmena (src/nix/hive/modules.nix, keyServiceModule) makes `<key name>-key.service` and
# a `.path` unit (PathExists = destDir/name) for every deployment.keys entry; the service
# is active while the file exists. switch-to-configuration starts every active target
# again, which starts the units they want that were skipped at boot.


def test_key_guards_name_the_file_and_unit_colmena_makes(out: Path) -> None:
    def colmena(host: str, key: str) -> tuple[str, str]:
        keys = nix_eval(f"(import {out}/hive.nix).{host}.deployment.keys")
        assert isinstance(keys, dict)
        # options.nix: path = destDir/name; modules.nix: unit "${name}-key"
        return f"{keys[key]['destDir']}/{key}", f"{key}-key.service"

    agent_path, agent_unit = colmena("karl", AGENT_TOKEN_KEY)
    agent = agent_service(out)
    assert agent["unitConfig"] == {"ConditionPathExists": agent_path}
    assert agent["after"] == [agent_unit]
    token_path, token_unit = colmena("olaf", TOKEN_KEY)
    assert colmena("olaf", AGENT_TOKEN_KEY) == (agent_path, agent_unit)
    server = module_config(out, "k3s-server", "olaf", '.systemd.services."container@k3s-server"')
    assert server == {
        "unitConfig": {"ConditionPathExists": [token_path, agent_path]},
        "after": [token_unit, agent_unit],
    }
    # the tokens the units wait for are the ones the containers read
    assert token_path == TOKEN_FILE and agent_path == AGENT_TOKEN_FILE
    inner = container_config(out, "olaf", ".services.k3s.tokenFile")
    assert inner == token_path
    flags = container_config(out, "olaf", ".services.k3s.extraFlags")
    assert isinstance(flags, list) and f"--agent-token-file={agent_path}" in flags


def test_guards_never_require_the_key_unit(out: Path) -> None:
    # The installed system (from the ISO, evaluated without colmena's modules) has no
    # k3s-token-key.service, and colmena restarts it on every key upload: Requires=,
    # BindsTo= or PartOf= would fail the unit, or restart it on every deploy.
    for svc in (
        agent_service(out),
        module_config(out, "k3s-server", "olaf", '.systemd.services."container@k3s-server"'),
    ):
        assert isinstance(svc, dict)
        assert not {"requires", "bindsTo", "partOf", "requisite", "wants"} & set(svc)


# -- item 9: the secrets directory, bound read-only -----------------------------------
# colmena's key_uploader.template.sh writes `<dest>.tmp` and `mv`s it over the key: a new
# inode, which a bind mount of the file itself would never show.


def test_agent_binds_the_agent_token_directory_read_only(out: Path) -> None:
    # issue 19 item 3: only the agent token's directory, never secrets/ (server token,
    # password hash): the container is privileged and any pod with a hostPath sees it
    c = agent_container(out)
    volumes = c["volumes"]
    assert isinstance(volumes, list)
    secret_volumes = [v for v in volumes if "secrets" in str(v)]
    assert secret_volumes == [f"{AGENT_SECRETS_DIR}:/run/k3s-secrets:ro"]
    env = c["environment"]
    assert isinstance(env, dict)
    assert env["K3S_TOKEN_FILE"] == f"/run/k3s-secrets/{AGENT_TOKEN_KEY}"


# -- a cluster without secrets/agent-token (made before agent tokens) -------------------
# The servers run as before agent tokens (no --agent-token-file: adding one to a running
# cluster may keep its servers from restarting, README "The agent token"); the agent still
# binds only its own directory, where it finds the server token.


@pytest.fixture
def out_without_agent_token(example_dir: Path) -> Path:
    (example_dir / "secrets" / "agent-token").unlink()
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(load(example_dir), out)
    return out


def test_without_an_agent_token_servers_run_without_agent_token_file(
    out_without_agent_token: Path,
) -> None:
    out = out_without_agent_token
    flags = container_config(out, "olaf", ".services.k3s.extraFlags")
    assert flags == ["--egress-selector-mode=pod"]
    assert container_config(out, "olaf", ".services.k3s.tokenFile") == TOKEN_FILE
    # the server waits for the server token only (olaf's agent key is the agent's business)
    server = module_config(out, "k3s-server", "olaf", '.systemd.services."container@k3s-server"')
    assert server == {
        "unitConfig": {"ConditionPathExists": [TOKEN_FILE]},
        "after": [f"{TOKEN_KEY}-key.service"],
    }
    binds = module_config(out, "k3s-server", "olaf", ".containers.k3s-server.bindMounts")
    assert binds == {SECRETS_DIR: {"hostPath": SECRETS_DIR, "isReadOnly": True}}


def test_without_an_agent_token_the_agent_binds_only_its_directory(
    out_without_agent_token: Path,
) -> None:
    out = out_without_agent_token
    c = agent_container(out)
    volumes = c["volumes"]
    assert isinstance(volumes, list)
    assert [v for v in volumes if "secrets" in str(v)] == [f"{AGENT_SECRETS_DIR}:/run/k3s-secrets:ro"]
    env = c["environment"]
    assert isinstance(env, dict)
    assert env["K3S_TOKEN_FILE"] == f"/run/k3s-secrets/{AGENT_TOKEN_KEY}"
    # the key colmena puts there is the server token, and the agent waits for it
    keys = nix_eval(f"(import {out}/hive.nix).karl.deployment.keys")
    assert isinstance(keys, dict) and set(keys) == {AGENT_TOKEN_KEY, "passwd-manfred"}
    assert keys[AGENT_TOKEN_KEY]["keyFile"].endswith("/secrets/token")
    assert keys[AGENT_TOKEN_KEY]["destDir"] == AGENT_SECRETS_DIR
    assert agent_service(out)["unitConfig"] == {"ConditionPathExists": AGENT_TOKEN_FILE}


def test_server_binds_the_secrets_directory_read_only(out: Path) -> None:
    binds = module_config(out, "k3s-server", "olaf", ".containers.k3s-server.bindMounts")
    # nixos-containers.nix: bindMounts.<mountPoint> = { hostPath; isReadOnly; } becomes
    # --bind-ro=hostPath:mountPoint
    assert binds == {
        SECRETS_DIR: {"hostPath": SECRETS_DIR, "isReadOnly": True},
        AGENT_SECRETS_DIR: {"hostPath": AGENT_SECRETS_DIR, "isReadOnly": True},
    }
    inner = container_config(out, "olaf")
    assert isinstance(inner, dict)
    assert inner["services"]["k3s"]["tokenFile"] == TOKEN_FILE
    admin = inner["users"]["users"]["manfred"]
    assert admin["hashedPasswordFile"] == f"{SECRETS_DIR}/passwd-manfred"


# -- item 2: the server container's start timeout ---------------------------------------
# nixos-containers.nix: TimeoutStartSec = cfg.timeoutStartSec (default "1min") on a
# Type=notify unit run with --notify-ready=yes; k3s.service inside is Type=notify, with
# no start timeout of its own only from 25.11 (rancher/), so the container's config sets
# one for every release (test_k3s_service_in_the_server_container_has_no_start_timeout).


def test_server_container_waits_ten_minutes_for_k3s(out: Path) -> None:
    c = module_config(out, "k3s-server", "olaf", ".containers.k3s-server")
    assert isinstance(c, dict)
    assert c["timeoutStartSec"] == "10min"


# -- item 13: no pids limit on the agent ----------------------------------------------


def test_agent_has_no_pids_limit(out: Path) -> None:
    opts = agent_container(out)["extraOptions"]
    assert isinstance(opts, list)
    assert "--pids-limit=-1" in opts
    assert [o for o in opts if str(o).startswith("--pids-limit")] == ["--pids-limit=-1"]


# -- item 11: stable MACs ---------------------------------------------------------------


def test_host_and_agent_macs_are_derived_locally_administered_and_distinct() -> None:
    seen = set()
    for mac in (
        macs.host_macvlan_mac("olaf"),
        macs.host_macvlan_mac("ulf"),
        macs.agent_mac("olaf"),
        macs.vm_mac("test-vms", "olaf"),
    ):
        assert macs.is_locally_administered(mac)
        seen.add(mac)
    assert len(seen) == 4
    assert macs.host_macvlan_mac("olaf") == macs.derived_mac("mv-host", "olaf")
    assert macs.agent_mac("olaf-k3s-agent") == macs.derived_mac("k3s-agent", "olaf-k3s-agent")
    # pinned: a change of the derivation gives every host a new MAC (stale ARP once)
    assert macs.host_macvlan_mac("olaf") == "8e:34:7c:5f:3c:9b"


def test_host_macvlan_gets_its_mac(out: Path) -> None:
    # network-interfaces.nix: networking.interfaces.<n>.macAddress becomes a systemd .link
    # (MACAddress=, matched on OriginalName) applied by udev, scripted networking too
    for host in ("olaf", "ulrich"):
        mac = module_config(out, "base", host, ".networking.interfaces.mv-host.macAddress")
        assert mac == macs.host_macvlan_mac(host)


def test_agent_gets_its_mac(out: Path) -> None:
    opts = agent_container(out)["extraOptions"]
    assert isinstance(opts, list)
    assert f"--mac-address={macs.agent_mac('karl-k3s-agent')}" in opts


# -- item 14: nothing open on the host that no host process listens on -----------------


def test_host_firewall_opens_only_ssh(out: Path) -> None:
    base = module_config(out, "base", "olaf", ".networking.firewall")
    assert base == {"enable": True, "allowedTCPPorts": [22]}
    common = nix_eval(f"import {out}/modules/k3s-common.nix {{ lib = import {LIB_STUB}; }}")
    assert isinstance(common, dict)
    # it opens nothing: its only setting is the agent token's directory
    assert common.get("config") == {
        "systemd": {"tmpfiles": {"rules": [f"d {AGENT_SECRETS_DIR} 0700 root root -"]}}
    }
    # the server's own ports are opened inside its network namespace
    inner = container_config(out, "olaf", ".networking.firewall")
    assert inner == {"enable": True, "allowedTCPPorts": [22, 6443, 2379, 2380]}


def test_no_host_ip_forward(out: Path) -> None:
    agent = module_config(out, "k3s-agent", "karl", ".boot")
    assert agent == {"kernelModules": ["overlay", "br_netfilter"]}


def test_systemd_boot_generations_fit_the_esp(out: Path) -> None:
    limit = module_config(out, "base", "olaf", ".boot.loader.systemd-boot.configurationLimit")
    assert limit == 6


# -- item 12: the podman network follows the plans --------------------------------------
# Real podman (Debian's, with netavark) on configuration files in a temporary directory,
# inside a network namespace of its own with veth stand-ins for the NICs: `podman network
# create/inspect/rm` only write and read those files, no container runs.


def _podman_prefix(tmp: Path, runroot: Path) -> Path:
    """A directory with bin/podman: the real podman, on private storage and network files.

    ``runroot`` must be a short path (podman refuses one longer than 50 characters).
    """
    conf = tmp / "containers.conf"
    conf.write_text(
        "[network]\n"
        'network_backend = "netavark"\n'
        f'network_config_dir = "{tmp}/networks"\n'
        "[engine]\n"
        'events_logger = "file"\n'
        'cgroup_manager = "cgroupfs"\n'
    )
    (tmp / "networks").mkdir()
    bin_dir = tmp / "pkg" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "podman"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'CONTAINERS_CONF={tmp}/containers.conf exec /usr/bin/podman --root={tmp}/root'
        f' --runroot={runroot} "$@"\n'
    )
    wrapper.chmod(0o755)
    return tmp / "pkg"


def _in_netns(script: str, nics: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    links = "".join(f"ip link add {n} type veth peer name {n}p\n" for n in nics)
    return subprocess.run(
        ["unshare", "--net", "bash", "-e", "-c", links + script],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def _network(podman: Path) -> dict[str, str]:
    fmt = '{{.ID}}|{{index .Labels "k3scluster.spec"}}|{{.NetworkInterface}}|{{range .Subnets}}{{.Subnet}} {{.Gateway}}{{end}}'
    proc = subprocess.run(
        [str(podman / "bin" / "podman"), "network", "inspect", "--format", fmt, "k3s-macvlan"],
        capture_output=True,
        text=True,
        check=True,
    )
    ident, label, parent, subnet = proc.stdout.strip().split("|")
    return {"id": ident, "label": label, "parent": parent, "subnet": subnet}


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/podman").exists() or shutil.which("unshare") is None,
    reason="needs root (a network namespace) and podman (scripts/setup installs it)",
)
def test_podman_network_is_recreated_when_the_plan_changes(
    example_dir: Path, tmp_path: Path
) -> None:
    runroot = Path(tempfile.mkdtemp(prefix="k3sp-", dir="/tmp"))
    try:
        _podman_network_follows_the_plans(example_dir, _podman_prefix(tmp_path, runroot))
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def _podman_network_follows_the_plans(example_dir: Path, podman: Path) -> None:
    out = example_dir / ".k3scluster" / "render"
    nics = ("eni1", "eno9")

    def pre_start() -> str:
        render_to_dir(load(example_dir), out)
        script = module_config(
            out, "k3s-agent", "karl", ".systemd.services.podman-k3s-agent.preStart", str(podman)
        )
        assert isinstance(script, str)
        proc = _in_netns(script, nics)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    pre_start()
    first = _network(podman)
    assert first["label"] == "10.0.100.0/24,10.0.100.1,eni1"
    assert (first["parent"], first["subnet"]) == ("eni1", "10.0.100.0/24 10.0.100.1")
    # unchanged plans: the network stays (same ID)
    assert "recreating" not in pre_start()
    assert _network(podman) == first
    # another gateway
    net = example_dir / "plans" / "network.yaml"
    net.write_text(net.read_text().replace("gateway: 10.0.100.1", "gateway: 10.0.100.254"))
    assert "recreating" in pre_start()
    second = _network(podman)
    assert second["id"] != first["id"]
    assert second["subnet"] == "10.0.100.0/24 10.0.100.254"
    # another NIC
    hosts = example_dir / "plans" / "hosts.csv"
    hosts.write_text(hosts.read_text().replace("karl,eni1,", "karl,eno9,"))
    assert "recreating" in pre_start()
    third = _network(podman)
    assert third["parent"] == "eno9" and third["label"] == "10.0.100.0/24,10.0.100.254,eno9"
    # another subnet (a /16 around the same addresses)
    net.write_text(net.read_text().replace("netmask: 24", "netmask: 16"))
    assert "recreating" in pre_start()
    assert _network(podman)["subnet"] == "10.0.0.0/16 10.0.100.254"
    # a network made before k3scluster labelled them is made again, once
    proc = _in_netns(
        f"{podman}/bin/podman network rm -f k3s-macvlan\n"
        f"{podman}/bin/podman network create --driver=macvlan --subnet=10.0.0.0/16"
        f" --gateway=10.0.100.254 -o parent=eno9 k3s-macvlan\n",
        nics,
    )
    assert proc.returncode == 0, proc.stderr
    assert _network(podman)["label"] == ""
    assert "recreating" in pre_start()
    assert _network(podman)["label"] == "10.0.0.0/16,10.0.100.254,eno9"
    assert "recreating" not in pre_start()


# -- item 6: stateVersion is recorded, never follows nixos ------------------------------
# nixos/modules/misc/version.nix: system.stateVersion is the release first installed;
# the containers get the host's (nixos-containers.nix evaluates their config separately).


def _state_versions(out: Path, host: str) -> tuple[object, object]:
    hostv = module_config(out, "base", host, ".system.stateVersion")
    if host in ("olaf", "ulf", "rolf"):
        return hostv, container_config(out, host, ".system.stateVersion")
    return hostv, None


def _set_network(example_dir: Path, old: str, new: str) -> None:
    net = example_dir / "plans" / "network.yaml"
    text = net.read_text()
    assert old in text
    net.write_text(text.replace(old, new))


def test_changing_nixos_leaves_the_state_version_alone(example_dir: Path) -> None:
    out = example_dir / ".k3scluster" / "render"
    _set_network(example_dir, 'stateVersion: "25.05"', 'stateVersion: "24.11"')
    render_to_dir(load(example_dir), out)
    before = {h: _state_versions(out, h) for h in ("olaf", "karl")}
    assert before == {"olaf": ("24.11", "24.11"), "karl": ("24.11", None)}
    _set_network(example_dir, 'nixos: "26.05"', 'nixos: "24.11"')
    _set_network(example_dir, 'k3s: "1.35"', 'k3s: "1.31"')  # 24.11 cannot have 1.35
    cluster = load(example_dir)
    assert cluster.network.nixos_release == "24.11"
    render_to_dir(cluster, out)
    assert {h: _state_versions(out, h) for h in ("olaf", "karl")} == before


def test_a_plan_without_state_version_keeps_the_default(example_dir: Path) -> None:
    out = example_dir / ".k3scluster" / "render"
    _set_network(example_dir, 'stateVersion: "25.05"\n', "")
    _set_network(example_dir, 'nixos: "26.05"', 'nixos: "24.11"')
    _set_network(example_dir, 'k3s: "1.35"', 'k3s: "1.31"')  # 24.11 cannot have 1.35
    result = plans.load(example_dir)
    assert result.cluster is not None
    render_to_dir(result.cluster, out)
    assert _state_versions(out, "olaf") == ("25.05", "25.05")
    assert warnings(result) == [("state-version-missing", 8)]


def test_a_host_column_overrides_the_state_version(example_dir: Path) -> None:
    hosts = example_dir / "plans" / "hosts.csv"
    lines = hosts.read_text().splitlines()
    lines[0] += ",stateVersion"
    lines = [lines[0]] + [line + (",23.11" if line.startswith("karl,") else ",") for line in lines[1:]]
    hosts.write_text("\n".join(lines) + "\n")
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(load(example_dir), out)
    assert _state_versions(out, "karl") == ("23.11", None)
    assert _state_versions(out, "olaf") == ("25.05", "25.05")


# -- item 4: eth<N> interfaces ------------------------------------------------------------
# network-interfaces.nix: usePredictableInterfaceNames (default true) adds net.ifnames=0
# to the kernel command line when false.


def test_an_eth_interface_turns_predictable_names_off(example_dir: Path) -> None:
    hosts = example_dir / "plans" / "hosts.csv"
    hosts.write_text(hosts.read_text().replace("karl,eni1,", "karl,eth0,"))
    result = plans.load(example_dir)
    assert result.cluster is not None
    assert warnings(result) == [("interface-eth", 5)]
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(result.cluster, out)
    got = nix_eval(
        f"let h = import {out}/hosts/{{name}}.nix {host_args()}; in"
        " h.networking.usePredictableInterfaceNames or null".replace("{name}", "karl")
    )
    assert got is False
    other = nix_eval(
        f"(import {out}/hosts/olaf.nix {host_args()}).networking.usePredictableInterfaceNames"
        " or null"
    )
    assert other is None


# -- item 3: the platform -----------------------------------------------------------------
# nixos/modules/misc/nixpkgs.nix: hostPlatform (str or attrs, lib.systems.elaborate).


def test_platform_defaults_to_x86_64_and_a_column_overrides_it(example_dir: Path) -> None:
    out = example_dir / ".k3scluster" / "render"
    render_to_dir(load(example_dir), out)
    default = module_config(out, "base", "olaf", ".nixpkgs.hostPlatform")
    assert default == "x86_64-linux"
    raw = nix_eval(
        module_expr(out, "base", "olaf") + "m.config.nixpkgs.hostPlatform.priority"
    )
    assert raw == 1000  # mkDefault: a hardware configuration's own value may win
    hosts = example_dir / "plans" / "hosts.csv"
    lines = hosts.read_text().splitlines()
    lines = [lines[0] + ",platform"] + [
        line + (",aarch64-linux" if line.startswith("karl,") else ",") for line in lines[1:]
    ]
    hosts.write_text("\n".join(lines) + "\n")
    render_to_dir(load(example_dir), out)
    assert module_config(out, "base", "karl", ".nixpkgs.hostPlatform") == "aarch64-linux"
    assert module_config(out, "base", "olaf", ".nixpkgs.hostPlatform") == "x86_64-linux"


# -- review of 22:44 (issue 13), item 3: no start timeout for k3s.service ---------------
# services/cluster/k3s/default.nix (24.11, 25.05; read at index id 149520763) sets no
# TimeoutStartSec on k3s.service (Type=notify, Restart=always): systemd's default 90s
# killed a server that waits longer for etcd. services/cluster/rancher/default.nix
# (25.11+, 011c1bdb) sets TimeoutStartSec = 0 at normal priority, and unitOption merges
# with filterOverrides + mergeEqualOption (nixos/lib/systemd-unit-options.nix): a plain
# "infinity" would conflict with that 0, mkForce (priority 50) replaces it.


def test_k3s_service_in_the_server_container_has_no_start_timeout(out: Path) -> None:
    for host in ("olaf", "ulf", "rolf"):
        timeout = container_config(out, host, ".systemd.services.k3s.serviceConfig")
        assert timeout == {"TimeoutStartSec": "infinity"}
    priority = nix_eval(
        module_expr(out, "k3s-server", "olaf")
        + "(m.config.containers.k3s-server.config { inherit lib pkgs; })"
        ".systemd.services.k3s.serviceConfig.TimeoutStartSec.priority"
    )
    assert isinstance(priority, int) and priority < 100  # beats rancher's plain definition


# -- item 5: root can enter the console's emergency shell --------------------------------
# users-groups.nix: hashedPasswordFile is read on each activation by
# update-users-groups.pl (03fa53d2), which only warns when the file does not exist yet
# (root then stays "!", locked, as before); with mutableUsers = false /etc/shadow gets the
# file's hash on every activation.


def test_root_gets_the_admins_password_hash_file(out: Path) -> None:
    keys = nix_eval(f"(import {out}/hive.nix).olaf.deployment.keys")
    assert isinstance(keys, dict)
    key = keys["passwd-manfred"]
    uploaded = f"{key['destDir']}/passwd-manfred"  # colmena options.nix: destDir/name
    root = module_config(out, "base", "olaf", ".users.users.root")
    assert isinstance(root, dict)
    assert set(root) == {"openssh", "hashedPasswordFile"}
    assert root["hashedPasswordFile"] == uploaded
    admin = module_config(out, "base", "olaf", ".users.users.manfred.hashedPasswordFile")
    assert admin == uploaded
    assert module_config(out, "base", "olaf", ".users.mutableUsers") is False


def test_without_a_password_file_root_gets_none(out: Path) -> None:
    # `check` wants a hash for every host (rule passwd-missing); the module's option
    # still allows none, and then neither user gets a file
    expr = module_expr(out, "base", "olaf").replace(
        "k3scluster = hostFile.k3scluster;",
        "k3scluster = hostFile.k3scluster // { host = hostFile.k3scluster.host"
        " // { passwordFile = null; }; };",
    )
    assert "passwordFile = null" in expr
    users = nix_eval(expr + "unwrap m.config.users.users")
    assert isinstance(users, dict)
    assert set(users["root"]) == {"openssh"}
    assert "hashedPasswordFile" not in users["manfred"]


# -- item 7: the server container's MAC ------------------------------------------------
# nixos/modules/system/boot/networkd.nix: a .network's linkConfig is its [Link] section,
# MACAddress allowed (sectionLink, assertMacAddress); networkd sets it on the matched
# link. A .link file would need udev, which does not run inside systemd-nspawn.


def test_server_container_gets_a_derived_mac(out: Path) -> None:
    for host, node in (("olaf", "olaf-k3s-server"), ("ulf", "ulf-k3s-server")):
        net = container_config(out, host, '.systemd.network.networks."10-k3scluster"')
        assert isinstance(net, dict)
        assert net["matchConfig"] == {"Name": "mv-*"}
        assert net["linkConfig"] == {"MACAddress": macs.server_mac(node)}
    mac = macs.server_mac("olaf-k3s-server")
    assert macs.is_locally_administered(mac)
    assert mac == macs.derived_mac("k3s-server", "olaf-k3s-server")
    others = {macs.host_macvlan_mac("olaf"), macs.agent_mac("olaf-k3s-agent")}
    assert mac not in others and macs.server_mac("ulf-k3s-server") != mac


# -- item 8: the agent's kubelet, CNI and log state outlive the container ----------------
# k3s-io/k3s package/Dockerfile (09ffe1ba): VOLUME /var/lib/kubelet /var/lib/rancher/k3s
# /var/lib/cni /var/log. oci-containers.nix runs `podman run --rm`, which deletes the
# anonymous volumes podman makes for every VOLUME without a bind.

IMAGE_VOLUMES = ("/var/lib/kubelet", "/var/lib/rancher/k3s", "/var/lib/cni", "/var/log")


def test_every_image_volume_is_bound_to_a_state_directory(out: Path) -> None:
    volumes = agent_container(out)["volumes"]
    assert isinstance(volumes, list)
    binds = {}
    for v in volumes:
        src, dst, *opts = str(v).split(":")
        binds[dst] = (src, opts)
    rules = module_config(out, "k3s-agent", "karl", ".systemd.tmpfiles.rules")
    assert isinstance(rules, list)
    made = {str(r).split()[1] for r in rules if str(r).startswith("d ")}
    for dst in IMAGE_VOLUMES:
        assert dst in binds, dst
        src, opts = binds[dst]
        assert src.startswith("/var/lib/k3scluster/agent/") and src in made
        assert opts == []  # podman's default propagation (rprivate), read-write
    assert binds["/var/lib/kubelet"][0] == "/var/lib/k3scluster/agent/kubelet"


# -- item 11: store garbage collection ---------------------------------------------------
# nixos/modules/services/misc/nix-gc.nix: automatic, dates (calendar event), options
# (nix-collect-garbage arguments); nix-optimise.nix: automatic.


def test_the_store_is_collected_weekly_by_default(out: Path) -> None:
    nix = module_config(out, "base", "ulrich", ".nix")
    assert nix == {
        "gc": {"automatic": True, "dates": "weekly", "options": "--delete-older-than 30d"},
        "optimise": {"automatic": True},
    }
    priorities = nix_eval(
        module_expr(out, "base", "ulrich")
        + "map (v: v.priority) [ m.config.nix.gc.automatic m.config.nix.gc.dates"
        " m.config.nix.gc.options m.config.nix.optimise.automatic ]"
    )
    assert priorities == [1000] * 4  # mkDefault: nixConfigs/<host>.nix may override


# -- item 5 (also): /boot does not stop the boot ----------------------------------------
# nixos/modules/tasks/filesystems.nix: fileSystems.<n>.options is a list (definitions
# are concatenated); device and fsType single values. A whole-entry mkDefault would be
# dropped entirely by a hardware configuration's /boot (attrsOf submodule filters the
# entry's definitions by priority), so only device and fsType are defaults.


def test_boot_partition_is_nofail_and_survives_a_hardware_configuration(out: Path) -> None:
    boot = module_config(out, "base", "olaf", '.fileSystems."/boot"')
    assert boot == {
        "device": "/dev/disk/by-label/boot",
        "fsType": "vfat",
        "options": ["fmask=0077", "dmask=0077", "nofail", "x-systemd.device-timeout=10s"],
    }
    raw = nix_eval(
        module_expr(out, "base", "olaf")
        + 'let b = m.config.fileSystems."/boot"; in'
        " [ b._type b.content.device.priority b.content.fsType.priority"
        " (b.content.options.priority or 100) ]"
    )
    assert raw == ["if", 1000, 1000, 100]
    # BIOS hosts have no ESP
    rolf = module_config(out, "base", "rolf", '.fileSystems."/boot"')
    assert rolf == {"_k3sclusterUnset": True}


# -- issue 16: etcdctl in the server container (k3scluster/etcdmembers.py runs it) ------------


def test_server_container_has_etcdctl(out: Path) -> None:
    for host in ("olaf", "ulf", "rolf"):
        assert container_config(out, host, ".environment.systemPackages") == ["/stand-in/etcd"]
