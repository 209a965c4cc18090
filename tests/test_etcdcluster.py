"""The three-member etcd test cluster (tests/etcdcluster.py) is what it says: real etcd with
TLS in K3s's file layout, each member in a namespace of its own, and real etcdctl."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.root


def test_three_members_with_k3s_names_and_files_reached_by_etcdctl(etcd_cluster: Any) -> None:
    c = etcd_cluster
    members = c.members()
    assert sorted(m["name"].rsplit("-", 1)[0] for m in members) == ["erik", "olaf", "sven"]
    assert {m["peerURLs"][0] for m in members} == {
        f"https://10.0.100.{n}:2380" for n in (10, 11, 12)}
    for host in ("olaf", "sven", "erik"):
        for f in ("server-ca.crt", "client.crt", "client.key"):
            assert (c.hosts[host].root / "server/tls/etcd" / f).is_file()
        assert c.healthy(host)
    # etcdctl refuses a client without a certificate: TLS is really on
    t = c.hosts["olaf"].tls
    r = c.hosts["olaf"].ns.run(str(c_bin("etcdctl")), "--endpoints", "https://127.0.0.1:2379",
                               "--cacert", str(t / "server-ca.crt"), "--dial-timeout", "2s",
                               "--command-timeout", "3s", "member", "list", check=False)
    assert r.returncode != 0


def test_a_stopped_member_stays_listed_until_removed_and_rejoins_under_a_new_name(
    etcd_cluster: Any,
) -> None:
    c = etcd_cluster
    old = c.hosts["erik"].name
    c.wipe("erik")
    assert not c.healthy("erik")
    assert old in [m["name"] for m in c.members(via="olaf")]  # stale: still counts
    r = c.etcdctl("olaf", "member", "remove", c.member_id("erik"))
    assert r.returncode == 0, r.stderr
    assert old not in [m["name"] for m in c.members(via="olaf")]
    c.join("erik", via="sven")
    names = [m["name"] for m in c.members(via="erik")]
    assert c.hosts["erik"].name in names and old not in names and len(names) == 3


def test_a_wiped_member_cannot_rejoin_while_its_stale_member_is_listed(etcd_cluster: Any) -> None:
    c = etcd_cluster
    c.wipe("erik")
    # a fourth member would need 3 of 4 for a quorum, and only 2 run: etcd refuses the add
    with pytest.raises(RuntimeError, match="etcdserver: unhealthy cluster"):
        c.join("erik", via="olaf")
    assert len(c.members(via="olaf")) == 3


def c_bin(name: str) -> Any:
    from kubeapi import BIN

    return BIN / name
