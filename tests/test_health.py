"""Health gates, the rolling order, the kubeconfig and drift, with the real engine.

``pulumi up`` / ``refresh`` of a copy of the example cluster (runner ``python``) run in the
engine's own namespaces (tests/engine.py ``setup``): a network namespace with nothing but
loopback, on which the five host addresses and the three K3s server addresses live. Each
host has a real ``sshd`` of its own, in a mount namespace of its own, where ``/run`` holds
the host's ``current-system`` link (the test repoints it to show drift) and
``/var/lib/nixos-containers/k3s-server/etc/rancher/k3s/k3s.yaml`` the admin kubeconfig a
K3s server writes (server hosts only). The K3s API is the stand-in ``tests/k3sapi.py``
(HTTPS, a throwaway CA, client certificates required) listening on the server addresses; the
gates use the real ``kubernetes`` client. colmena is the stand-in ``tests/bin/colmena``.
Every key and certificate is made here for this test; no packet leaves the machine.
"""

from __future__ import annotations

import base64
import json
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import k3sapi
import pytest
from engine import engine_dirs, netns_available, require_engine, run_pulumi

from k3scluster import agentmembers, etcdmembers, kube

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "bin" / "colmena"
SSHD = Path("/usr/sbin/sshd")
STACK = "gates"
HOSTS = {"olaf": "10.0.100.2", "ulf": "10.0.100.3", "rolf": "10.0.100.4", "karl": "10.0.100.5",
         "ulrich": "10.0.100.6"}
SERVERS = {"olaf": ("olaf-k3s-server", "10.0.100.10"), "ulf": ("ulf-k3s-server", "10.0.100.12"),
           "rolf": ("rolf-k3s-server", "10.0.100.14")}
AGENTS = {"olaf": "olaf-k3s-agent", "ulf": "ulf-k3s-agent", "karl": "karl-k3s-agent"}
CHAIN = ["olaf", "ulf", "rolf"]  # the init-server's host first, then hosts.csv order


def system_path(host: str, n: int = 0) -> str:
    digest = f"{host}{n}".encode().hex().ljust(32, "0")[:32]
    return f"/nix/store/{digest}-nixos-system-{host}-25.05.20260102.ac62194"


def system_dir(base: Path, name: str, kernel: str) -> Path:
    """A stand-in NixOS system directory: kernel and initrd links, kernel-params (the
    booted and current systems of the reboot and status tests)."""
    d = base / name
    d.mkdir()
    for f, target in (("kernel", kernel), ("initrd", "initrd-1")):
        (base / target).touch()
        (d / f).symlink_to(base / target)
    (d / "kernel-params").write_text("init=/nix/store/x/init loglevel=4")
    return d


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


