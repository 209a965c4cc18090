"""scripts/bootstrap-kube's machine-wide cache: an entry is used only when it is whole.

The cache entries are made of the real binaries scripts/setup put into .tools/bin (hard
links, never written to: a "corrupt" binary is a new file in the entry), under the key the
checkout's own stamps name. When the script falls back to building, the build fails at once
(GOPROXY=off and an empty module cache): nothing is built here, and a run that builds fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from kubeapi import BIN, ROOT, require_binaries

SETS = {"etcd": ("etcd", "etcdctl"), "kube": ("kube-apiserver", "kube-controller-manager")}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A fresh clone's files the script reads: the script and the wrapper modules."""
    require_binaries()
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "bootstrap-kube", root / "scripts")
    for mod in ("etcd", "kube-apiserver"):
        shutil.copytree(ROOT / "tools" / mod, root / "tools" / mod)
    return root


def _key(name: str) -> str:
    stamp = ROOT / ".tools" / f"{name}.stamp"
    if not stamp.is_file():
        pytest.fail(f"{stamp} missing: run scripts/bootstrap-kube")
    return stamp.read_text().strip()


def _entry(cache: Path, name: str, sums: bool) -> Path:
    entry = cache / _key(name)
    entry.mkdir(parents=True)
    for b in SETS[name]:
        os.link(BIN / b, entry / b)
    if sums:
        (entry / "SHA256SUMS").write_text("".join(
            f"{hashlib.sha256((entry / b).read_bytes()).hexdigest()}  {b}\n" for b in SETS[name]))
    return entry


def _truncate(entry: Path, b: str) -> None:
    head = (entry / b).read_bytes()[:65536]
    (entry / b).unlink()  # a new file: the hard-linked original stays whole
    (entry / b).write_bytes(head)
    (entry / b).chmod(0o755)


def _run(root: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "K3SCLUSTER_TOOLS_CACHE": str(cache), "GOPROXY": "off",
           "GOMODCACHE": str(root.parent / "gomodcache"), "GOFLAGS": ""}
    return subprocess.run([str(root / "scripts" / "bootstrap-kube")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_whole_entries_are_copied_and_an_entry_from_before_sums_gets_them(
    checkout: Path, tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    etcd, kube = _entry(cache, "etcd", sums=False), _entry(cache, "kube", sums=True)
    r = _run(checkout, cache)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("copying from the machine's cache") == 2
    for name, bins in SETS.items():
        for b in bins:
            assert (checkout / ".tools/bin" / b).read_bytes() == (BIN / b).read_bytes()
        assert (checkout / ".tools" / f"{name}.stamp").read_text().strip() == _key(name)
    assert sorted(ln.split()[1] for ln in (etcd / "SHA256SUMS").read_text().splitlines()) \
        == ["etcd", "etcdctl"]
    assert (kube / "SHA256SUMS").is_file()


@pytest.mark.parametrize("sums", [True, False], ids=["with-sums", "from-before-sums"])
def test_a_truncated_binary_in_an_entry_is_never_installed(
    checkout: Path, tmp_path: Path, sums: bool,
) -> None:
    cache = tmp_path / "cache"
    entry = _entry(cache, "etcd", sums=sums)
    _truncate(entry, "etcdctl")
    r = _run(checkout, cache)
    assert not (checkout / ".tools/bin/etcdctl").exists()
    assert not (checkout / ".tools/etcd.stamp").exists()
    assert r.returncode != 0  # it fell back to building, which cannot work here
    assert "that cache entry is incomplete or corrupt" in r.stderr
    assert not entry.exists()  # moved aside, so the next build can publish a whole one
    assert not list(cache.glob(".*"))  # nothing half-written or set aside stays
    assert [p.name for p in (checkout / ".tools").glob("etcd-build*")] == ["etcd-build.log"]


def test_an_entry_without_one_of_its_binaries_is_not_used(checkout: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = _entry(cache, "etcd", sums=False)
    (entry / "etcdctl").unlink()
    r = _run(checkout, cache)
    assert not (checkout / ".tools/etcd.stamp").exists()
    assert r.returncode != 0
    assert "that cache entry is incomplete or corrupt" in r.stderr


@pytest.mark.parametrize("shared", ["cache", "entry"])
def test_an_entry_others_can_write_is_not_trusted(
    checkout: Path, tmp_path: Path, shared: str,
) -> None:
    cache = tmp_path / "cache"
    entry = _entry(cache, "etcd", sums=True)
    (cache if shared == "cache" else entry).chmod(0o777)  # anyone could have put a binary there
    r = _run(checkout, cache)
    assert not (checkout / ".tools/bin/etcd").exists()
    assert r.returncode != 0  # it fell back to building, which cannot work here
    assert "can be written by a user other than root and you" in r.stderr
    assert entry.is_dir()  # not ours to move aside
