"""`k3scluster init`: a valid skeleton, a fresh token, and never an overwrite."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from k3scluster import plans
from k3scluster.errors import K3sClusterError
from k3scluster.init import _create, init_cluster
from k3scluster.pins import NEWEST_NIXOS_RELEASE, NIXPKGS_PINS


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    return {
        p.relative_to(root).as_posix(): (
            stat.S_IMODE(p.stat().st_mode),
            p.read_bytes() if p.is_file() else None,
        )
        for p in sorted(root.rglob("*"))
    }


def test_init_creates_a_skeleton(tmp_path: Path) -> None:
    root = tmp_path / "mycluster"
    result = init_cluster(root)
    for d in ("plans", "nixConfigs", "secrets", "manifests"):
        assert (root / d).is_dir()
        assert f"{d}/" in result.created
    token = root / "secrets" / "token"
    assert re.fullmatch(r"[0-9a-f]{64}\n", token.read_text())
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "secrets").stat().st_mode) == 0o700
    assert result.kept == ()
    assert "secrets/token" in result.created
    # no temporary files left behind
    assert not [p for p in root.rglob("*.tmp")]


def test_skeleton_is_valid_once_a_host_is_added(tmp_path: Path, example_src: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root)
    # the example plans parse; the one thing missing is a host
    result = plans.load(root)
    assert [(d.file, d.message) for d in result.diagnostics] == [("plans/hosts.csv", "no hosts")]
    with (root / "plans" / "hosts.csv").open("a") as f:
        f.write("node1,eno1,192.168.1.10,alice,,\n")
    result = plans.load(root)
    assert [d.message for d in result.diagnostics] == [
        "host 'node1' has no password hash",
        "host 'node1' has no ssh public key: nobody could log in",
    ]
    (root / "secrets" / "passwd").write_bytes((example_src / "secrets" / "passwd").read_bytes())
    (root / "secrets" / "passwd").chmod(0o600)
    (root / "secrets" / "alice.pub").write_bytes(
        (example_src / "secrets" / "manfred.pub").read_bytes()
    )
    cluster, warnings = plans.load_or_raise(root)
    assert warnings == ()
    assert [h.name for h in cluster.hosts] == ["node1"] and cluster.k3s == ()
    assert cluster.secrets.token is not None
    # a new plan names the newest pinned release and its K3s minor release explicitly
    # (a plan without them keeps 25.05, which is end of life)
    assert NEWEST_NIXOS_RELEASE == "26.05"
    assert (cluster.network.nixos_release, cluster.network.k3s_minor) == ("26.05", "1.35")


def test_init_records_the_state_version_next_to_nixos(tmp_path: Path, example_src: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root)
    text = (root / "plans" / "network.yaml").read_text()
    written = re.search(r'^nixos: "([0-9.]+)"\nstateVersion: "([0-9.]+)"\n', text, re.MULTILINE)
    assert written is not None and written.group(1) == written.group(2)
    release = written.group(1)
    other = next(r for r in sorted(NIXPKGS_PINS) if r != release)
    with (root / "plans" / "hosts.csv").open("a") as f:
        f.write("node1,eno1,192.168.1.10,alice,,\n")
    (root / "secrets" / "passwd").write_bytes((example_src / "secrets" / "passwd").read_bytes())
    (root / "secrets" / "passwd").chmod(0o600)
    (root / "secrets" / "alice.pub").write_bytes(
        (example_src / "secrets" / "manfred.pub").read_bytes()
    )
    cluster, _ = plans.load_or_raise(root)
    assert cluster.network.state_version == release
    # an upgrade changes nixos only: the recorded stateVersion stays, and check is quiet
    k3s_now, k3s_other = (NIXPKGS_PINS[r].k3s_default for r in (release, other))
    (root / "plans" / "network.yaml").write_text(
        text.replace(f'nixos: "{release}"', f'nixos: "{other}"').replace(
            f'k3s: "{k3s_now}"', f'k3s: "{k3s_other}"'
        )
    )
    cluster, warnings = plans.load_or_raise(root)
    assert cluster.network.nixos_release == other
    assert cluster.network.state_version_of(cluster.hosts[0]) == release
    assert warnings == ()


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root)
    before = snapshot(root)
    result = init_cluster(root)
    assert result.created == ()
    assert "secrets/token" in result.kept and "plans/hosts.csv" in result.kept
    assert snapshot(root) == before


def test_rerun_adds_only_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root)
    token = (root / "secrets" / "token").read_bytes()
    (root / "plans" / "k3s.csv").unlink()
    (root / "plans" / "hosts.csv").write_text("name,interface,ip,admin\nmine,eno1,1.2.3.4,me\n")
    result = init_cluster(root)
    assert result.created == ("plans/k3s.csv",)
    assert (root / "secrets" / "token").read_bytes() == token
    assert "mine" in (root / "plans" / "hosts.csv").read_text()


def test_existing_token_is_never_replaced(tmp_path: Path) -> None:
    root = tmp_path / "c"
    (root / "secrets").mkdir(parents=True)
    (root / "secrets" / "token").write_text("my-existing-cluster-token\n")
    result = init_cluster(root)
    assert "secrets/token" in result.kept
    assert (root / "secrets" / "token").read_text() == "my-existing-cluster-token\n"


def test_tokens_are_random(tmp_path: Path) -> None:
    init_cluster(tmp_path / "a")
    init_cluster(tmp_path / "b")
    a = (tmp_path / "a" / "secrets" / "token").read_bytes()
    assert a != (tmp_path / "b" / "secrets" / "token").read_bytes()


def test_create_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "f"
    assert _create(target, b"one", 0o600)
    assert not _create(target, b"two", 0o644)
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # a dangling symlink is a name that exists: never written through
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    assert not _create(link, b"x", 0o600)
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "link"]


def test_init_on_a_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(K3sClusterError, match="not a directory"):
        init_cluster(tmp_path / "file")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "plans").write_text("")
    with pytest.raises(K3sClusterError, match="plans exists and is not a directory"):
        init_cluster(tmp_path / "c")


# -- issue 19 item 3: the agents' own token ----------------------------------------------


def test_init_writes_an_agent_token_of_its_own(tmp_path: Path) -> None:
    root = tmp_path / "c"
    result = init_cluster(root)
    agent = root / "secrets" / "agent-token"
    assert "secrets/agent-token" in result.created
    assert re.fullmatch(r"[0-9a-f]{64}\n", agent.read_text())
    assert stat.S_IMODE(agent.stat().st_mode) == 0o600
    assert agent.read_text() != (root / "secrets" / "token").read_text()


def test_init_on_an_existing_cluster_never_adds_the_agent_token(tmp_path: Path) -> None:
    # a directory made before agent tokens, whose cluster may run: adding the agent token
    # there is the risky move check's agent-token-missing warning describes
    root = tmp_path / "c"
    init_cluster(root)
    (root / "secrets" / "agent-token").unlink()
    (root / "plans" / "k3s.csv").unlink()  # something else missing is still added
    before = snapshot(root)
    result = init_cluster(root)
    assert result.created == ("plans/k3s.csv",)
    assert not (root / "secrets" / "agent-token").exists()
    [(rel, why)] = result.held_back
    assert rel == "secrets/agent-token"
    assert "passwd newer than datastore" in why and '"The agent token"' in why
    assert "k3scluster init --agent-token DIR" in why
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k != "plans/k3s.csv"} == before


def test_init_adds_the_agent_token_when_asked_and_keeps_everything_else(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_cluster(root)
    (root / "secrets" / "agent-token").unlink()
    before = snapshot(root)
    result = init_cluster(root, add_agent_token=True)
    assert result.created == ("secrets/agent-token",) and result.held_back == ()
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k != "secrets/agent-token"} == before
    assert after["secrets/agent-token"][0] == 0o600
    # a second run changes nothing, the agent token included
    again = init_cluster(root, add_agent_token=True)
    assert again.created == () and snapshot(root) == after
    assert init_cluster(root).held_back == ()  # it is there now: nothing held back


def test_init_command_says_why_and_how(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from k3scluster.cli import main

    root = tmp_path / "c"
    assert main(["init", str(root)]) == 0
    assert "created  secrets/agent-token" in capsys.readouterr().out  # a new cluster
    (root / "secrets" / "agent-token").unlink()
    assert main(["init", str(root)]) == 0
    out = capsys.readouterr().out
    assert "not added secrets/agent-token: secrets/token exists" in out
    assert "k3scluster init --agent-token DIR" in out and "nothing to do" not in out
    assert not (root / "secrets" / "agent-token").exists()
    assert main(["init", "--agent-token", str(root)]) == 0
    assert "created  secrets/agent-token" in capsys.readouterr().out
    assert (root / "secrets" / "agent-token").exists()


def test_check_warns_a_cluster_without_an_agent_token_and_keeps_it_usable(
    example_dir: Path,
) -> None:
    # a cluster made before agent tokens: adding one to it while it runs may keep its
    # servers from restarting (K3s keeps server/cred/passwd in etcd), so check warns
    # instead of forcing that move
    (example_dir / "secrets" / "agent-token").unlink()
    result = plans.load(example_dir)
    assert result.cluster is not None and result.cluster.secrets.agent_token is None
    [d] = result.diagnostics
    assert (d.file, d.severity.value) == ("secrets/agent-token", "warning")
    assert "passwd newer than datastore" in d.hint and '"The agent token"' in d.hint
    assert "`k3scluster init --agent-token DIR` adds" in d.hint
    assert init_cluster(example_dir).held_back  # the example cluster exists: not by default
    assert plans.load(example_dir).cluster.secrets.agent_token is None  # type: ignore[union-attr]
    init_cluster(example_dir, add_agent_token=True)
    after = plans.load(example_dir)
    assert after.cluster is not None and after.cluster.secrets.agent_token is not None
    assert not after.diagnostics
