"""``k3scluster:index:InstallerIso``: one host's offline installer image.

With ``k3scluster:buildIsos`` on, a step builds the ISO whenever one of its inputs (the
installer files and the host's system inputs, as digests) changes, and the component outputs
the image path and its sha256. With it off (and in a VM stack, whose ``Vm`` builds the image)
a ``Host`` registers no InstallerIso: it would build nothing and only print two lines per host
in every preview (a stack whose state still holds them drops them from its state at its next
``up``: components, nothing is built or deleted on disk).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi

from k3scluster import commands
from k3scluster.components.steps import step


@dataclass(frozen=True)
class InstallerIsoArgs:
    host: str
    inputs: Mapping[str, pulumi.Input[str]]  # name -> sha256 of everything the image depends on
    digest: pulumi.Input[str]  # one sha256 over ``inputs``
    build_argv: Sequence[str] | None  # None: do not build (buildIsos off)
    result_link: str  # the build's out-link (installer.iso_out_link)
    python: str
    runner: str
    depends_on: Sequence[pulumi.Resource] = field(default=())


def _result(stdout: str | None) -> dict[str, Any]:
    lines = [line for line in (stdout or "").splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


class InstallerIso(pulumi.ComponentResource):
    image: pulumi.Output[str | None]
    sha256: pulumi.Output[str | None]
    digest: pulumi.Output[str]

    def __init__(
        self, name: str, args: InstallerIsoArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("k3scluster:index:InstallerIso", name, None, opts)
        self.build: pulumi.CustomResource | None = None
        self.digest = pulumi.Output.from_input(args.digest)
        if args.build_argv is None:
            self.image = pulumi.Output.from_input(None)
            self.sha256 = pulumi.Output.from_input(None)
        else:
            argv = commands.build_iso(args.python, Path(args.result_link), list(args.build_argv))
            self.build = step(
                f"{name}-build",
                runner=args.runner,
                host=args.host,
                create=argv,
                inputs_digest=args.inputs,
                opts=pulumi.ResourceOptions(parent=self, depends_on=list(args.depends_on)),
            )
            result = self.build.stdout.apply(_result)  # type: ignore[attr-defined]
            self.image = result.apply(lambda r: r.get("image"))
            self.sha256 = result.apply(lambda r: r.get("sha256"))
        if self.build is None:  # nothing to wait for: plain values are cheaper to register
            self.register_outputs({"image": None, "sha256": None, "digest": args.digest})
        else:
            self.register_outputs(
                {"image": self.image, "sha256": self.sha256, "digest": self.digest}
            )
