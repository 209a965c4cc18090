"""k3scluster.nix: every value comes out of Nix exactly as it went in.

The oracle is Nix itself: the output is evaluated with ``nix-instantiate --eval``
and compared with the Python value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nixeval import nix_eval

from k3scluster.nix import NixPath, nix_attr_name, nix_string, nix_value

TRICKY = [
    "",
    "plain",
    'a "quoted" word',
    "back\\slash and \\\\ two",
    '${builtins.abort "x"}',
    '"${builtins.abort "x"}"',
    "$${double}",
    "\\${escaped already}",
    "$ { not one }",
    "ends with $",
    "ends with \\",
    "$",
    "${",
    "line one\nline two\n",
    "tab\there",
    "cr\r\nlf",
    "''${indented}''",
    "unicode: grüße, 東京, 🙂",
    "${x}${y}$${z}",
]


def test_tricky_strings_evaluate_to_themselves() -> None:
    expr = "[ " + " ".join(nix_string(s) for s in TRICKY) + " ]"
    assert nix_eval(expr) == TRICKY


def test_interpolation_is_escaped_not_evaluated() -> None:
    # would abort the evaluation if it were interpolated
    out = nix_string('${builtins.abort "boom"}')
    assert out == '"\\${builtins.abort \\"boom\\"}"'
    assert nix_eval(out) == '${builtins.abort "boom"}'


def test_nul_is_refused() -> None:
    with pytest.raises(ValueError):
        nix_string("a\0b")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))), max_size=5))
def test_any_text_round_trips(values: list[str]) -> None:
    expr = "[ " + " ".join(nix_string(s) for s in values) + " ]"
    assert nix_eval(expr) == values


def test_values() -> None:
    value = {
        "b": True,
        "f": False,
        "n": None,
        "i": 24,
        "neg": [-1, 2],
        "list": ["x", ["y"], {}],
        "empty": [],
        "needs quotes": "v",
        "in": "keyword as name",
        "${evil}": "name",
    }
    text = nix_value(value)
    assert "\n" not in text
    assert nix_eval(text) == value


def test_attr_names() -> None:
    assert nix_attr_name("plain_name-1") == "plain_name-1"
    assert nix_attr_name("in") == '"in"'
    assert nix_attr_name("a.b") == '"a.b"'
    assert nix_attr_name("${x}") == '"\\${x}"'


def test_unknown_type_is_refused() -> None:
    with pytest.raises(TypeError):
        nix_value(1.5)


@pytest.mark.parametrize(
    ("rel", "literal"),
    [
        ("../../nixConfigs/olaf.nix", True),
        ("./hosts/olaf.nix", True),
        ("hosts/olaf.nix", True),
        ("../secrets/my token", False),
        ("../secrets/we'ird\"${x}", False),
    ],
)
def test_paths_resolve_relative_to_the_file(tmp_path: Path, rel: str, literal: bool) -> None:
    text = nix_value(NixPath(rel))
    assert (not text.startswith("(")) is literal
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    expr_file = sub / "expr.nix"
    expr_file.write_text(f"toString {text}\n")
    got = nix_eval(f"import {expr_file}")
    want = (sub / rel).resolve() if not rel.startswith("./") else (sub / rel[2:]).resolve()
    assert got == str(want)


def test_absolute_path_is_refused() -> None:
    with pytest.raises(ValueError):
        NixPath("/etc/passwd")