class Lab:
    """Five hosts' sshd and the K3s API stand-in, prepared in tmp; started by ``setup``."""

    def __init__(self, base: Path, extra_agent_hosts: dict[str, str] | None = None) -> None:
        self.dir = base / "lab"
        # the example's hosts and the agent-only hosts a test adds to its plans (name -> address)
        extra = extra_agent_hosts or {}
        self.ips = {**HOSTS, **extra}
        self.dir.mkdir(mode=0o700)
        self.client_key = self.dir / "id_test"
        self.known_hosts = self.dir / "known_hosts"
        self.host_key = self.dir / "host_key"
        _keygen(self.host_key, "k3scluster-test-host-key")
        _keygen(self.client_key, "k3scluster-test-client-key")
        self.authorized = self.dir / "authorized_keys"
        shutil.copy(self.client_key.with_suffix(".pub"), self.authorized)
        self.home = self.dir / "root-home"
        self.home.mkdir(mode=0o700)
        self.etc = self.dir / "etc"
        shutil.copytree("/etc", self.etc, symlinks=True,
                        ignore=shutil.ignore_patterns("ssh_host_*"), ignore_dangling_symlinks=True)
        passwd = self.etc / "passwd"
        lines = passwd.read_text().splitlines(keepends=True)
        out = []
        for ln in lines:
            if ln.startswith("root:"):
                f = ln.rstrip("\n").split(":")
                f[5] = str(self.home)
                ln = ":".join(f) + "\n"
            out.append(ln)
        passwd.write_text("".join(out))
        # the K3s PKI and the admin kubeconfig every server host holds
        self.pki = self.dir / "pki"
        k3sapi.make_pki(self.pki, [ip for _, ip in SERVERS.values()])
        self.k3s_yaml = k3sapi.k3s_yaml(self.pki)
        self.api_script = self.dir / "api-script.json"
        self.api_log = self.dir / "api-log.jsonl"
        # node -> the file its host's boot ids come from (tests/k3sapi.py bootIDs)
        self.boot_ids: dict[str, str] = {}
        self.set_api(readyz={ip: ["200"] for _, ip in SERVERS.values()},
                     nodes={n: ["True"] for n in AGENTS.values()})
        self.hosts: dict[str, Path] = {}
        # more of a host's directories bound over its own (tests/test_rollback_engine.py)
        self.binds: dict[str, list[tuple[Path, str]]] = {}
        for host, ip in self.ips.items():
            h = self.dir / host
            (h / "run" / "sshd").mkdir(parents=True)
            (h / "run" / "sshd").chmod(0o755)
            (h / "run" / "current-system").symlink_to(system_path(host))
            var_lib = h / "var-lib"
            var_lib.mkdir()
            if host in AGENTS or host in extra:  # a running agent keeps its node password (a host reinstalled
                # loses it: the deploy's clean-up, k3scluster/agentmembers.py, then looks at
                # its old Node, which the API here shows Ready, and refuses)
                pw = var_lib / agentmembers.NODE_PASSWORD_FILE.removeprefix("/var/lib/")
                pw.parent.mkdir(parents=True)
                pw.write_text("stand-in node password\n")
                pw.chmod(0o600)
            if host in SERVERS:
                # a running server keeps its etcd data (a host reinstalled loses it: the
                # deploy then looks for a stale member and, when no server answers on a
                # stack that deployed others, refuses: tasks._before_deploy)
                wal = var_lib / (etcdmembers.CONTAINER_ROOT + etcdmembers.K3S_DB).removeprefix(
                    "/var/lib/") / "etcd" / "member" / "wal"
                wal.mkdir(parents=True)
                kc = var_lib / kube.KUBECONFIG_ON_HOST.removeprefix("/var/lib/")
                kc.parent.mkdir(parents=True)
                kc.write_text(self.k3s_yaml)
                kc.chmod(0o600)
            (h / "sshd_config").write_text(
                f"ListenAddress {ip}\nPort 22\nHostKey {self.host_key}\n"
                f"PidFile {h / 'sshd.pid'}\nAuthorizedKeysFile {self.authorized}\n"
                "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                "StrictModes no\nLogLevel VERBOSE\n"
            )
            self.hosts[host] = h

    def set_api(self, *, readyz: dict[str, list[str]], nodes: dict[str, list[str]]) -> None:
        self.api_script.write_text(json.dumps({"readyz": readyz, "nodes": nodes,
                                               "bootIDs": self.boot_ids}))

    def repoint(self, host: str, target: str) -> None:
        link = self.hosts[host] / "run" / "current-system"
        link.unlink()
        link.symlink_to(target)

    def api_requests(self) -> list[dict[str, Any]]:
        if not self.api_log.exists():
            return []
        return [json.loads(ln) for ln in self.api_log.read_text().splitlines()]

    def api_start(self, ready: Path) -> str:
        """The shell line that starts the K3s API at the server addresses in the background
        (it writes ``ready`` once it listens): here the stand-in tests/k3sapi.py."""
        q = shlex.quote
        return (f"{q(sys.executable)} {q(str(ROOT / 'tests' / 'k3sapi.py'))} "
                f"--script {q(str(self.api_script))} --log {q(str(self.api_log))} "
                f"--pki {q(str(self.pki))} "
                + " ".join(f"--listen {ip}" for _, ip in SERVERS.values())
                + f" --ready-file {q(str(ready))} &")

    def setup(self, down: tuple[str, ...] = ()) -> str:
        q = shlex.quote
        ready = self.dir / "api.ready"
        lines = [*(f"ip addr add {ip}/32 dev lo" for ip in self.ips.values()),
                 *(f"ip addr add {ip}/32 dev lo" for _, ip in SERVERS.values()),
                 f"mount --bind {q(str(self.etc))} /etc",
                 f"rm -f {q(str(ready))}",
                 self.api_start(ready)]
        for host, h in self.hosts.items():
            pid = h / "sshd.pid"
            lines.append(f"rm -f {q(str(pid))}")
            if host in down:
                continue
            inner = (f"mount --bind {q(str(h / 'run'))} /run && "
                     f"mount --bind {q(str(h / 'var-lib'))} /var/lib && "
                     + "".join(f"mount --bind {q(str(src))} {q(dst)} && "
                               for src, dst in self.binds.get(host, []))
                     + f"exec {SSHD} -D -f {q(str(h / 'sshd_config'))} -E {q(str(h / 'sshd.log'))}")
            lines.append(f"unshare --mount --propagation private sh -c {q(inner)} &")
        waits = [self.hosts[h] / "sshd.pid" for h in self.hosts if h not in down] + [ready]
        for w in waits:
            lines += [(f"n=0; while [ ! -s {q(str(w))} ]; do n=$((n+1)); "
                      f"[ $n -gt 400 ] && {{ echo 'not started: {w.name}' >&2; exit 97; }}; "
                      "sleep 0.05; done")]
        return "\n".join(lines)

    def sshd_logs(self) -> str:
        return "\n".join(
            f"--- {h} ---\n" + ((d / "sshd.log").read_text(errors="replace")
                               if (d / "sshd.log").exists() else "(none)")
            for h, d in self.hosts.items()
        )


