"""A preview a person can read (the real engine on the example, with the colmena stand-in).

A host's plan values are in clear in its deploy step, digests are short, and ``pulumi preview
--diff`` prints only what changed: a re-addressed host shows its old and new address on one
``=>`` line, the first preview of the example stays short, and no secret is ever in clear.
(Pulumi still prints the unchanged keys of a changed map: a dynamic provider cannot return a
detailed diff, so the engine shows the whole ``plan`` and ``inputs`` of an updated step.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from engine import netns_available, require_engine
from test_pulumi_integration import POISON_HASH, POISON_TOKEN, STACK, Project

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    require_engine()
    if not netns_available():
        pytest.skip("needs root, unshare and ip for a loopback-only network namespace")
    return Project(tmp_path)


def _preview_diff(project: Project) -> list[str]:
    r = project.pulumi("preview", "--diff", "--stack", STACK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert POISON_TOKEN not in r.stdout + r.stderr and POISON_HASH not in r.stdout + r.stderr
    return r.stdout.splitlines()


def test_a_re_addressed_host_reads_like_a_sentence(project: Project) -> None:
    first = _preview_diff(project)
    assert len(first) < 200, "\n".join(first)  # 5 hosts; it was about 615 lines
    assert not re.search(r"[0-9a-f]{64}", "\n".join(first))
    project.up()
    hosts = project.cluster / "plans" / "hosts.csv"
    hosts.write_text(hosts.read_text().replace("karl,eni1,10.0.100.5,", "karl,eni1,10.0.100.50,"))
    lines = _preview_diff(project)
    text = "\n".join(lines)
    assert len(lines) < 80, text
    # old and new address on one line, in the deploy step's plan
    assert re.search(r'address\s*: "10\.0\.100\.5" => "10\.0\.100\.50"', text), text
    # digests are short: no 64-hex sha256 anywhere (unchanged keys of a changed map are still
    # printed: the dynamic provider cannot hand the engine a detailed diff)
    assert not re.search(r"[0-9a-f]{64}", text), text
    assert re.search(r'file:hosts/karl\.nix\s*: "[0-9a-f]{12}" => "[0-9a-f]{12}"', text), text
    # only karl changes
    assert "karl-deploy" in text and not re.search(r"(olaf|ulf|rolf|ulrich)-deploy", text), text
    state = project.state_text()
    assert POISON_TOKEN not in state and POISON_HASH not in state
