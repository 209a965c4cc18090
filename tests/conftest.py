"""Shared fixtures. Layer-specific fixtures live beside their tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cluster"


@pytest.fixture
def example_src() -> Path:
    """The example cluster in the repository (read only: copy before changing)."""
    return EXAMPLE


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """A private copy of the example cluster, with secrets at mode 0600 as a user keeps them."""
    dst = tmp_path / "cluster"
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns(".k3scluster"))
    for f in (dst / "secrets").iterdir():
        if f.name in ("token", "agent-token") or f.name.endswith("passwd"):
            f.chmod(0o600)
    return dst