class Project:
    def __init__(self, base: Path, lab: Lab, **config: str) -> None:
        self.lab = lab
        self.dir = base / "project"
        self.cluster = base / "cluster"
        self.log = base / "colmena.log"
        self.dir.mkdir()
        shutil.copy(ROOT / "Pulumi.yaml", self.dir)
        shutil.copy(ROOT / "__main__.py", self.dir)
        (self.dir / "k3scluster").symlink_to(ROOT / "k3scluster")
        shutil.copytree(ROOT / "examples" / "cluster", self.cluster,
                        ignore=shutil.ignore_patterns(".k3scluster"))
        for f in ("token", "passwd"):
            (self.cluster / "secrets" / f).chmod(0o600)
        for h in lab.ips:
            hw = self.cluster / "nixConfigs" / f"{h}.hardware.nix"
            if not hw.exists():
                hw.write_text("{ ... }: { }\n")
        self.render_dir = self.cluster / ".k3scluster" / STACK
        settings = {
            "clusterDir": str(self.cluster),
            "colmena": str(STANDIN),
            "runner": "python",
            "sshIdentity": str(lab.client_key),
            "sshKnownHosts": str(lab.known_hosts),
            "readyTimeout": "60s",
            # no K3s to snapshot behind these hosts (tests/test_snapshot_engine.py has one)
            "snapshotBeforeServers": "false",
            # these hosts' systems are names only (tests/test_rollback*.py have systems to go
            # back to)
            "rollback": "false",
            "confirmTimeout": "0",
            **config,
        }
        (self.dir / f"Pulumi.{STACK}.yaml").write_text(
            "config:\n" + "".join(f"  k3scluster:{k}: {json.dumps(v)}\n" for k, v in settings.items())
        )
        r = run_pulumi(["stack", "init", STACK, "--non-interactive"], cwd=self.dir)
        assert r.returncode == 0, r.stderr

    def pulumi(self, *args: str, down: tuple[str, ...] = (), teardown: str = ":",
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_pulumi(
            [*args, "--non-interactive", "--stack", STACK],
            cwd=self.dir,
            env={"COLMENA_LOG": str(self.log), **(env or {})},
            setup=self.lab.setup(down),
            teardown=teardown,
        )

    def up(self, *extra: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.pulumi("up", "--yes", "--skip-preview", *extra, **kw)

    def preview(self) -> dict[str, str]:
        r = self.pulumi("preview", "--json")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return {s["urn"].split("::")[-1]: s["op"] for s in json.loads(r.stdout)["steps"]
                if s["op"] != "same"}

    def colmena_calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(ln) for ln in self.log.read_text().splitlines()]

    def deployed(self) -> list[str]:
        """The hosts switched, in order (a host with an agent is first asked, with a dry
        activation, whether the switch would restart it: k3scluster.drain)."""
        return [c["hosts"][0] for c in self.colmena_calls() if c["argv"][1] == "switch"]

    def outputs(self, *extra: str) -> dict[str, Any]:
        r = run_pulumi(["stack", "output", "--json", "--stack", STACK, *extra], cwd=self.dir)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def state_text(self) -> str:
        return engine_dirs(self.dir).stack_file("k3scluster", STACK).read_text()

    def step_state(self, name: str) -> dict[str, Any]:
        for r in json.loads(self.state_text())["checkpoint"]["latest"]["resources"]:
            if r["urn"].endswith("::" + name):
                return r  # type: ignore[no-any-return]
        raise KeyError(name)


def _text(r: subprocess.CompletedProcess[str]) -> str:
    return r.stdout + r.stderr


def new_lab(tmp_path: Path, extra_agent_hosts: dict[str, str] | None = None) -> Lab:
    """The lab of this module (a test is skipped where it cannot run); the engine tests of
    status, reboots and snapshots use it too."""
    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a loopback-only network namespace")
    if not SSHD.is_file() or not shutil.which("ssh") or not shutil.which("openssl"):
        pytest.skip("needs OpenSSH (ssh, /usr/sbin/sshd) and openssl")
    return Lab(tmp_path, extra_agent_hosts)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return new_lab(tmp_path)


def _first_200(lab: Lab, ip: str) -> float:
    return min(r["t"] for r in lab.api_requests() if r["addr"] == ip and r["status"] == 200
               and r["path"].startswith("/readyz"))


@pytest.mark.integration
@pytest.mark.root
def test_up_rolls_server_hosts_through_their_gates_and_writes_the_kubeconfig(lab: Lab,
                                                                             tmp_path: Path) -> None:
    # olaf's server is ready on the 2nd poll, ulf's on the 3rd; olaf's agent registers late
    lab.set_api(
        readyz={"10.0.100.10": ["503", "200"], "10.0.100.12": ["503", "503", "200"],
                "10.0.100.14": ["200"]},
        nodes={"olaf-k3s-agent": ["absent", "False", "True"], "ulf-k3s-agent": ["True"],
               "karl-k3s-agent": ["False", "True"]},
    )
    p = Project(tmp_path, lab)
    kubeconfig = p.render_dir / "kubeconfig"
    probe = tmp_path / "kubectl-readyz.txt"
    teardown = (f"kubectl --kubeconfig {kubeconfig} get --raw /readyz > {probe} 2>&1 || true"
                if shutil.which("kubectl") else ":")
    r = p.up(teardown=teardown)
    assert r.returncode == 0, _text(r)[-6000:] + lab.sshd_logs()[-3000:]

    # the order: each server host starts after the one before it passed /readyz, the rest
    # after the last server host
    calls = {c["hosts"][0]: c for c in p.colmena_calls() if c["argv"][1] == "switch"}
    assert sorted(calls) == sorted(HOSTS)
    assert p.deployed()[:3] == CHAIN
    assert calls["ulf"]["start"] > _first_200(lab, "10.0.100.10")
    assert calls["rolf"]["start"] > _first_200(lab, "10.0.100.12")
    for h in ("karl", "ulrich"):
        assert calls[h]["start"] > _first_200(lab, "10.0.100.14")
    # every gate used the cluster's credentials (the stand-in requires the client cert)
    assert {q["cn"] for q in lab.api_requests()} == {"system:admin"}
    # the agent gates asked the API (the init-server's address) for their node (the agent
    # hosts keep their node password: no reinstall clean-up asks)
    nodes = [q for q in lab.api_requests() if q["path"].startswith("/api/v1/nodes/")]
    # (the gates' three, then one after them: whether an earlier run of the stack left its
    # cordon there, tasks._undo_own_cordon)
    assert [q["status"] for q in nodes if q["path"].endswith("/olaf-k3s-agent")] == [
        404, 200, 200, 200]
    assert {q["addr"] for q in nodes} == {"10.0.100.10"}
    # progress lines reached Pulumi's own output
    text = _text(r)
    assert "olaf: olaf-k3s-server: /readyz 503, etcd not ready (" in text
    assert "olaf: olaf-k3s-agent: node olaf-k3s-agent not registered yet (" in text

    # the kubeconfig: a 0600 file, pointed at the init-server, named after the stack
    assert stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600
    data = kube.parse_kubeconfig(kubeconfig.read_text(), str(kubeconfig))
    ca = base64.b64encode((lab.pki / "server-ca.crt").read_bytes()).decode()
    assert data["clusters"][0] == {"name": STACK, "cluster": {
        "certificate-authority-data": ca, "server": "https://10.0.100.10:6443"}}
    assert data["current-context"] == STACK
    # and a context of its own for each other server (kubectl while the init-server is down)
    assert data["clusters"][1:] == [
        {"name": f"{STACK}-{node}", "cluster": {"certificate-authority-data": ca, "server": url}}
        for node, url in [("ulf-k3s-server", "https://10.0.100.12:6443"),
                          ("rolf-k3s-server", "https://10.0.100.14:6443")]
    ]
    assert [c["name"] for c in data["contexts"]] == [c["name"] for c in data["clusters"]]
    assert data["users"][0]["name"] == STACK
    key_b64 = k3sapi.client_key_data(lab.pki)
    assert data["users"][0]["user"]["client-key-data"] == key_b64
    if shutil.which("kubectl"):  # the real kubectl with that file, inside the namespace
        assert probe.read_text().strip() == "ok" or "readyz check passed" in probe.read_text()
    # ... a secret stack output, and nowhere in the state in clear
    assert p.outputs()["kubeconfig"] == "[secret]"
    assert p.outputs("--show-secrets")["kubeconfig"] == kubeconfig.read_text()
    key_pem = (lab.pki / "client.key").read_text()
    key_body = "".join(key_pem.splitlines()[1:-1])
    state = p.state_text()
    for secret in (key_b64, key_body, key_b64[:40]):
        assert secret not in state
    assert key_b64 not in text and key_body not in text  # nor in the output

    # the outputs a user can act on
    hosts = p.outputs()["hosts"]
    assert hosts["rolf"]["system"] == system_path("rolf")
    assert hosts["rolf"]["health"] == "ready"
    assert hosts["ulrich"]["health"] == "no K3s"
    assert hosts["olaf"]["deployedAt"].endswith("Z")
    assert hosts["olaf"]["ip"] == "10.0.100.2" and hosts["olaf"]["roles"] == ["init-server", "agent"]
    assert p.outputs()["apiEndpoint"] == "https://10.0.100.10:6443"

    # a render replaces its directory, but keeps the kubeconfig
    (p.cluster / "nixConfigs" / "ulrich.nix").write_text("{ ... }: { }\n# changed\n")
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]
    assert p.deployed()[5:] == ["ulrich"]
    assert kubeconfig.is_file() and stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600


