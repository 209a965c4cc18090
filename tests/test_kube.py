"""k3scluster.kube without a network: the kubeconfig rewrite, durations, the polling loop."""

from __future__ import annotations

import pytest
import yaml

from k3scluster import kube
from k3scluster.components.tasks import write_private
from k3scluster.errors import K3sClusterError
from k3scluster.records import DEPLOYED_PREFIX, last_json

K3S_YAML = """apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0EtREFUQQ==
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {}
users:
- name: default
  user:
    client-certificate-data: Q0VSVA==
    client-key-data: S0VZLURBVEE=
"""


def test_rewrite_points_at_the_init_server_and_names_everything_after_the_stack() -> None:
    out = yaml.safe_load(kube.rewrite_kubeconfig(K3S_YAML, "https://10.0.100.10:6443", "hw"))
    assert out["clusters"] == [
        {"name": "hw", "cluster": {"certificate-authority-data": "Q0EtREFUQQ==",
                                   "server": "https://10.0.100.10:6443"}}
    ]
    assert out["users"] == [
        {"name": "hw", "user": {"client-certificate-data": "Q0VSVA==",
                                "client-key-data": "S0VZLURBVEE="}}
    ]
    assert out["contexts"] == [{"name": "hw", "context": {"cluster": "hw", "user": "hw"}}]
    assert out["current-context"] == "hw"


def test_rewrite_adds_a_context_for_each_other_server_with_the_same_ca_and_user() -> None:
    others = [("ulf-k3s-server", "https://10.0.100.12:6443"),
              ("rolf-k3s-server", "https://10.0.100.14:6443")]
    out = yaml.safe_load(
        kube.rewrite_kubeconfig(K3S_YAML, "https://10.0.100.10:6443", "hw", others=others))
    assert out["current-context"] == "hw"  # the init-server, as before
    assert out["clusters"] == [
        {"name": name, "cluster": {"certificate-authority-data": "Q0EtREFUQQ==", "server": url}}
        for name, url in [("hw", "https://10.0.100.10:6443"),
                          ("hw-ulf-k3s-server", "https://10.0.100.12:6443"),
                          ("hw-rolf-k3s-server", "https://10.0.100.14:6443")]
    ]
    assert out["contexts"] == [
        {"name": n, "context": {"cluster": n, "user": "hw"}}
        for n in ("hw", "hw-ulf-k3s-server", "hw-rolf-k3s-server")
    ]
    assert [u["name"] for u in out["users"]] == ["hw"]  # one user, its key once


@pytest.mark.parametrize("text", ["", "just: a map\n", "[1, 2]\n", "clusters: [\n"])
def test_a_file_that_is_no_kubeconfig_is_refused_without_its_content(text: str) -> None:
    with pytest.raises(K3sClusterError) as err:
        kube.rewrite_kubeconfig(text + "# S0VZLURBVEE=\n", "https://x:6443", "hw", "olaf:k3s.yaml")
    assert "olaf:k3s.yaml" in str(err.value)
    assert "S0VZLURBVEE=" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "seconds"), [("600", 600), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("2.5", 2.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert kube.parse_duration(text, "k3scluster:readyTimeout") == seconds


@pytest.mark.parametrize("text", ["", "ten", "10 m", "-5", "0", "5d"])
def test_bad_durations_name_the_setting(text: str) -> None:
    with pytest.raises(K3sClusterError, match="k3scluster:readyTimeout"):
        kube.parse_duration(text, "k3scluster:readyTimeout")


def test_duration_text() -> None:
    assert [kube.duration(s) for s in (0, 5, 60, 70, 600, 3725)] == [
        "0s", "5s", "1m", "1m10s", "10m", "1h2m5s"
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_wait_until_reports_progress_and_returns_when_ready() -> None:
    clock, lines = Clock(), []
    seen = iter(["/readyz 503, etcd not ready"] * 7 + ["/readyz 200"])

    def poll() -> kube.Check:
        s = next(seen)
        return kube.Check(s.endswith("200"), s)

    check = kube.wait_until("olaf: olaf-k3s-server", poll, 600, lines.append, interval=2,
                            report_every=10, clock=clock, sleep=clock.sleep)
    assert check.ready
    assert lines == [
        "olaf: olaf-k3s-server: /readyz 503, etcd not ready (0s of 10m)",
        "olaf: olaf-k3s-server: /readyz 503, etcd not ready (10s of 10m)",
        "olaf: olaf-k3s-server: /readyz 200 after 14s",
    ]


def test_wait_until_gives_up_at_the_timeout_with_the_last_state() -> None:
    clock, lines = Clock(), []
    check = kube.wait_until("x", lambda: kube.Check(False, "node n NotReady"), 7, lines.append,
                            interval=2, clock=clock, sleep=clock.sleep)
    assert not check.ready and check.seen == "node n NotReady"
    assert clock.now == 7  # the last sleep is cut to the deadline
    assert lines == ["x: node n NotReady (0s of 7s)"]  # same state, within report_every


def test_last_json_takes_the_last_record_line() -> None:
    out = f"colmena says hi\n{DEPLOYED_PREFIX}{{\"system\": \"/a\"}}\nnoise\n" \
          f"{DEPLOYED_PREFIX}{{\"system\": \"/b\"}}\n"
    assert last_json(out, DEPLOYED_PREFIX) == {"system": "/b"}
    assert last_json("nothing", DEPLOYED_PREFIX) is None
    assert last_json(None, DEPLOYED_PREFIX) is None


def test_write_private_is_0600_and_replaces(tmp_path) -> None:
    target = tmp_path / "d" / "kubeconfig"
    write_private(target, "one")
    write_private(target, "two")
    assert target.read_text() == "two"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["kubeconfig"]


def _kubeconfig() -> dict:
    return yaml.safe_load(K3S_YAML)


def test_a_client_too_old_for_the_readyz_call_is_an_error_not_a_server_not_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubernetes.client import ApiClient

    # kubernetes < 37 has no ApiClient.param_serialize (pyproject.toml asks for >= 37)
    monkeypatch.delattr(ApiClient, "param_serialize")
    with pytest.raises(AttributeError, match="param_serialize"):
        kube.check_readyz(_kubeconfig(), "https://127.0.0.1:6443")


def test_a_programming_error_in_the_node_check_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.client import CoreV1Api

    def broken(*_a: object, **_k: object) -> None:
        raise TypeError("read_node() got an unexpected keyword argument")

    monkeypatch.setattr(CoreV1Api, "read_node", broken)
    with pytest.raises(TypeError):
        kube.check_node_ready(_kubeconfig(), "https://127.0.0.1:6443", "olaf")


def test_an_api_error_status_is_still_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    def unavailable(*_a: object, **_k: object) -> None:
        raise ApiException(status=503, reason="Service Unavailable")

    monkeypatch.setattr(CoreV1Api, "read_node", unavailable)
    assert kube.check_node_ready(_kubeconfig(), "https://127.0.0.1:6443", "olaf") == kube.Check(
        False, "node olaf: API answered 503")
