"""Shared fixtures. Layer-specific fixtures live beside their tests."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    return copy_example(tmp_path)


# short paths live here, whatever TMPDIR says (a long TMPDIR is what they must not follow)
SHORT_BASE = Path("/tmp")


@pytest.fixture
def short_example_dir() -> Iterator[Path]:
    """``example_dir`` under a short path of its own: a VM stack's lab keeps each VM's QMP
    socket at ``<cluster>/.k3scluster/<stack>-lab/<host>/qmp.sock``, which must fit a unix
    socket's 107 characters, and pytest's ``tmp_path`` (``/tmp/pytest-of-<user>/pytest-<run
    number>/<test name, 30>``) grows past that once the run number has four digits."""
    with short_example_copy() as path:
        yield path


@contextlib.contextmanager
def short_example_copy() -> Iterator[Path]:
    """The example cluster copied under ``SHORT_BASE``, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="k3ex-", dir=SHORT_BASE))
    try:
        yield copy_example(base)
    finally:
        shutil.rmtree(base)


def copy_example(parent: Path) -> Path:
    """The example cluster copied to ``parent/cluster`` (its secrets 0600)."""
    dst = parent / "cluster"
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns(".k3scluster"))
    for f in (dst / "secrets").iterdir():
        if f.name in ("token", "agent-token") or f.name.endswith("passwd"):
            f.chmod(0o600)
    return dst


# --- a real Kubernetes API server and etcd (tests/kubeapi.py, tests/etcdcluster.py) ----------
def _need_namespaces() -> None:
    import netns

    why = netns.available()
    if why:
        pytest.skip(f"real kube-apiserver/etcd in a network namespace: {why}")


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real etcd + kube-apiserver + kube-controller-manager in a network namespace holding
    10.0.100.10-12, the API at https://10.0.100.10:6443 (see tests/kubeapi.py)."""
    _need_namespaces()
    import kubeapi

    api = kubeapi.start(tmp_path_factory.mktemp("kubeapi"))
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def kube(kube_api: Any) -> Iterator[Any]:
    """``kube_api`` with the test's thread inside its network namespace for the whole test."""
    with kube_api.ns.entered():
        yield kube_api


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[Any]:
    """Three real etcd members olaf, sven, erik at 10.0.100.10-12 (see tests/etcdcluster.py)."""
    _need_namespaces()
    from etcdcluster import EtcdCluster

    c = EtcdCluster.launch(
        tmp_path / "etcd", {"olaf": "10.0.100.10", "sven": "10.0.100.11", "erik": "10.0.100.12"}
    )
    try:
        yield c
    finally:
        c.shutdown()
