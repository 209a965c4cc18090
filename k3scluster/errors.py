"""One error type for user mistakes, and diagnostics that point at file:line.

Nothing here imports pulumi: the CLI and the Pulumi program both turn these into
their own way of ending (exit 1 with a list, or ``pulumi.RunError``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Severity(enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem in a cluster directory.

    ``file`` is relative to the cluster directory; ``line`` is 1-based (0 only
    for problems that belong to no line, such as a missing directory).
    """

    file: str
    line: int
    message: str
    severity: Severity = Severity.ERROR
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        prefix = "warning: " if self.severity is Severity.WARNING else ""
        text = f"{where}: {prefix}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "severity": self.severity.value,
            "message": self.message,
            "hint": self.hint,
        }

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR


class K3sClusterError(Exception):
    """A mistake the user can fix: printed as a message and a hint, never a traceback."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f"\n  hint: {self.hint}" if self.hint else "")


class PlanError(K3sClusterError):
    """The plans have errors; carries every diagnostic found in one pass."""

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        errors = [d for d in self.diagnostics if d.is_error]
        super().__init__(
            f"{len(errors)} error(s) in the cluster plans:\n"
            + "\n".join(str(d) for d in self.diagnostics)
        )
