"""Reading a CSV plan (hosts.csv, k3s.csv) into a ``Table``: syntax, header, field counts.

Comment lines (``#``) and blank lines are skipped but keep the line numbers true; names and
values are stripped and lowercased.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from k3scluster.plans.files import Files

_QUOTE_HINT = "close the quote, or remove it: plan values need no quotes"


@dataclass
class Table:
    header: tuple[str, ...]
    header_line: int
    rows: list[tuple[int, dict[str, str], tuple[tuple[str, str], ...]]]
    names: list[str] = field(default_factory=list)  # 'name' of every row, even a broken one


@dataclass
class _Rows:
    """The rows read so far: where each good row is, and which rows miscount."""

    seen: dict[tuple[str, ...], int] = field(default_factory=dict)  # values -> first line
    miscounted: list[tuple[int, int]] = field(default_factory=list)  # (line, fields)


class Tables(Files):
    def read_table(
        self, rel: str, text: str, required: tuple[str, ...], reserved: dict[str, str] | None = None
    ) -> Table | None:
        """The table of ``text``; None when it cannot be used (reported)."""
        table: Table | None = None
        ok_header = True
        rows = _Rows()
        for row in self._csv_rows(rel, text):
            if row is None:  # a syntax error (reported): report the rows before it too
                if ok_header:
                    self._report_field_counts(rel, table, rows.miscounted)
                return None
            start, values = row
            if table is None:
                table = Table(tuple(values), start, [])
                ok_header = self._check_header(rel, table, required, reserved or {})
            else:
                self._add_row(rel, table, start, values, rows)
        if table is None:
            return Table((), 0, [])  # nothing but comments and blank lines
        if not ok_header:
            return None  # field counts against a header in doubt would only echo it
        if len(rows.miscounted) >= 2 and not table.rows:
            self._report_header_count(rel, table, rows.miscounted)
            return None
        self._report_field_counts(rel, table, rows.miscounted)
        return table if self._check_ip_column(rel, table) else None

    def _check_ip_column(self, rel: str, table: Table) -> bool:
        """False (one error at the header) when the header names the columns in another order
        than the rows hold them: no row's ip is an address, but another column's is in every row
        (else every row would fail twice, its ip and the column the address is in)."""
        good = table.rows
        if "ip" not in table.header or len(good) < 2 or any(_is_ip(v["ip"]) for _, v, _ in good):
            return True
        holders = [c for c in table.header if all(_is_ip(v[c]) for _, v, _ in good)]
        if not holders:
            return True  # the addresses are missing or wrong, row by row
        self.error(
            "csv-header",
            rel,
            table.header_line,
            f"column 'ip' holds no address, but column {holders[0]!r} holds one in every row",
            "the header names the columns in another order than the rows hold them: put each "
            "name above its values",
        )
        return False

    def _csv_rows(self, rel: str, text: str) -> Iterator[tuple[int, list[str]] | None]:
        """(line, values) of each row that is not blank; None after reporting a syntax error."""

        def lines() -> Iterator[str]:
            # comment lines become blank lines, so csv's line_num stays the file's line
            for line in io.StringIO(text, newline=""):
                yield "\n" if line.lstrip().startswith("#") else line

        reader = csv.reader(lines(), strict=True)
        while True:
            start = reader.line_num + 1
            try:
                raw = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if str(exc) == "unexpected end of data":  # the file ends inside a quote
                    message, line = 'a quote (") opened in this row is not closed', start
                else:
                    message, line = f"not valid CSV: {exc}", reader.line_num or start
                self.error("csv-syntax", rel, line, message, _QUOTE_HINT)
                yield None
                return
            if any("\n" in v or "\r" in v for v in raw):
                self.error(
                    "csv-syntax",
                    rel,
                    start,
                    'a quote (") opened in this row is not closed',
                    _QUOTE_HINT,
                )
                yield None
                return
            values = [v.strip().lower() for v in raw]
            if any(values):
                yield start, values

    def _check_header(
        self, rel: str, table: Table, required: tuple[str, ...], reserved: dict[str, str]
    ) -> bool:
        """Whether the header can be used: names set, unique, not reserved, none missing."""
        start = table.header_line
        ok_header = True
        seen: set[str] = set()
        for i, name in enumerate(table.header, 1):
            if not name:
                ok_header = False
                self.error(
                    "csv-header",
                    rel,
                    start,
                    f"column {i} of the header has no name",
                    "name the column or delete it (and its values)",
                )
            elif name in seen:
                ok_header = False
                self.error(
                    "csv-header",
                    rel,
                    start,
                    f"column {name!r} appears twice",
                    "keep one column of each name",
                )
            elif name in reserved:
                ok_header = False
                self.error(
                    "csv-header",
                    rel,
                    start,
                    f"column {name!r} is reserved",
                    f"rename it: {reserved[name]}",
                )
            seen.add(name)
        missing = [c for c in required if c not in seen]
        if missing:
            ok_header = False
            self.error(
                "csv-column-missing",
                rel,
                start,
                f"missing column(s): {', '.join(missing)}",
                f"the header needs at least: {','.join(required)}"
                + (
                    " (columns are separated by commas, not semicolons or tabs)"
                    if len(table.header) == 1 and re.search(r"[;\t]", table.header[0])
                    else ""
                ),
            )
        return ok_header

    def _add_row(self, rel: str, table: Table, start: int, values: list[str], rows: _Rows) -> None:
        if "name" in table.header and len(values) > table.header.index("name"):
            table.names.append(values[table.header.index("name")])
        if len(values) != len(table.header):
            rows.miscounted.append((start, len(values)))  # reported once all rows are read
            return
        earlier = rows.seen.get(tuple(values))
        if earlier is not None:
            self.error(
                "csv-row-duplicate",
                rel,
                start,
                f"this row repeats line {earlier}",
                "delete one of the two rows (a copied row must get its own name and address)",
            )
            return
        rows.seen[tuple(values)] = start
        columns = tuple(zip(table.header, values))
        table.rows.append((start, dict(columns), columns))

    def _report_field_counts(
        self, rel: str, table: Table | None, miscounted: list[tuple[int, int]]
    ) -> None:
        for start, fields in miscounted:
            assert table is not None
            self.error(
                "csv-field-count",
                rel,
                start,
                f"{fields} fields, but the header has {len(table.header)}",
                "give every row one value per header column (leave optional ones empty: a,b,,d)",
            )

    def _report_header_count(
        self, rel: str, table: Table, miscounted: list[tuple[int, int]]
    ) -> None:
        """No row has the header's number of fields: the header is what is wrong, once."""
        columns = len(table.header)
        counts = sorted({fields for _, fields in miscounted})
        if len(counts) == 1:
            message = f"the header names {columns} columns, but every row has {counts[0]} fields"
        else:
            message = f"the header names {columns} columns, but no row has {columns} fields"
        if counts[0] > columns:
            hint = (
                "a column name is missing from the header, or two are joined (by ';' or a "
                "space instead of a comma): write one name per column, separated by commas"
            )
        elif counts[-1] < columns:
            hint = (
                "the header names more columns than the rows have values: delete the extra "
                "names, or give every row a value for each (empty ones: a,b,,d)"
            )
        else:
            hint = "give the header one name per column, and every row one value per column"
        self.error("csv-field-count", rel, table.header_line, message, hint)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True
