"""``table_stats``: rows, column types, nulls and histograms of one CSV or TSV file, streamed."""
from __future__ import annotations

from stats_service.operations.base import Operation


class TableStats(Operation):
    name = "table_stats"
    version = "1"
    description = ("Statistics of a CSV/TSV file read as a stream: row count, column types, null counts, "
                   "and min, max, mean and a histogram per numeric column.")
    applies_to = ("table",)

    def run(self, context):
        from stats_service import figures, tables
        record = context.files[0]
        path = context.fetch(record)
        result = tables.compute_table(path, progress=lambda fraction, message: context.progress(90 * fraction,
                                                                                                 message))
        pngs, errors = figures.make_table_figures(result, record.path)
        for name, png in pngs.items():
            context.add_output(f"{name}.png", png, "image/png")
        result["figure_errors"] = errors
        return result
