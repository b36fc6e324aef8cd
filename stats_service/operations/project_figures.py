"""``project_figures``: a project's figures, combining its files' statistics (never their matrices)."""
from __future__ import annotations

import io
from collections import Counter

from common.errors import LabvaultError
from stats_service.catalog import ANNDATA
from stats_service.operations.anndata_qc import CELLS
from stats_service.operations.base import PROJECT_INPUT, Operation


class ProjectFigures(Operation):
    name = "project_figures"
    version = "1"
    description = ("Figures of a whole project: its AnnData files' QC statistics side by side (violins, "
                   "scatter plots, knee, cells per sample and cell type, embeddings), drawn from each "
                   "file's stored statistics.")
    input_schema = PROJECT_INPUT
    applies_to = ("project",)

    def input_files(self, inputs, catalog):
        return [record for record in super().input_files(inputs, catalog) if record.kind == ANNDATA]

    def run(self, context):
        from stats_service import figures
        from stats_service.anndata_qc import AnnDataStats
        items, skipped = [], {}
        for position, record in enumerate(context.files):
            run = context.obtain("anndata_qc", {"file_id": record.file_id})
            if run.state != "ok":
                skipped[record.path] = {"code": run.error_code, "message": run.error_message}
                continue
            stats = AnnDataStats.load(io.BytesIO(context.output_bytes(run, CELLS)))
            items.append((record.path, stats))
            context.progress(60 * (position + 1) / max(1, len(context.files)), f"{record.path} loaded")
        if not items:
            raise LabvaultError("no AnnData file of the project has statistics", code="no_inputs")
        pngs, errors = figures.make_project_figures(items, f"project {context.inputs['project']}")
        for name, png in pngs.items():
            context.add_output(f"{name}.png", png, "image/png")
        samples, cell_types = Counter(), Counter()
        for _, stats in items:
            summary = stats.summary()
            samples.update(summary.get("cells_per_sample") or {})
            cell_types.update(summary.get("cells_per_cell_type") or {})
        return {"stats": {"cells": sum(stats.n_obs for _, stats in items), "files": len(items),
                          "cells_per_sample": dict(samples), "cells_per_cell_type": dict(cell_types)},
                "figure_errors": errors, "skipped_files": skipped}
