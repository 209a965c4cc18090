"""The real Pulumi engine (.tools/bin), offline, with the project's Python language host.

Each test works in a temporary project with a file backend, inside a loopback-only network
namespace (see tests/engine.py). Needs root and `scripts/bootstrap-pulumi` run first.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from engine import VERSION, engine_dirs, require_engine, run_pulumi

pytestmark = [pytest.mark.integration, pytest.mark.root]

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


def test_version_is_pinned() -> None:
    require_engine()
    r = run_pulumi(["version"], cwd=Path.cwd())
    assert _ok(r).strip() == VERSION


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


def test_program_error_fails_the_update(project: Path) -> None:
    main = project / "__main__.py"
    main.write_text(main.read_text() + '\nraise ValueError("deliberate failure")\n')
    r = run_pulumi(["up", "--yes", "--non-interactive"], cwd=project)
    assert r.returncode != 0
    assert "ValueError: deliberate failure" in r.stdout
    assert "__main__.py" in r.stdout


def test_config_secret_is_encrypted_at_rest(project: Path) -> None:
    secret = "s3cr3t-Value-9f8e7d"
    _ok(run_pulumi(["config", "set", "--secret", "token", secret], cwd=project))
    _ok(run_pulumi(["up", "--yes", "--non-interactive"], cwd=project))

    shown = json.loads(_ok(run_pulumi(["stack", "output", "--json"], cwd=project)))
    assert shown["token"] == "[secret]"
    assert shown["token_length"] == "[secret]"  # derived from a secret: stays secret
    revealed = json.loads(
        _ok(run_pulumi(["stack", "output", "--json", "--show-secrets"], cwd=project))
    )
    assert revealed["token"] == secret
    assert revealed["token_length"] == len(secret)

    dirs = engine_dirs(project)
    assert dirs.stack_file(PROJECT, STACK).is_file()
    at_rest = [p for p in dirs.state.rglob("*") if p.is_file()]
    at_rest.append(project / f"Pulumi.{STACK}.yaml")
    for p in at_rest:
        assert secret.encode() not in p.read_bytes(), f"secret in clear in {p}"


def test_dynamic_provider_create_update_delete(project: Path, tmp_path: Path) -> None:
    target = tmp_path / "written.txt"
    _ok(run_pulumi(["config", "set", "file_path", str(target)], cwd=project))
    _ok(run_pulumi(["config", "set", "file_content", "v1"], cwd=project))
    _ok(run_pulumi(["up", "--yes", "--non-interactive"], cwd=project))
    assert target.read_text() == "created:v1"
    outputs = json.loads(_ok(run_pulumi(["stack", "output", "--json"], cwd=project)))
    assert outputs["file_id"] == str(target)

    _ok(run_pulumi(["config", "set", "file_content", "v2"], cwd=project))
    preview = json.loads(_ok(run_pulumi(["preview", "--json", "--non-interactive"], cwd=project)))
    ops = {s["urn"].split("::")[-1]: s["op"] for s in preview["steps"]}
    assert ops["file"] == "update"
    assert target.read_text() == "created:v1"  # preview does not touch it

    _ok(run_pulumi(["up", "--yes", "--non-interactive"], cwd=project))
    assert target.read_text() == "updated:v2"

    _ok(run_pulumi(["destroy", "--yes", "--non-interactive"], cwd=project))
    assert not target.exists()
