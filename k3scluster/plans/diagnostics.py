"""The one diagnostics collector every reader reports into, and what ``load`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from k3scluster.errors import Diagnostic, Severity
from k3scluster.model import Cluster
from k3scluster.plans.rules import RULES, WARNING_RULES


@dataclass(frozen=True)
class LoadResult:
    """What ``load`` found: the cluster (None when there is any error) and every diagnostic."""

    cluster: Cluster | None
    diagnostics: tuple[Diagnostic, ...]
    # the rule id of each diagnostic, in the same order (see RULES)
    rules: tuple[str, ...] = field(default=(), compare=False)

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_error)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if not d.is_error)

    @property
    def ok(self) -> bool:
        return not self.errors


class Diagnostics:
    """Collects every diagnostic of one pass, each under a rule id of ``RULES``."""

    def __init__(self) -> None:
        self.found: list[tuple[str, Diagnostic]] = []

    def yaml_error(self, rule: str, file: str, exc: yaml.MarkedYAMLError, hint: str) -> None:
        """A YAML parse error at the line PyYAML marks (1 when it marks none)."""
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        self.error(rule, file, line, f"not valid YAML: {exc.problem or exc.context}", hint)

    def error(self, rule: str, file: str, line: int, message: str, hint: str = "") -> None:
        self._add(rule, Diagnostic(file, line, message, Severity.ERROR, hint))

    def warn(self, rule: str, file: str, line: int, message: str, hint: str = "") -> None:
        self._add(rule, Diagnostic(file, line, message, Severity.WARNING, hint))

    def _add(self, rule: str, diag: Diagnostic) -> None:
        assert rule in RULES and (rule in WARNING_RULES) == (not diag.is_error), rule
        self.found.append((rule, diag))

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for _, d in self.found)

    def result(self, cluster: Cluster | None) -> LoadResult:
        """Every diagnostic sorted by file and line (a stable sort: same line, found order)."""
        ordered = sorted(self.found, key=lambda rd: (rd[1].file, rd[1].line))
        return LoadResult(cluster, tuple(d for _, d in ordered), tuple(r for r, _ in ordered))
