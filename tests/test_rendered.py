"""The deploy's render check (components/rendered.py): a missing or old render on this
machine is rendered again before colmena; a cluster directory changed after the plan fails."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from k3scluster import commands, render
from k3scluster.components.rendered import ensure_render, input_environment, planned_files
from k3scluster.components.steps import short_digest
from k3scluster.errors import K3sClusterError
from k3scluster.plans import load_or_raise


def _planned(cluster: Path, out: Path) -> dict[str, str]:
    """What the program puts into a deploy's environment for olaf's rendered files."""
    c, _ = load_or_raise(cluster)
    files = render.render_files(c, out)
    inputs = render.host_inputs(c, "olaf", files)
    recorded = render.grouped_inputs({k: v for k, v in inputs.items() if k not in render.PLAN_INPUTS})
    return input_environment({k: short_digest(v) for k, v in recorded.items()})


def test_planned_files_are_the_file_inputs() -> None:
    env = input_environment({"file:hosts/olaf.nix": "ab", "plan:host": "cd", "x": "file:y=1"})
    assert planned_files({**env, "OTHER": "file:z=2"}) == {"hosts/olaf.nix": "ab"}


def test_a_missing_render_is_made_and_an_old_one_replaced(example_dir: Path) -> None:
    out = example_dir / ".k3scluster" / "it"
    env = _planned(example_dir, out)
    ensure_render(example_dir, out, None, env)
    host = out / "hosts" / "olaf.nix"
    want = hashlib.sha256(host.read_bytes()).hexdigest()
    assert planned_files(env)["hosts/olaf.nix"] == want[:12]
    assert planned_files(env)["modules/"].startswith("base.nix cluster.nix ")
    host.write_text("# an older render\n")
    seen: list[str] = []
    ensure_render(example_dir, out, None, env, seen.append)
    assert hashlib.sha256(host.read_bytes()).hexdigest() == want
    assert seen and "hosts/olaf.nix" in seen[0]
    # a shared module of an older render (named by its group)
    module = out / "modules" / "k3s-agent.nix"
    module.write_text("# an older module\n")
    seen.clear()
    ensure_render(example_dir, out, None, env, seen.append)
    assert seen and "modules/" in seen[0] and module.read_text() != "# an older module\n"
    # as planned: nothing is rendered
    seen.clear()
    ensure_render(example_dir, out, None, env, seen.append)
    assert seen == []


def test_a_cluster_changed_after_the_plan_is_refused(example_dir: Path) -> None:
    out = example_dir / ".k3scluster" / "it"
    env = _planned(example_dir, out)
    # olaf re-addressed after the plan was made: its rendered host file differs
    hosts = example_dir / "plans" / "hosts.csv"
    hosts.write_text(hosts.read_text().replace("10.0.100.2", "10.0.100.9"))
    with pytest.raises(K3sClusterError, match="changed after the plan"):
        ensure_render(example_dir, out, None, env)


def test_an_older_render_of_the_plan_data_is_rendered_again(example_dir: Path) -> None:
    """cluster.json (read by modules/cluster.nix) and hive.nix are in no step's file inputs
    (their plan values are the step's ``plan``): an older render on this machine that differs
    only there, such as one made before another operator changed a hosts.csv column, is
    rendered again instead of being deployed."""
    out = example_dir / ".k3scluster" / "it"
    hosts = example_dir / "plans" / "hosts.csv"
    before = hosts.read_text()
    hosts.write_text(before.replace("rack-top", "rack-old").replace("10.0.100.6", "10.0.100.7"))
    render.render_to_dir(load_or_raise(example_dir)[0], out)  # this operator's older render
    hosts.write_text(before)  # the clone now: olaf's column and ulrich's address as planned
    env = _planned(example_dir, out)
    assert "rack-old" in (out / "cluster.json").read_text()
    seen: list[str] = []
    ensure_render(example_dir, out, None, env, seen.append)
    assert "rack-old" not in (out / "cluster.json").read_text()
    assert "rack-top" in (out / "cluster.json").read_text()
    assert "10.0.100.7" not in (out / "hive.nix").read_text()
    assert seen and "cluster.json" in seen[0]


def test_rendering_again_keeps_the_servers_first_hives(example_dir: Path) -> None:
    """During a K3s minor upgrade the render step writes servers-first/<host>.nix (its
    --hold-agent values); a deploy that renders again (without them) keeps those hives for the
    same up's servers-first steps."""
    out = example_dir / ".k3scluster" / "it"
    c, _ = load_or_raise(example_dir)
    render.render_to_dir(c, out, held_agents={"olaf": "1.33"})
    hive = out / render.servers_first_path("olaf")
    held = hive.read_bytes()
    env = _planned(example_dir, out)
    (out / "hosts" / "olaf.nix").write_text("# an older render\n")
    seen: list[str] = []
    ensure_render(example_dir, out, None, env, seen.append)
    assert seen, "the older host file was rendered again"
    assert hive.read_bytes() == held


def test_a_render_again_holds_the_agents_the_render_step_held(example_dir: Path) -> None:
    """During a K3s minor upgrade the render step writes servers-first/<host>.nix
    (--hold-agent); a deploy that renders again does so with the same held agents
    (commands.RenderArgs, render_tree), so the servers-first hive its step applies is there
    again (before: rendered without them, the hive stayed missing and every up failed)."""
    out = example_dir / ".k3scluster" / "it"
    c, _ = load_or_raise(example_dir)
    held = {"karl": "1.33"}
    files = render.render_files(c, out, None, held)
    rel = render.servers_first_path("karl")
    env = input_environment({f"file:{rel}": short_digest(hashlib.sha256(
        files[rel].encode()).hexdigest())})
    render.render_to_dir(c, out)  # a render without it (k3scluster build, another clone)
    assert not (out / rel).exists()
    with pytest.raises(K3sClusterError, match="changed after the plan"):
        ensure_render(example_dir, out, None, env)
    ensure_render(example_dir, out, None, env, None, held)
    assert (out / rel).read_text() == files[rel]
    args = commands.RenderArgs(example_dir, out, None, tuple(held.items())).task_args()
    assert args[-2:] == ["--hold-agent", "karl=1.33"]


def test_the_deploy_task_renders_again_with_the_held_agents(
    example_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tasks deploy --render … --hold-agent H=MINOR`` (the argv RenderArgs makes) renders
    the servers-first hive again before colmena runs (here ``true``, waitReady false)."""
    from k3scluster.components import tasks

    out = example_dir / ".k3scluster" / "it"
    c, _ = load_or_raise(example_dir)
    files = render.render_files(c, out, None, {"karl": "1.33"})
    rel = render.servers_first_path("karl")
    env = input_environment({f"file:{rel}": short_digest(hashlib.sha256(
        files[rel].encode()).hexdigest())})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    render.render_to_dir(c, out)
    render_args = commands.RenderArgs(example_dir, out, None, (("karl", "1.33"),))
    code = tasks.main(["deploy", "--host", "karl", "--ip", "10.0.100.5", "--timeout", "5",
                       *render_args.task_args(), "--no-gates", "--", "true"])
    assert code == 0
    assert (out / rel).read_text() == files[rel]


def _blocked_on(lock: Path) -> bool:
    """Whether some process waits for a lock on ``lock`` (``/proc/locks``: a ``->`` line)."""
    ino = lock.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and fields[fields.index("->") + 5].endswith(f":{ino}"):
            return True
    return False


def test_deploys_that_start_together_render_once(example_dir: Path) -> None:
    """Several hosts' deploys start together: one renders under the lock, the others wait for
    it and then find the render as planned (they do not render it again over a render that a
    running colmena reads)."""
    import fcntl
    import json
    import subprocess
    import sys
    import time

    out = example_dir / ".k3scluster" / "it"
    env = _planned(example_dir, out)
    lock = out.parent / f".{out.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from k3scluster.components.rendered import ensure_render\n"
        "ensure_render(Path(sys.argv[1]), Path(sys.argv[2]), None, json.loads(sys.argv[3]),"
        " lambda m: print('rendering:', m, flush=True))\n"
    )
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the deploy that renders first
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(example_dir), str(out), json.dumps(env)],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.PIPE,
            text=True,
        )
        give_up = time.monotonic() + 120  # a bound, not a measurement
        while not _blocked_on(lock):
            assert proc.poll() is None, "rendered while another deploy held the lock"
            assert time.monotonic() < give_up, "never waited for the lock"
            time.sleep(0.05)
        assert not out.exists()
        render.render_to_dir(load_or_raise(example_dir)[0], out)
        fcntl.flock(held, fcntl.LOCK_UN)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "rendering" not in stdout  # it found the render as planned


@pytest.mark.parametrize("vm_stack", [None, "test-vms"])
def test_cluster_files_are_those_of_the_whole_render(example_dir: Path, vm_stack: str | None) -> None:
    """What a deploy compares with the render on disk (``render.cluster_files``) is exactly the
    cluster.json and hive.nix the render step writes, in a VM stack too."""
    from k3scluster.lab.spec import vm_render

    cluster = load_or_raise(example_dir)[0]
    out = example_dir / ".k3scluster" / "it"
    vm = vm_render(cluster, vm_stack, out) if vm_stack else None
    whole = render.render_files(cluster, out, vm)
    assert render.cluster_files(cluster, out) == {k: whole[k] for k in ("cluster.json", "hive.nix")}


def test_a_deploy_checks_the_plan_data_without_rendering_every_host(
    example_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each host's deploy compares cluster.json and hive.nix with a render of the cluster
    directory: only those two files, not every host's (a whole render per deploy made an
    ``up`` of N hosts cost N whole renders)."""
    out = example_dir / ".k3scluster" / "it"
    render.render_to_dir(load_or_raise(example_dir)[0], out)
    env = _planned(example_dir, out)

    def whole_render(*_args: object, **_kw: object) -> None:
        raise AssertionError("a deploy's check rendered every host's files")

    monkeypatch.setattr(render, "render_files", whole_render)
    ensure_render(example_dir, out, None, env)  # as planned: nothing to do
