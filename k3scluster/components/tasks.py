"""Small tasks the Pulumi steps run as ``python -m k3scluster.components.tasks <task> …``.

- ``capture --out FILE -- ARGV…``: run ARGV, write its stdout to FILE atomically; an existing
  FILE is kept (a user's file is never overwritten).
- ``iso --result LINK -- ARGV…``: run an ISO build (its log goes to stderr), print ``{"image": …, "sha256": …}`` as the last line.

Plain library code: pulumi is not imported here (the components package imports it lazily).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from k3scluster.errors import K3sClusterError

CAPTURED_PREFIX = "captured-sha256="


def captured_sha256(stdout: str | None) -> str | None:
    """The digest ``capture`` reports on its last line (None before the step has run)."""
    for line in reversed((stdout or "").splitlines()):
        if line.startswith(CAPTURED_PREFIX):
            return line[len(CAPTURED_PREFIX) :].strip()
    return None


def _capture(out: Path, argv: list[str]) -> None:
    _write_captured(out, argv)
    # the digest of what the file now holds: the deploy that imports it takes this as its
    # input, so the next preview agrees with the file and shows no second change
    print(CAPTURED_PREFIX + hashlib.sha256(out.read_bytes()).hexdigest())


def _write_captured(out: Path, argv: list[str]) -> None:
    if out.exists():
        print(f"{out} exists; kept as it is")
        return
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise K3sClusterError(
            f"`{' '.join(argv)}` failed with exit code {proc.returncode}; {out} not written",
            hint="check that the host is up and accepts your ssh key for root",
        )
    if not proc.stdout.strip():
        raise K3sClusterError(f"`{' '.join(argv)}` printed nothing; {out} not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proc.stdout)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, out)  # fails if the file appeared meanwhile: never overwrite it
    except FileExistsError:
        print(f"{out} appeared meanwhile; kept as it is")
    finally:
        os.unlink(tmp)
    print(f"wrote {out} ({len(proc.stdout)} bytes)")


def _iso(result: Path, argv: list[str]) -> None:
    from k3scluster.installer import find_iso

    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False)
    if proc.returncode != 0:
        raise K3sClusterError(f"the ISO build failed with exit code {proc.returncode}")
    image = find_iso(result).resolve()
    h = hashlib.sha256()
    with image.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    print(json.dumps({"image": str(image), "sha256": h.hexdigest()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k3scluster.components.tasks")
    sub = parser.add_subparsers(dest="task", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("argv", nargs="+")
    i = sub.add_parser("iso")
    i.add_argument("--result", type=Path, required=True)
    i.add_argument("argv", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.task == "capture":
            _capture(args.out, args.argv)
        else:
            _iso(args.result, args.argv)
    except K3sClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
