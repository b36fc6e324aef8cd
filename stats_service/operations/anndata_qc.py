"""``anndata_qc``: QC statistics and figures of one ``.h5ad`` file, read in chunks."""
from __future__ import annotations

from stats_service.operations.base import Operation

CELLS = "cells.npz"


class AnnDataQC(Operation):
    name = "anndata_qc"
    version = "1"
    description = ("Per-file QC of an AnnData (.h5ad) file in bounded memory: counts, genes and percent "
                   "mitochondrial per cell, per-gene totals, the 20 most expressed genes, highly variable "
                   "genes and a PCA; figures (QC violins, scatter plots, knee, highest expressed genes, "
                   "cells per sample and cell type, UMAP and PCA embeddings).")
    applies_to = ("anndata",)

    def run(self, context):
        from stats_service import anndata_qc, figures
        record = context.files[0]
        path = context.fetch(record)
        context.progress(5, "file fetched")
        settings = context.settings
        stats = anndata_qc.compute(
            path, progress=lambda fraction, message: context.progress(5 + 80 * fraction, message),
            sample_keys=tuple(settings.getlist("stats", "sample_keys")) or anndata_qc.SAMPLE_KEYS,
            celltype_keys=tuple(settings.getlist("stats", "celltype_keys")) or anndata_qc.CELLTYPE_KEYS)
        context.add_output(CELLS, stats.to_bytes(), "application/octet-stream")
        context.progress(85, "drawing figures")
        pngs, errors = figures.make_figures(stats, record.path)
        for name, png in pngs.items():
            context.add_output(f"{name}.png", png, "image/png")
        context.add_output("highest_expressed_genes.tsv", figures.highest_expressed_genes_tsv(stats),
                           "text/tab-separated-values")
        result = stats.summary()
        result["figure_errors"] = errors
        return result
