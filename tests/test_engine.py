"""The real Pulumi engine (.tools/bin), offline, with the project's Python language host.

Each test works in a temporary project with a file backend, inside a loopback-only network
namespace (see tests/engine.py). Needs root and `scripts/bootstrap-pulumi` run first.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import stat
import subprocess
import textwrap
from pathlib import Path

import grpc
import pytest
from engine import ROOT, VERSION, require_engine, run_pulumi
from google.protobuf import empty_pb2
from pulumi.runtime.proto import language_pb2, language_pb2_grpc

PROJECT = "enginetest"
STACK = "dev"

PROGRAM = '''
import os

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, Resource, ResourceProvider, UpdateResult

import helper  # beside __main__.py: the program directory is on sys.path


class Box(pulumi.ComponentResource):
    def __init__(self, name, opts=None):
        super().__init__("enginetest:index:Box", name, None, opts)
        self.label = pulumi.Output.from_input(f"box-{name}")
        self.register_outputs({"label": self.label})


class FileProvider(ResourceProvider):
    """Writes one file; says in the file which operation wrote it."""

    def create(self, props):
        with open(props["path"], "w") as f:
            f.write("created:" + props["content"])
        return CreateResult(id_=props["path"], outs=dict(props))

    def diff(self, id, olds, news):
        return DiffResult(
            changes=olds.get("content") != news.get("content"),
            replaces=["path"] if olds.get("path") != news.get("path") else [],
        )

    def update(self, id, olds, news):
        with open(news["path"], "w") as f:
            f.write("updated:" + news["content"])
        return UpdateResult(outs=dict(news))

    def delete(self, id, props):
        os.remove(props["path"])


class File(Resource):
    def __init__(self, name, path, content, opts=None):
        super().__init__(FileProvider(), name, {"path": path, "content": content}, opts)


config = pulumi.Config()
print("program ran in", os.getcwd())
box = Box("one")
pulumi.export("greeting", helper.GREETING)
pulumi.export("label", box.label)
pulumi.export("cwd", os.getcwd())

token = config.get_secret("token")
if token is not None:
    pulumi.export("token", token)
    pulumi.export("token_length", token.apply(len))

path = config.get("file_path")
if path:
    f = File("file", path, config.require("file_content"))
    pulumi.export("file_id", f.id)
'''


def _ok(r) -> str:
    assert r.returncode == 0, f"pulumi failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture
def project(tmp_path: Path) -> Path:
    require_engine()
    d = tmp_path / "proj"
    d.mkdir()
    (d / "Pulumi.yaml").write_text(f"name: {PROJECT}\nruntime: python\n")
    (d / "helper.py").write_text('GREETING = "hello from helper"\n')
    (d / "__main__.py").write_text(textwrap.dedent(PROGRAM))
    _ok(run_pulumi(["stack", "init", STACK, "--non-interactive"], cwd=d))
    return d


def _state(project: Path) -> dict:
    return json.loads(_ok(run_pulumi(["stack", "export"], cwd=project)))


def _types(state: dict) -> list[str]:
    return sorted(r["type"] for r in state["deployment"].get("resources") or [])


@pytest.mark.integration
@pytest.mark.root
def test_version_is_pinned(tmp_path: Path) -> None:
    require_engine()
    r = run_pulumi(["version"], cwd=tmp_path)
    assert _ok(r).strip() == VERSION


@pytest.mark.integration
@pytest.mark.root
def test_program_lifecycle(project: Path) -> None:
    preview = json.loads(_ok(run_pulumi(["preview", "--json", "--non-interactive"], cwd=project)))
    creates = {s["urn"].split("::")[-1]: s["op"] for s in preview["steps"]}
    assert creates == {f"{PROJECT}-{STACK}": "create", "one": "create"}
    assert _types(_state(project)) == []  # a preview changes nothing

    up = _ok(run_pulumi(["up", "--yes", "--non-interactive"], cwd=project))
    assert f"program ran in {project}" in up  # program output reaches the engine

    outputs = json.loads(_ok(run_pulumi(["stack", "output", "--json"], cwd=project)))
    assert outputs == {"greeting": "hello from helper", "label": "box-one", "cwd": str(project)}
    assert _types(_state(project)) == ["enginetest:index:Box", "pulumi:pulumi:Stack"]

    again = json.loads(_ok(run_pulumi(["preview", "--json", "--non-interactive"], cwd=project)))
    assert {s["op"] for s in again["steps"]} == {"same"}

    _ok(run_pulumi(["destroy", "--yes", "--non-interactive"], cwd=project))
    assert _types(_state(project)) == []


# What Pulumi itself does with a failing program, a secret config value or a dynamic
# provider is Pulumi's to test. The project's own use of them runs under this engine in
# test_pulumi_integration.py (a plan error ends the run with file:line; no secret in the
# state or colmena's environment; the step provider's create, update and delete of every
# host), test_hardware_fetch.py and the vm tests.


# --- scripts/env.sh and the language host's command line (no engine needed) ----------------


def _source_env(project: Path, env: dict[str, str]) -> tuple[dict[str, str], str]:
    """Sources a copy of scripts/env.sh placed in ``project``; returns the environment and stderr."""
    (project / "scripts").mkdir(exist_ok=True)
    (project / "scripts" / "env.sh").write_text((ROOT / "scripts" / "env.sh").read_text())
    r = subprocess.run(
        ["bash", "-c", 'source "$1/scripts/env.sh" && env -0', "bash", str(project)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    pairs = (item.split("=", 1) for item in r.stdout.split("\0") if "=" in item)
    return dict(pairs), r.stderr


def test_env_sh_sets_offline_defaults_and_creates_a_passphrase_once(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    got, err = _source_env(tmp_path, base)
    assert got["PATH"].split(":")[0] == f"{tmp_path}/.tools/bin"
    assert got["PULUMI_SKIP_UPDATE_CHECK"] == "true"
    assert got["PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION"] == "true"
    assert got["PULUMI_DISABLE_REGISTRY_RESOLVE"] == "true"
    assert got["PULUMI_HOME"] == f"{tmp_path}/.tools/pulumi-home"
    assert got["PULUMI_BACKEND_URL"] == f"file://{tmp_path}/state"
    passphrase = tmp_path / ".tools" / "passphrase"
    assert got["PULUMI_CONFIG_PASSPHRASE_FILE"] == str(passphrase)
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600
    value = passphrase.read_text()
    assert len(value) >= 32
    assert "back it up" in err

    again, err2 = _source_env(tmp_path, base)
    assert passphrase.read_text() == value  # created once, never replaced
    assert "passphrase" not in err2
    assert f"Pulumi state in local files: file://{tmp_path}/state" in err2
    assert again["PATH"].count(".tools/bin") == 1


def test_env_sh_sourced_by_a_relative_path_with_cdpath_set(tmp_path: Path) -> None:
    """``source scripts/env.sh`` in the project, in a shell that exports CDPATH: ``cd
    scripts/..`` then prints the directory, which env.sh took as the project (twice, a
    newline between): PATH, PULUMI_HOME and the backend named a directory that does not
    exist."""
    _source_env(tmp_path, {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # the copy
    r = subprocess.run(
        ["bash", "-c", "source scripts/env.sh && env -0"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CDPATH": "."},
        capture_output=True,
        text=True,
        check=True,
    )
    got = dict(item.split("=", 1) for item in r.stdout.split("\0") if "=" in item)
    assert got["PATH"].split(":")[0] == f"{tmp_path}/.tools/bin"
    assert got["PULUMI_HOME"] == f"{tmp_path}/.tools/pulumi-home"
    assert got["PULUMI_BACKEND_URL"] == f"file://{tmp_path}/state"


def test_env_sh_keeps_the_users_settings(tmp_path: Path) -> None:
    mine = {
        "PATH": "/usr/bin:/bin",
        "PULUMI_HOME": "/somewhere/home",
        "PULUMI_BACKEND_URL": "file:///somewhere/state",
        "PULUMI_CONFIG_PASSPHRASE": "",  # set, even empty, is the user's choice
        "PULUMI_SKIP_UPDATE_CHECK": "false",
    }
    got, err = _source_env(tmp_path, mine)
    for key in ("PULUMI_HOME", "PULUMI_BACKEND_URL", "PULUMI_CONFIG_PASSPHRASE"):
        assert got[key] == mine[key]
    assert got["PULUMI_SKIP_UPDATE_CHECK"] == "false"
    assert "PULUMI_CONFIG_PASSPHRASE_FILE" not in got
    assert not (tmp_path / ".tools" / "passphrase").exists()
    assert not (tmp_path / "state").exists()
    assert err == "k3scluster: Pulumi state in local files: file:///somewhere/state (this machine only; README, \"Several operators\")\n"

    with_file, _ = _source_env(tmp_path, {"PATH": "/bin", "PULUMI_CONFIG_PASSPHRASE_FILE": "/k"})
    assert with_file["PULUMI_CONFIG_PASSPHRASE_FILE"] == "/k"
    assert not (tmp_path / ".tools" / "passphrase").exists()


def _language_host():
    path = str(ROOT / "scripts" / "pulumi-language-python")
    loader = importlib.machinery.SourceFileLoader("pulumi_language_python", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "address"),
    [
        (["127.0.0.1:1234"], "127.0.0.1:1234"),
        (["--logtostderr", "-v=9", "--tracing", "http://t:1", "127.0.0.1:5"], "127.0.0.1:5"),
        (
            ["-root=/p", "-binary", "--virtualenv", "venv", "-tracing=x", "127.0.0.1:6"],
            "127.0.0.1:6",
        ),
        ([], ""),
    ],
)
def test_language_host_ignores_flags_and_takes_the_engine_address(argv, address) -> None:
    assert _language_host().parse_args(argv) == address


def test_language_host_prints_its_port_and_serves(tmp_path: Path) -> None:
    require_engine()  # the installed host carries the right Python in its shebang
    host = ROOT / ".tools" / "bin" / "pulumi-language-python"
    proc = subprocess.Popen(
        [str(host), "-tracing", "x", "127.0.0.1:9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert 0 < port < 65536
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = language_pb2_grpc.LanguageRuntimeStub(channel)
            assert stub.GetPluginInfo(empty_pb2.Empty(), timeout=30).version == VERSION[1:]
            req = language_pb2.GetRequiredPackagesRequest()
            assert list(stub.GetRequiredPackages(req, timeout=30).packages) == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_env_sh_keeps_a_shared_backend_and_says_which_without_its_password(
    tmp_path: Path,
) -> None:
    url = "postgres://pulumi:s3cr3t@db.lan:5432/pulumi?sslmode=require"
    got, err = _source_env(
        tmp_path, {"PATH": "/usr/bin:/bin", "PULUMI_BACKEND_URL": url, "PULUMI_CONFIG_PASSPHRASE": ""}
    )
    assert got["PULUMI_BACKEND_URL"] == url
    assert "Pulumi state at postgres://pulumi:****@db.lan:5432/pulumi?sslmode=require" in err
    assert "s3cr3t" not in err
    assert not (tmp_path / "state").exists()


def test_env_sh_keeps_the_backend_of_pulumi_login(tmp_path: Path) -> None:
    home = tmp_path / "ph"
    home.mkdir()
    (home / "credentials.json").write_text(
        '{\n    "current": "postgres://ann:pw@db.lan/pulumi",\n    "accessTokens": {}\n}\n'
    )
    got, err = _source_env(
        tmp_path, {"PATH": "/usr/bin:/bin", "PULUMI_HOME": str(home), "PULUMI_CONFIG_PASSPHRASE": ""}
    )
    assert "PULUMI_BACKEND_URL" not in got  # pulumi uses its login
    assert "Pulumi state at postgres://ann:****@db.lan/pulumi" in err
    assert not (tmp_path / "state").exists()


STEP_PROGRAM = '''
import pulumi

from k3scluster.components.steps import step

config = pulumi.Config()
log = config.require("log")
step(
    "s",
    runner="python",
    host="h",
    create=["sh", "-c", 'echo "create $WHERE" >> "$LOG"'],
    delete=["sh", "-c", 'echo "delete" >> "$LOG"'],
    environment={"LOG": log, "WHERE": config.require("where")},
    secret_environment={"TOKEN": config.require_secret("token")},
    triggers=[config.require("where")],
)
'''


@pytest.mark.integration
@pytest.mark.root
def test_python_step_runs_again_for_a_secret_alone_and_is_replaced_for_a_trigger(
    tmp_path: Path,
) -> None:
    """runner.StepProvider.diff answers a change "unknown" (c5e882d): the engine then decides
    by diffing the step's old and new inputs itself. A change of nothing but a secret input
    (a rotated token, a secret in the engine's diff) still runs the step; a trigger still
    replaces it, delete before create; nothing changed runs nothing."""
    require_engine()
    d = tmp_path / "proj"
    d.mkdir()
    (d / "Pulumi.yaml").write_text(f"name: {PROJECT}\nruntime: python\n")
    (d / "__main__.py").write_text(textwrap.dedent(STEP_PROGRAM))
    log = tmp_path / "log"
    _ok(run_pulumi(["stack", "init", STACK, "--non-interactive"], cwd=d))
    for key, value in (("log", str(log)), ("where", "10.0.0.1")):
        _ok(run_pulumi(["config", "set", key, value], cwd=d))
    _ok(run_pulumi(["config", "set", "--secret", "token", "first-token"], cwd=d))
    up = ["up", "--yes", "--non-interactive", "--skip-preview"]
    _ok(run_pulumi(up, cwd=d))
    assert log.read_text().splitlines() == ["create 10.0.0.1"]
    _ok(run_pulumi(up, cwd=d))
    assert log.read_text().splitlines() == ["create 10.0.0.1"]

    _ok(run_pulumi(["config", "set", "--secret", "token", "rotated-token"], cwd=d))
    preview = json.loads(_ok(run_pulumi(["preview", "--json", "--non-interactive"], cwd=d)))
    ops = {s["urn"].split("::")[-1]: s["op"] for s in preview["steps"]}
    assert ops.get("s") == "update", ops
    _ok(run_pulumi(up, cwd=d))
    assert log.read_text().splitlines() == ["create 10.0.0.1"] * 2
    assert "rotated-token" not in json.dumps(_state(d))

    _ok(run_pulumi(["config", "set", "where", "10.0.0.2"], cwd=d))
    _ok(run_pulumi(up, cwd=d))
    assert log.read_text().splitlines() == ["create 10.0.0.1"] * 2 + ["delete", "create 10.0.0.2"]
