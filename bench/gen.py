"""Synthetic cluster directories for the benchmarks — BENCHMARK DATA, never a real cluster.

``make_cluster(root, n)`` writes a cluster of ``n`` hosts in 10.64.0.0/10: every host runs a
K3s agent, the first three hosts also run the servers (host 0 the init-server, hosts 1 and 2
servers). Every host has ``nixConfigs/<host>.nix`` and ``nixConfigs/<host>.hardware.nix`` (so
no step would read a hardware configuration over ssh). The secrets are valid but throw-away:
an ssh key pair made with ``ssh-keygen`` (the private half deleted at once), a crypt hash of a
random password from ``openssl passwd -6`` and a random K3s token, each marked as benchmark
data. Nothing here is ever contacted: the benchmarks run inside ``unshare -n``.

    python bench/gen.py DIR N      # one cluster directory, for a look or a profile
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from k3scluster.pins import NEWEST_NIXOS_RELEASE, NIXPKGS_PINS

SUBNET = ipaddress.ip_network("10.64.0.0/10")
GATEWAY = SUBNET.network_address + 1
MARK = "BENCHMARK-DATA-k3scluster (synthetic, never a real cluster)"


def host_name(i: int) -> str:
    return f"h{i:04d}"


def _ips(i: int) -> tuple[str, str, str]:
    """host, agent, server addresses of host ``i``: 4 addresses per host from 10.64.1.0."""
    base = SUBNET.network_address + 256 + 4 * i
    return str(base), str(base + 1), str(base + 2)


def _ssh_public_key() -> str:
    with tempfile.TemporaryDirectory(prefix="k3s-bench-key-") as d:
        key = Path(d) / "key"
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                MARK.split(" ")[0],
                "-f",
                str(key),
            ],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        key.unlink()  # the private half is never used
        return (Path(d) / "key.pub").read_text().strip()


def _passwd_hash() -> str:
    # the password goes through stdin, never argv
    r = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=secrets.token_urlsafe(18) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.strip()


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def make_cluster(root: Path, n: int) -> Path:
    """Writes a synthetic cluster of ``n`` hosts into ``root`` (created); returns ``root``."""
    if n < 1:
        raise ValueError("n must be at least 1")
    root = Path(root)
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    hosts = ["name,interface,ip,admin,disk,boot,location"]
    k3s = ["host,name,type,ip"]
    for i in range(n):
        name = host_name(i)
        ip, agent_ip, server_ip = _ips(i)
        hosts.append(f"{name},eno1,{ip},bench,,efi,rack-{i // 40}")
        if i < 3:
            kind = "init-server" if i == 0 else "server"
            k3s.append(f"{name},{name}-server,{kind},{server_ip}")
        k3s.append(f"{name},{name}-agent,agent,{agent_ip}")
        _write(
            root / "nixConfigs" / f"{name}.nix",
            f"# {MARK}\n{{ pkgs, ... }}: {{\n  environment.systemPackages = [ pkgs.htop ];\n}}\n",
        )
        _write(root / "nixConfigs" / f"{name}.hardware.nix", f"# {MARK}\n{{ ... }}: {{ }}\n")
    _write(root / "plans" / "hosts.csv", f"# {MARK}\n" + "\n".join(hosts) + "\n")
    _write(root / "plans" / "k3s.csv", f"# {MARK}\n" + "\n".join(k3s) + "\n")
    _write(
        root / "plans" / "network.yaml",
        f"# {MARK}\ngateway: {GATEWAY}\nnetmask: {SUBNET.prefixlen}\nnameservers:\n  - {GATEWAY}\n"
        # the releases of a new cluster, as `k3scluster init` writes them
        f'nixos: "{NEWEST_NIXOS_RELEASE}"\nstateVersion: "{NEWEST_NIXOS_RELEASE}"\n'
        f'k3s: "{NIXPKGS_PINS[NEWEST_NIXOS_RELEASE].k3s_default}"\n',
    )
    sec = root / "secrets"
    sec.mkdir(mode=0o700, exist_ok=True)
    _write(sec / "README.md", f"# {MARK}\n\nThrow-away secrets made by bench/gen.py.\n")
    _write(sec / "bench.pub", _ssh_public_key() + "\n")
    _write(sec / "passwd", _passwd_hash() + "\n", 0o600)
    _write(sec / "token", secrets.token_hex(32) + "\n", 0o600)
    _write(sec / "agent-token", secrets.token_hex(32) + "\n", 0o600)
    _write(
        root / "manifests" / "hello.yaml",
        f"# {MARK}\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n",
    )
    return root


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python bench/gen.py DIR N", file=sys.stderr)
        return 2
    make_cluster(Path(argv[0]), int(argv[1]))
    print(f"wrote a synthetic cluster of {argv[1]} host(s) into {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
