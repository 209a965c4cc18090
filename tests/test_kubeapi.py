"""The test control plane (tests/kubeapi.py) is what it says: a real kube-apiserver v1.35.4 at
each of the plan's addresses inside its namespace, reached with K3s's admin kubeconfig, with
nodes registered as a kubelet would."""

from __future__ import annotations

from typing import Any

import pytest

from k3scluster import kube as kubelib

pytestmark = pytest.mark.root


def test_the_api_answers_at_each_address_with_k3s_admin_kubeconfig(kube: Any) -> None:
    assert kube.served
    for ip in kube.served:
        text = kubelib.rewrite_kubeconfig(kube.k3s_yaml, kubelib.server_url(ip), "hw")
        cfg = kubelib.parse_kubeconfig(text, "k3s.yaml")
        assert kubelib.check_readyz(cfg, kubelib.server_url(ip)) == kubelib.Check(
            True, "/readyz 200")
    assert kubelib.server_version(kube.kubeconfig, kube.server) == "v1.35.4"


def test_a_registered_node_is_seen_ready_with_its_kubelet_version(kube: Any) -> None:
    kube.add_node("olaf-test", version="v1.34.2+k3s1")
    seen = kubelib.read_node(kube.kubeconfig, kube.server, "olaf-test")
    assert seen.check.ready and seen.version == "v1.34.2+k3s1" and seen.registered
    kube.set_node_status("olaf-test", ready=False)
    seen = kubelib.read_node(kube.kubeconfig, kube.server, "olaf-test")
    assert seen.check == kubelib.Check(False, "node olaf-test Ready=False (KubeletNotReady)")


def test_the_written_kubeconfig_reaches_each_other_server_by_its_context(kube: Any) -> None:
    # the init-server's address first (what `kubectl` uses by default), a context of its
    # own for each other server: each is verified with the one CA and answers
    from kubernetes import client, config

    init, *others = kube.served
    assert others
    named = [(f"srv{i}", kubelib.server_url(ip)) for i, ip in enumerate(others)]
    text = kubelib.rewrite_kubeconfig(kube.k3s_yaml, kubelib.server_url(init), "hw", others=named)
    data = kubelib.parse_kubeconfig(text, "kubeconfig")
    assert data["current-context"] == "hw"
    for context, url in [("hw", kubelib.server_url(init)), *((f"hw-{n}", u) for n, u in named)]:
        cfg = client.Configuration()
        config.load_kube_config_from_dict(data, context=context, client_configuration=cfg)
        assert cfg.host == url
        version = client.VersionApi(client.ApiClient(cfg)).get_code()
        assert version.git_version == "v1.35.4"
