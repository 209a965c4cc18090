"""``nix store diff-closures`` output, read into per-package changes and summarised per host.

The format is Nix's ``printClosureDiff`` (src/nix/diff-closures.cc): one line per package name
whose set of versions changed or whose size changed by at least 8 KiB, names sorted::

    <name>: <removed versions> → <added versions>, <size delta>
    <name>: <size delta>

Versions of one side are joined by ``", "``; no version is ``∅``, an empty version ``ε``. The
size delta is coloured (ANSI red when it grew, green when it shrank) and written
``%+.1f KiB`` by older Nix such as Debian's 2.8 (``+13.9 KiB``), by current Nix with
``renderSize`` (``13.9 KiB``, ``-6.4 MiB``: a unit that fits, no ``+``). Pure: nothing here
runs a command.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

EMPTY = "∅"
EPSILON = "ε"
ARROW = " → "
# the kernel's package in a NixOS system closure (``linux-6.12.30``, ``-modules``): a change
# of it needs a reboot before the host runs it
KERNEL_PACKAGES = ("linux",)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SIZE = re.compile(r"(?:^|, )([+-]?\d+(?:\.\d+)?) ([KMGTPE])iB$")
_UNITS = "KMGTPE"


@dataclass(frozen=True)
class PackageChange:
    """One line of ``diff-closures``: a package's versions before and after, its size delta."""

    name: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    size_delta: int  # bytes, as rounded by Nix's output (0 when it printed none)

    @property
    def added(self) -> bool:
        return not self.before and bool(self.after)

    @property
    def removed(self) -> bool:
        return bool(self.before) and not self.after

    @property
    def is_kernel(self) -> bool:
        return self.name in KERNEL_PACKAGES

    def versions(self) -> str:
        if not self.before and not self.after:
            return "(size only)"
        return f"{_show(self.before)}{ARROW}{_show(self.after)}"


def _show(versions: tuple[str, ...]) -> str:
    return ", ".join(v or EPSILON for v in versions) if versions else EMPTY


def _versions(text: str) -> tuple[str, ...]:
    text = text.strip()
    if text == EMPTY:
        return ()
    return tuple("" if v == EPSILON else v for v in text.split(", "))


def _bytes(number: str, unit: str) -> int:
    return round(float(number) * 1024 ** (_UNITS.index(unit) + 1))


def _parse_line(raw: str) -> PackageChange | None:
    """One ``diff-closures`` line as a change; None when it is not one."""
    line = _ANSI.sub("", raw).strip()
    name, sep, rest = line.partition(": ")
    if not sep or not name or not rest:
        return None
    size = 0
    m = _SIZE.search(rest)
    if m:
        size = _bytes(m.group(1), m.group(2))
        rest = rest[: m.start()]
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    if rest:
        left, arrow, right = rest.partition(ARROW)
        if not arrow:
            return None  # not a diff-closures line
        before, after = _versions(left), _versions(right)
    elif not m:
        return None
    return PackageChange(name, before, after, size)


def parse_diff_closures(text: str) -> list[PackageChange]:
    """The changes in ``nix store diff-closures`` output; lines that are not one are skipped
    (:func:`unread_lines` names them)."""
    return [c for c in map(_parse_line, text.splitlines()) if c is not None]


def unread_lines(text: str) -> list[str]:
    """The non-empty lines of ``diff-closures`` output that are not a change as this reads
    them (a format this does not know): a summary without them may miss changes."""
    return [
        _ANSI.sub("", ln).strip()
        for ln in text.splitlines()
        if ln.strip() and _parse_line(ln) is None
    ]


def render_size(delta: int) -> str:
    """A signed size the way a person reads it: ``+1.2 MiB``, ``-300.0 KiB``."""
    value, unit = abs(delta) / 1024, 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{'-' if delta < 0 else '+'}{value:.1f} {_UNITS[unit]}iB"


@dataclass(frozen=True)
class HostChanges:
    """What a host's next deploy changes, from the closure diff of its deployed and built system."""

    host: str
    changes: tuple[PackageChange, ...]

    @property
    def kernel(self) -> PackageChange | None:
        return next((c for c in self.changes if c.is_kernel), None)

    @property
    def size_delta(self) -> int:
        return sum(c.size_delta for c in self.changes)

    def lines(self) -> list[str]:
        """The host's summary: a headline, then one line per package (name, versions, size)."""
        versioned = [c for c in self.changes if c.before or c.after]
        if not self.changes:
            return [f"{self.host}: no package changes"]
        head = (
            f"{self.host}: {len(versioned)} package(s) change, "
            f"{len(self.changes) - len(versioned)} only in size, "
            f"{render_size(self.size_delta)} in all"
        )
        k = self.kernel
        if k is not None:
            head += f"; the kernel changes ({k.versions()}): needs a reboot"
        width = max(len(c.name) for c in self.changes)
        vwidth = max(len(_label(c)) for c in self.changes)
        body = [
            f"  {c.name.ljust(width)}  {_label(c).ljust(vwidth)}  "
            + (render_size(c.size_delta) if c.size_delta else "")
            for c in self.changes
        ]
        return [head, *(b.rstrip() for b in body)]


def _label(c: PackageChange) -> str:
    extra = " (added)" if c.added else " (removed)" if c.removed else ""
    return c.versions() + extra


def summarise(host: str, changes: Iterable[PackageChange]) -> HostChanges:
    """The host's changes, versioned ones first (the kernel at the top), then size-only ones."""
    ordered = sorted(
        changes,
        key=lambda c: (not c.is_kernel, not (c.before or c.after), c.name),
    )
    return HostChanges(host, tuple(ordered))
