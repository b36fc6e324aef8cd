"""CSV/TSV statistics: types, nulls, numeric summaries, histograms, and bad input."""
from __future__ import annotations

import pytest

from stats_service.errors import StatsInputError
from stats_service.tables import compute_table


def by_name(result):
    return {c["name"]: c for c in result["columns"]}


def test_csv_types_nulls_and_histograms(tmp_path):
    path = tmp_path / "t.csv"
    lines = ["id,score,flag,label,blank"]
    for i in range(100):
        score = "NA" if i % 10 == 0 else f"{i / 4:.2f}"
        lines.append(f'{i},{score},{"true" if i % 2 else "false"},"name, {i}",')
    path.write_text("\n".join(lines) + "\n")
    seen = []
    result = compute_table(path, progress=lambda f, m: seen.append(f))
    assert result["rows"] == 100 and result["n_columns"] == 5 and result["delimiter"] == ","
    cols = by_name(result)
    assert cols["id"]["type"] == "integer"
    assert (cols["id"]["min"], cols["id"]["max"], cols["id"]["mean"]) == (0, 99, 49.5)
    assert sum(cols["id"]["histogram"]["counts"]) == 100
    assert len(cols["id"]["histogram"]["counts"]) == 20
    assert cols["score"]["type"] == "float" and cols["score"]["nulls"] == 10
    assert sum(cols["score"]["histogram"]["counts"]) == 90
    assert cols["flag"]["type"] == "boolean" and "histogram" not in cols["flag"]
    assert cols["label"]["type"] == "string" and cols["label"]["min"] is None
    assert cols["blank"]["type"] == "empty" and cols["blank"]["nulls"] == 100
    assert seen[-1] == 1.0


def test_tsv_by_extension_and_small_integer_range(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("a\tb\n" + "".join(f"{i % 3}\tx y\n" for i in range(30)))
    result = compute_table(path, max_histogram_bins=50)
    assert result["delimiter"] == "\t"
    hist = by_name(result)["a"]["histogram"]
    assert hist["counts"] == [10, 10, 10]


def test_sniffed_semicolons_and_constant_column(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x;y\n" + "".join(f"5;{i}.5\n" for i in range(20)))
    result = compute_table(path)
    assert result["delimiter"] == ";"
    x = by_name(result)["x"]
    assert x["min"] == x["max"] == 5 and sum(x["histogram"]["counts"]) == 20


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00" * 40,            # binary junk
    b"a,b\n\xff\xfe\xfa,1\n",                                       # not UTF-8
    b"a,b\n1,2\n3\n",                                               # ragged row
    b'a,b\n"unterminated,2\n',                                      # bad quoting
    b"",                                                            # empty
])
def test_invalid_tables(tmp_path, content):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(StatsInputError) as caught:
        compute_table(path)
    assert caught.value.code == "invalid_table" and caught.value.status == 422
    assert str(tmp_path) not in caught.value.message


def test_too_many_columns_and_long_cells(tmp_path, monkeypatch):
    import stats_service.tables as tables
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(1001)) + "\n")
    with pytest.raises(StatsInputError, match="columns"):
        compute_table(wide)
    monkeypatch.setattr(tables, "MAX_CELL", 100)
    long = tmp_path / "long.csv"
    long.write_text("a\n" + "x" * 500 + "\n")
    with pytest.raises(StatsInputError, match="longer"):
        compute_table(long)
