"""boot-stick on loop devices (root only; never a real disk).

Loop devices are type "loop" and not removable: the write tests pass
allow_non_removable=True, and one test shows the default refuses them.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import loopdevices
import pytest
from loopdevices import sha256_of, unmount_under

from k3scluster import plans
from k3scluster.bootstick import boot_stick
from k3scluster.errors import K3sClusterError

pytestmark = pytest.mark.root
loop_factory = loopdevices.loop_factory  # the fixture

MiB = 1 << 20


def _head(dev: str) -> bytes:
    with open(dev, "rb") as f:
        return f.read(MiB)


@pytest.fixture
def cluster(example_src: Path):
    result = plans.load(example_src)
    assert result.cluster is not None, result.diagnostics
    return result.cluster


@pytest.fixture
def image(tmp_path: Path) -> Path:
    # not a multiple of the 4 MiB block: the tail must be written and verified too
    path = tmp_path / "olaf.iso"
    path.write_bytes(os.urandom(9 * MiB + 12345))
    return path


def write_quietly(cluster, dev: str, image: Path) -> None:
    """boot-stick onto a loop device (not removable: the override), answering yes, no progress."""
    boot_stick(
        cluster, "olaf", dev, yes=True, image=image, allow_non_removable=True,
        progress=io.StringIO(),
    )



def test_writes_and_verifies(cluster, loop_factory, image: Path):
    tail = b"T" * MiB
    dev = loop_factory(16, fill=b"\0" * (15 * MiB) + tail)
    progress = io.StringIO()
    boot_stick(
        cluster, "olaf", dev, yes=True, image=image, allow_non_removable=True, progress=progress
    )
    data = image.read_bytes()
    with open(dev, "rb") as f:
        written = f.read(len(data))
        f.seek(15 * MiB)
        after = f.read(MiB)
    assert written == data
    assert after == tail  # nothing past the image
    out = progress.getvalue()
    assert "100.0%" in out and "MiB/s" in out and "the stick is ready" in out


def test_asks_and_writes_nothing_without_yes(cluster, loop_factory, image, monkeypatch):
    dev = loop_factory(16, fill=b"keep" * 1000)
    before = sha256_of(dev)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    progress = io.StringIO()
    with pytest.raises(K3sClusterError, match="not confirmed"):
        boot_stick(cluster, "olaf", dev, image=image, allow_non_removable=True, progress=progress)
    assert f"Write {image} to {dev} (loop, 16.0 MiB)? This erases it. [y/N]" in progress.getvalue()
    assert sha256_of(dev) == before
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    boot_stick(cluster, "olaf", dev, image=image, allow_non_removable=True, progress=io.StringIO())
    with open(dev, "rb") as f:
        assert f.read(image.stat().st_size) == image.read_bytes()


def test_refuses_non_removable_by_default(cluster, loop_factory, image):
    dev = loop_factory(16, fill=b"keep" * 1000)
    before = sha256_of(dev)
    with pytest.raises(K3sClusterError) as e:
        boot_stick(cluster, "olaf", dev, yes=True, image=image, progress=io.StringIO())
    assert "neither removable nor on USB" in e.value.message
    assert "--allow-non-removable" in e.value.hint
    assert sha256_of(dev) == before


def test_refuses_mounted_device(cluster, loop_factory, image, tmp_path):
    dev = loop_factory(32)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True)
    try:
        (mnt / "data").write_text("precious")
        with pytest.raises(K3sClusterError, match="is mounted") as e:
            write_quietly(cluster, dev, image)
        assert "umount" in e.value.hint
        assert (mnt / "data").read_text() == "precious"
    finally:
        unmount_under(mnt)


def test_refuses_mounted_partition(cluster, loop_factory, image, tmp_path):
    dev = loop_factory(64)
    subprocess.run(
        ["parted", "-s", dev, "--", "mklabel", "gpt", "mkpart", "x", "ext4", "1MiB", "100%"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["mkfs.ext4", "-q", "-F", dev + "p1"], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev + "p1", str(mnt)], check=True)
    try:
        # the unmount updates the file system itself: compare the area before it
        before = _head(dev)
        with pytest.raises(K3sClusterError, match="is mounted"):
            write_quietly(cluster, dev, image)
    finally:
        unmount_under(mnt)
    assert _head(dev) == before


def test_refuses_a_partition(cluster, loop_factory, image):
    dev = loop_factory(64)
    subprocess.run(
        ["parted", "-s", dev, "--", "mklabel", "gpt", "mkpart", "x", "ext4", "1MiB", "100%"],
        check=True,
        capture_output=True,
    )
    before = sha256_of(dev)
    with pytest.raises(K3sClusterError, match="is a partition") as e:
        boot_stick(
            cluster,
            "olaf",
            dev + "p1",
            yes=True,
            image=image,
            allow_non_removable=True,
            progress=io.StringIO(),
        )
    assert e.value.hint == f"give the whole device: {dev}"
    assert sha256_of(dev) == before


def test_refuses_a_too_small_device(cluster, loop_factory, image):
    dev = loop_factory(8, fill=b"keep" * 1000)
    before = sha256_of(dev)
    with pytest.raises(K3sClusterError, match="too small"):
        write_quietly(cluster, dev, image)
    assert sha256_of(dev) == before


def test_refuses_what_is_not_a_device(cluster, image, tmp_path):
    loopdevices.need_root()
    with pytest.raises(K3sClusterError, match="does not exist"):
        boot_stick(
            cluster,
            "olaf",
            "/dev/k3scluster-no-such-stick",
            yes=True,
            image=image,
            progress=io.StringIO(),
        )
    plain = tmp_path / "file"
    plain.write_bytes(b"x" * MiB)
    with pytest.raises(K3sClusterError, match="not a block device"):
        boot_stick(cluster, "olaf", str(plain), yes=True, image=image, progress=io.StringIO())
    assert plain.read_bytes() == b"x" * MiB


def test_without_nix_says_how_to_pass_an_image(cluster, loop_factory, tmp_path):
    dev = loop_factory(16)
    before = sha256_of(dev)
    with pytest.raises(K3sClusterError, match="is not installed here") as e:
        boot_stick(
            cluster,
            "olaf",
            dev,
            yes=True,
            allow_non_removable=True,
            nix="k3scluster-no-such-nix",
            out=tmp_path / "render",
            progress=io.StringIO(),
        )
    assert "--image" in e.value.hint
    assert sha256_of(dev) == before


def test_unknown_host_and_missing_image(cluster, loop_factory, tmp_path, image):
    dev = loop_factory(16)
    with pytest.raises(K3sClusterError, match="no host 'nobody'"):
        boot_stick(
            cluster,
            "nobody",
            dev,
            yes=True,
            image=image,
            allow_non_removable=True,
            progress=io.StringIO(),
        )
    with pytest.raises(K3sClusterError, match="does not exist or is not a file"):
        boot_stick(
            cluster,
            "olaf",
            dev,
            yes=True,
            image=tmp_path / "none.iso",
            allow_non_removable=True,
            progress=io.StringIO(),
        )
