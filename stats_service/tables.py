"""Statistics of a CSV/TSV file, read as a stream (two passes, never the whole file).

Pass 1 counts rows, infers each column's type and finds numeric min, max and mean;
pass 2 bins numeric columns into equal-width histograms between that min and max.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

from stats_service.errors import INVALID_TABLE, StatsInputError

MAX_COLUMNS = 1000
MAX_CELL = 64 * 1024          # characters in one field
SNIFF_BYTES = 1024
NULLS = frozenset({"", "na", "nan", "null", "none", "n/a"})
TRUE_FALSE = frozenset({"true", "false", "t", "f", "yes", "no"})
# Type lattice: a column takes the most general type any of its values needs.
_RANK = {"empty": 0, "boolean": 1, "integer": 2, "float": 3, "string": 4}


def compute_table(path, *, delimiter: str | None = None, max_histogram_bins: int = 20,
                  progress: Callable[[float, str], None] | None = None) -> dict:
    """Rows, columns and per-column type, nulls and (numeric) min/max/mean/histogram."""
    report = progress or (lambda fraction, message: None)
    path = Path(path)
    size = max(1, path.stat().st_size)
    delimiter = delimiter or _delimiter(path)
    # The csv module's limit is process-wide; every table read here wants the same cap.
    csv.field_size_limit(MAX_CELL)

    columns: list[dict] = []
    n_rows = 0
    with _open(path) as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        header = _next(reader)
        if header is None:
            raise StatsInputError("The table is empty.", code=INVALID_TABLE)
        if len(header) > MAX_COLUMNS:
            raise StatsInputError(f"The table has more than {MAX_COLUMNS} columns.",
                                  code=INVALID_TABLE)
        columns = [{"name": name.strip() or f"column_{i + 1}", "type": "empty", "nulls": 0,
                    "_sum": 0.0, "_n": 0, "min": None, "max": None} for i, name in
                   enumerate(header)]
        for row in _rows(reader, len(header)):
            n_rows += 1
            for column, value in zip(columns, row):
                _observe(column, value)
            if n_rows % 100_000 == 0:
                report(0.5 * min(1.0, f.buffer.tell() / size), f"{n_rows} rows read")

    numeric = [c for c in columns if c["type"] in ("integer", "float") and c["_n"]]
    if numeric:
        _histograms(path, delimiter, columns, max_histogram_bins, report, size)
    for column in columns:
        n = column.pop("_n")
        total = column.pop("_sum")
        column.pop("_counts", None)
        if column["type"] in ("integer", "float") and n:
            column["mean"] = total / n
        else:
            column["min"] = column["max"] = None
    report(1.0, "table statistics done")
    return {"rows": n_rows, "n_columns": len(columns), "delimiter": delimiter,
            "columns": columns}


def _delimiter(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if ".tsv" in suffixes or ".tab" in suffixes:
        return "\t"
    with _open(path) as f:
        try:
            sample = f.read(SNIFF_BYTES)
        except UnicodeDecodeError as exc:
            raise StatsInputError("The table is not UTF-8 text.", code=INVALID_TABLE) from exc
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def _open(path: Path):
    # utf-8-sig drops a byte-order mark; newline="" lets csv see quoted line breaks.
    return open(path, encoding="utf-8-sig", newline="")


def _next(reader):
    try:
        return next(reader)
    except StopIteration:
        return None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise _malformed(exc, reader) from exc


def _rows(reader, width: int):
    while True:
        row = _next(reader)
        if row is None:
            return
        if not row:
            continue
        if "\x00" in "".join(row):
            raise StatsInputError("The table holds binary data.", code=INVALID_TABLE)
        if len(row) != width:
            raise StatsInputError(f"Line {reader.line_num} has {len(row)} fields, "
                                  f"the header {width}.", code=INVALID_TABLE)
        yield row


def _malformed(exc: Exception, reader) -> StatsInputError:
    if isinstance(exc, UnicodeDecodeError):
        return StatsInputError("The table is not UTF-8 text.", code=INVALID_TABLE)
    if "field larger" in str(exc):
        return StatsInputError(f"A field on line {reader.line_num} is longer than "
                               f"{MAX_CELL} characters.", code=INVALID_TABLE)
    if "NUL" in str(exc):
        return StatsInputError("The table holds binary data.", code=INVALID_TABLE)
    return StatsInputError(f"Malformed CSV on line {reader.line_num}.", code=INVALID_TABLE)


def _kind(value: str) -> tuple[str, float | None]:
    text = value.strip()
    low = text.lower()
    if low in NULLS:
        return "empty", None
    if low in TRUE_FALSE:
        return "boolean", None
    try:
        return "integer", float(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return "string", None
    return ("float", number) if math.isfinite(number) else ("string", None)


def _observe(column: dict, value: str) -> None:
    kind, number = _kind(value)
    if kind == "empty":
        column["nulls"] += 1
        return
    if _RANK[kind] > _RANK[column["type"]]:
        column["type"] = kind
    if number is not None:
        column["_n"] += 1
        column["_sum"] += number
        column["min"] = number if column["min"] is None else min(column["min"], number)
        column["max"] = number if column["max"] is None else max(column["max"], number)


def _histograms(path, delimiter, columns, bins, report, size) -> None:
    targets = [(i, c) for i, c in enumerate(columns)
               if c["type"] in ("integer", "float") and c["_n"]]
    for _, c in targets:
        lo, hi = c["min"], c["max"]
        n_bins = max(1, bins)
        if c["type"] == "integer":
            n_bins = max(1, min(n_bins, int(hi - lo) + 1))
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        c["_counts"] = [0] * n_bins
        c["histogram"] = {"edges": [lo + (hi - lo) * k / n_bins for k in range(n_bins + 1)],
                          "counts": c["_counts"]}
    with _open(path) as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        _next(reader)
        for n, row in enumerate(_rows(reader, len(columns))):
            for i, c in targets:
                kind, number = _kind(row[i])
                if number is None:
                    continue
                edges = c["histogram"]["edges"]
                lo, hi = edges[0], edges[-1]
                k = int((number - lo) / (hi - lo) * len(c["_counts"]))
                c["_counts"][min(max(k, 0), len(c["_counts"]) - 1)] += 1
            if n % 100_000 == 0:
                report(0.5 + 0.5 * min(1.0, f.buffer.tell() / size), "histograms")
