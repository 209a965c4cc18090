"""``k3scluster:index:Secret``: a secret file of the cluster, known by path and digest only.

colmena reads the key files itself when it deploys (``deployment.keys.<k>.keyFile``), so the
Pulumi state never needs the content: it records where the secret is and its sha256, and a
changed digest shows up as an input change of every host that receives the secret.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

KINDS = ("k3s-token", "k3s-agent-token", "password-hash", "ssh-public-key")


@dataclass(frozen=True)
class SecretArgs:
    kind: str  # one of KINDS
    relpath: str  # relative to the cluster directory
    sha256: str
    hosts: tuple[str, ...]  # the hosts that receive it


class Secret(pulumi.ComponentResource):
    kind: pulumi.Output[str]
    path: pulumi.Output[str]
    sha256: pulumi.Output[str]
    hosts: pulumi.Output[list[str]]

    def __init__(
        self, name: str, args: SecretArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("k3scluster:index:Secret", name, None, opts)
        if args.kind not in KINDS:
            raise ValueError(f"unknown secret kind {args.kind!r}")
        self.kind = pulumi.Output.from_input(args.kind)
        self.path = pulumi.Output.from_input(args.relpath)
        self.sha256 = pulumi.Output.from_input(args.sha256)
        self.hosts = pulumi.Output.from_input(list(args.hosts))
        self.register_outputs(
            {"kind": self.kind, "path": self.path, "sha256": self.sha256, "hosts": self.hosts}
        )
