"""The one way plan data becomes Nix text.

Templates carry the structure of the generated Nix; every value that comes from
the plans passes through :func:`nix_value` (the Jinja2 filter ``nix``), so no plan
value can ever be read by Nix as code: strings are double-quoted with ``\\``,
``"``, ``${`` and control characters escaped, paths back into the cluster
directory become relative path literals.

Like nixops' ``py2nix``: small, pure and tested on its own (tests/test_nix.py
evaluates the output with ``nix-instantiate``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Characters a Nix path literal may hold (nix lexer: PATH_CHAR = [a-zA-Z0-9\.\_\-\+]).
_PATH_LITERAL = re.compile(r"^\.{1,2}(/[A-Za-z0-9._+-]+)+$")
# Attribute names that need no quotes (and are not keywords).
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]*$")
_KEYWORDS = frozenset({"if", "then", "else", "assert", "with", "let", "in", "rec", "inherit", "or"})

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
# what may need an escape: the characters above and ``$`` (only ``${`` is escaped)
_MAY_ESCAPE = re.compile(r'[\\"\n\t\r$\0]')


@dataclass(frozen=True)
class NixPath:
    """A path relative to the file it is written in, e.g. ``../../nixConfigs/olaf.nix``.

    Rendered as a Nix path literal when it can be one, else as
    ``(./. + "/<path>")``, which Nix resolves the same way.
    """

    relpath: str

    def __post_init__(self) -> None:
        if not self.relpath or self.relpath.startswith("/"):
            raise ValueError(f"NixPath wants a relative path, got {self.relpath!r}")


def nix_string(s: str) -> str:
    """``s`` as a double-quoted Nix string that evaluates to exactly ``s``.

    Escapes ``\\``, ``"``, ``${`` (so nothing interpolates) and newline, tab and
    carriage return. Nix strings cannot hold NUL, so a NUL is refused.
    """
    if _MAY_ESCAPE.search(s) is None:  # most plan values: nothing to escape
        return '"' + s + '"'
    if "\0" in s:
        raise ValueError("a Nix string cannot contain a NUL character")
    out = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "$" and s.startswith("${", i):
            out.append("\\${")
            i += 2
            continue
        out.append(_ESCAPES.get(c, c))
        i += 1
    return '"' + "".join(out) + '"'


def nix_attr_name(name: str) -> str:
    """An attribute name: bare when it is a plain identifier, quoted otherwise."""
    if _IDENT.match(name) and name not in _KEYWORDS:
        return name
    return nix_string(name)


def nix_path(p: NixPath) -> str:
    rel = p.relpath if p.relpath.startswith(".") else "./" + p.relpath
    if _PATH_LITERAL.match(rel) and "//" not in rel:
        return rel
    return "(./. + " + nix_string("/" + p.relpath) + ")"


def nix_value(v: object) -> str:
    """Any plan value as a Nix expression (one line).

    str -> string, bool -> true/false, int -> integer, None -> null,
    NixPath -> path, list/tuple -> list, Mapping -> attribute set (sorted keys).
    """
    if isinstance(v, NixPath):
        return nix_path(v)
    if isinstance(v, str):
        return nix_string(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if v is None:
        return "null"
    if isinstance(v, Mapping):
        if not v:
            return "{ }"
        items = " ".join(
            f"{nix_attr_name(str(k))} = {nix_value(v[k])};" for k in sorted(v, key=str)
        )
        return "{ " + items + " }"
    if isinstance(v, Sequence):
        if not v:
            return "[ ]"
        return "[ " + " ".join(_list_item(x) for x in v) + " ]"
    raise TypeError(f"no Nix form for {type(v).__name__}: {v!r}")


def _list_item(x: object) -> str:
    # A path literal needs no parentheses; everything nix_value emits is atomic
    # (quoted, bracketed, braced or parenthesised) except negative integers.
    text = nix_value(x)
    return f"({text})" if text.startswith("-") else text
