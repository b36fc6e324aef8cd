"""Figures: every PNG decodes, the same statistics give the same bytes, failures stay local."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("h5py")

from matplotlib.image import imread  # noqa: E402

from stats_service import figures  # noqa: E402
from stats_service.anndata_qc import AnnDataStats  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def fake_stats(n: int = 500, seed: int = 0, celltypes: bool = True, umap: bool = True):
    rng = np.random.default_rng(seed)
    total = rng.lognormal(7, 1, n)
    genes = np.minimum(total, rng.lognormal(6, 0.5, n)).round()
    top = rng.choice(100, 20, replace=False)
    return AnnDataStats(
        n_obs=n, n_vars=100, nnz=n * 50, matrix="X", matrix_format="csr",
        gene_names=np.array([f"G{i}" for i in range(100)]),
        total_counts=total, n_genes_by_counts=genes, pct_counts_mt=rng.uniform(0, 20, n),
        pct_counts_in_top_20_genes=rng.uniform(20, 80, n),
        gene_total_counts=rng.lognormal(5, 2, 100), gene_n_cells_by_counts=rng.integers(0, n, 100),
        top_genes=top, top_gene_pct=rng.uniform(0, 10, (n, 20)).astype(np.float32),
        hvg=np.arange(50), pca=rng.normal(size=(n, 5)).astype(np.float32),
        pca_variance_ratio=np.array([0.3, 0.2, 0.1, 0.05, 0.01]),
        sample_key="sample", sample_codes=rng.integers(0, 3, n).astype(np.int32),
        sample_categories=np.array(["s1", "s2", "s3"]),
        celltype_key="cell_type" if celltypes else None,
        celltype_codes=rng.integers(0, 4, n).astype(np.int32) if celltypes else None,
        celltype_categories=np.array(["T", "B", "NK", "mono"]) if celltypes else None,
        umap=rng.normal(size=(n, 2)).astype(np.float32) if umap else None)


def assert_png(data: bytes):
    assert data.startswith(PNG) and len(data) > 1000
    image = imread(io.BytesIO(data), format="png")
    assert image.shape[1] >= 600


def test_file_figures_decode_and_are_deterministic():
    stats = fake_stats()
    made, errors = figures.make_figures(stats, "file A")
    assert errors == {}
    assert set(made) == {"qc_violins", "genes_vs_counts", "mito_vs_counts",
                         "highest_expressed_genes", "knee", "cells_per_sample", "cell_types",
                         "umap", "pca"}
    for png in made.values():
        assert_png(png)
    assert figures.file_figures(fake_stats(), "file A") == made


def test_figures_that_do_not_apply_are_left_out():
    made = figures.file_figures(fake_stats(celltypes=False, umap=False), "file B")
    assert "cell_types" not in made and "umap" not in made and "pca" in made


def test_project_figures():
    items = [("a.h5ad", fake_stats(seed=1)), ("b.h5ad", fake_stats(300, seed=2, celltypes=False))]
    made, errors = figures.make_project_figures(items, "project 7")
    assert errors == {}
    assert {"qc_violins", "genes_vs_counts", "knee", "cells_per_sample", "cell_types"} <= set(made)
    for png in made.values():
        assert_png(png)


def test_one_failing_figure_leaves_the_others(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("no\nluck")
    monkeypatch.setattr(figures, "_knee", broken)
    made, errors = figures.make_figures(fake_stats(), "file C")
    assert "knee" not in made and "qc_violins" in made
    assert errors["knee"]["code"] == "figure_failed" and "\n" not in errors["knee"]["message"]


def test_highest_expressed_genes_tsv():
    stats = fake_stats()
    lines = figures.highest_expressed_genes_tsv(stats).decode().splitlines()
    assert lines[0].startswith("gene\t") and len(lines) == 21
    assert lines[1].split("\t")[0] == f"G{stats.top_genes[0]}"


def test_table_histograms():
    table = {"columns": [
        {"name": "a", "type": "integer", "histogram": {"edges": [0, 1, 2, 3], "counts": [5, 1, 9]}},
        {"name": "b", "type": "float", "histogram": {"edges": [0.0, 0.5, 1.0], "counts": [2, 3]}},
        {"name": "c", "type": "string"}]}
    made = figures.table_figures(table, "t.csv")
    assert set(made) == {"column_histograms"}
    assert_png(made["column_histograms"])
    assert figures.table_figures({"columns": [{"name": "c", "type": "string"}]}, "t") == {}


def test_figures_from_a_real_file(tmp_path):
    anndata = pytest.importorskip("anndata")
    sp = pytest.importorskip("scipy.sparse")
    from stats_service import anndata_qc
    from tests.unit.test_stats_anndata import make_adata, make_counts
    counts = make_counts(seed=9)
    adata = make_adata(counts, seed=9)
    adata.X = sp.csr_matrix(counts.astype(np.float32))
    path = tmp_path / "f.h5ad"
    adata.write_h5ad(path)
    del anndata
    stats = anndata_qc.compute(path, hvg_genes=20, pca_components=3)
    made, errors = figures.make_figures(stats, "f.h5ad")
    assert errors == {} and "umap" in made and "cell_types" in made
    for png in made.values():
        assert_png(png)