# A server that never becomes ready stops the chain only, and the next up joins it again:
# test_membership_engine.py's test_a_server_whose_gate_failed_stops_the_chain_and_joins_again
# (its join steps read etcd's members, so it runs with three real etcd members).


@pytest.mark.integration
@pytest.mark.root
def test_refresh_shows_drift_and_the_next_up_redeploys_that_host(lab: Lab,
                                                                 tmp_path: Path) -> None:
    p = Project(tmp_path, lab)
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:] + lab.sshd_logs()[-2000:]
    karl_before = p.step_state("karl-deploy")["outputs"]
    # someone ran nixos-rebuild on rolf; karl is off
    lab.repoint("rolf", system_path("rolf", 1))
    r = p.pulumi("refresh", "--yes", down=("karl",))
    assert r.returncode == 0, _text(r)[-4000:]
    text = _text(r)
    assert f"rolf runs {system_path('rolf', 1)}, but its last deploy activated " \
           f"{system_path('rolf')}" in text
    assert "karl: not reachable during refresh" in text and "kept as it was" in text
    assert p.step_state("karl-deploy")["outputs"] == karl_before
    assert p.step_state("rolf-deploy")["outputs"]["observed"]["system"] == system_path("rolf", 1)
    # the next up redeploys exactly rolf
    assert p.preview() == {"rolf-deploy": "update"}
    r = p.up()
    assert r.returncode == 0, _text(r)[-4000:]
    assert p.deployed()[5:] == ["rolf"]
    assert "drift" not in p.step_state("rolf-deploy")["outputs"]
    assert p.preview() == {}
