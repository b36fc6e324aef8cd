"""Merged AnnData files: stacked X and raw counts, source columns, refusals before any write."""
from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stats_service import merge
from stats_service.merge import MergeSkipped, merge_h5ad

GENES = [f"gene{i}" for i in range(6)]


def build(path, cells: int, seed: int, genes=GENES, raw: bool = False, prefix: str = "cell", dense=False):
    """A small AnnData file: CSR X, a categorical obs column, optional raw counts with more genes."""
    rng = np.random.default_rng(seed)
    counts = sp.random(cells, len(genes), density=0.4, format="csr", random_state=seed, dtype=np.float32)
    counts.data = np.round(counts.data * 10) + 1
    obs = pd.DataFrame({"batch": pd.Categorical([f"b{seed}"] * cells), "score": rng.random(cells)},
                       index=[f"{prefix}{i}" for i in range(cells)])
    var = pd.DataFrame({"symbol": [g.upper() for g in genes]}, index=list(genes))
    adata = anndata.AnnData(X=sp.csr_matrix(counts.multiply(0.5)), obs=obs, var=var)
    if dense:
        adata.X = adata.X.toarray()
    adata.uns["note"] = "not carried"
    if raw:
        raw_genes = [*genes, "extra1", "extra2"]
        raw_counts = sp.hstack([counts, sp.random(cells, 2, density=0.5, format="csr", random_state=seed + 99,
                                                  dtype=np.float32)]).tocsr()
        adata.raw = anndata.AnnData(X=raw_counts, var=pd.DataFrame(index=raw_genes))
    adata.write_h5ad(path)
    return adata


@pytest.fixture
def no_whole_reads(monkeypatch):
    """Fail if anything loads a whole AnnData file into memory."""
    def refuse(*args, **kwargs):
        raise AssertionError("merge_h5ad must not read a whole input")
    monkeypatch.setattr(anndata, "read_h5ad", refuse)
    monkeypatch.setattr(anndata.io, "read_h5ad", refuse)
    return refuse


# Taken before any test patches it: the tests read the merged file whole, the merge never does.
REAL_READ = anndata.read_h5ad


@pytest.mark.parametrize("slice_elems", [merge.MAX_LOADED_ELEMS, 4])
def test_three_files_with_raw_counts_merge_on_disk(tmp_path, no_whole_reads, monkeypatch, slice_elems):
    # A tiny slice makes every matrix cross many slice boundaries.
    monkeypatch.setattr(merge, "MAX_LOADED_ELEMS", slice_elems)
    inputs = [build(tmp_path / f"in{i}.h5ad", cells, seed=i, raw=True, prefix=f"s{i}-")
              for i, cells in enumerate((5, 7, 3))]
    progress = []
    target = tmp_path / "merged.h5ad"
    result = merge_h5ad([(tmp_path / "in0.h5ad", "S1", "f0"), (tmp_path / "in1.h5ad", "S2", "f1"),
                         (tmp_path / "in2.h5ad", "S1", "f2")], target, max_cells=100,
                        progress=lambda percent, message: progress.append(percent))
    assert result == {"cells": 15, "genes": 6, "files": 3, "has_raw": True}
    assert progress[0] == 0 and progress[-1] == 100 and progress == sorted(progress)
    merged = REAL_READ(target)
    assert merged.shape == (15, 6)
    assert list(merged.var_names) == GENES
    assert list(merged.var["symbol"]) == [g.upper() for g in GENES]
    assert list(merged.obs_names) == [name for adata in inputs for name in adata.obs_names]
    assert (merged.X != sp.vstack([adata.X for adata in inputs])).nnz == 0
    assert sp.issparse(merged.raw.X)
    assert (merged.raw.X != sp.vstack([adata.raw.X for adata in inputs])).nnz == 0
    assert list(merged.raw.var_names) == [*GENES, "extra1", "extra2"]
    assert merged.obs[merge.SAMPLE_COLUMN].dtype == "category"
    assert list(merged.obs[merge.SAMPLE_COLUMN].cat.categories) == ["S1", "S2"]
    assert list(merged.obs[merge.SAMPLE_COLUMN]) == ["S1"] * 5 + ["S2"] * 7 + ["S1"] * 3
    assert list(merged.obs[merge.FILE_COLUMN]) == ["f0"] * 5 + ["f1"] * 7 + ["f2"] * 3
    assert list(merged.obs["batch"]) == ["b0"] * 5 + ["b1"] * 7 + ["b2"] * 3
    assert np.allclose(merged.obs["score"], np.concatenate([adata.obs["score"] for adata in inputs]))
    assert list(merged.obs.columns)[-2:] == [merge.SAMPLE_COLUMN, merge.FILE_COLUMN]
    assert "note" not in merged.uns
    # Nothing left behind but the target.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0.h5ad", "in1.h5ad", "in2.h5ad", "merged.h5ad"]


def test_clashing_cell_names_are_made_unique_with_the_file_label(tmp_path, no_whole_reads):
    build(tmp_path / "a.h5ad", 3, seed=1)
    build(tmp_path / "b.h5ad", 2, seed=2)
    target = tmp_path / "m.h5ad"
    result = merge_h5ad([(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "b")], target, 10)
    assert result == {"cells": 5, "genes": 6, "files": 2, "has_raw": False}
    merged = REAL_READ(target)
    assert merged.raw is None
    assert list(merged.obs_names) == ["cell0-a", "cell1-a", "cell2-a", "cell0-b", "cell1-b"]
    assert merged.obs_names.is_unique


def test_names_repeated_inside_one_file_are_made_unique_too(tmp_path):
    adata = build(tmp_path / "a.h5ad", 3, seed=1)
    adata.obs_names = ["x", "x", "y"]
    adata.write_h5ad(tmp_path / "a.h5ad")
    build(tmp_path / "b.h5ad", 2, seed=2, prefix="z")
    merge_h5ad([(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "b")], tmp_path / "m.h5ad", 10)
    merged = REAL_READ(tmp_path / "m.h5ad")
    assert merged.obs_names.is_unique
    assert list(merged.obs_names) == ["x-a", "x-a-1", "y-a", "z0-b", "z1-b"]


def test_an_input_that_is_not_laid_out_as_anndata_is_an_input_error(tmp_path):
    import h5py
    build(tmp_path / "a.h5ad", 3, seed=1)
    with h5py.File(tmp_path / "b.h5ad", "w") as handle:
        handle.create_group("X")
        handle.create_group("obs")
        handle.create_group("var")
        handle["obs"].attrs["_index"] = "missing"
    with pytest.raises(Exception) as caught:
        merge_h5ad([(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "b")], tmp_path / "m.h5ad", 10)
    assert caught.value.code == "invalid_matrix"
    assert caught.value.status == 422


def test_genes_in_another_order_are_aligned_by_name(tmp_path):
    first = build(tmp_path / "a.h5ad", 3, seed=1, prefix="a")
    second = build(tmp_path / "b.h5ad", 4, seed=2, genes=list(reversed(GENES)), prefix="b")
    merge_h5ad([(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "b")], tmp_path / "m.h5ad", 10)
    merged = REAL_READ(tmp_path / "m.h5ad")
    assert list(merged.var_names) == GENES
    expected = sp.vstack([first.X, second[:, GENES].X])
    assert np.array_equal(merged.X.toarray(), expected.toarray())


def test_a_merged_file_merges_again(tmp_path):
    for i in range(3):
        build(tmp_path / f"{i}.h5ad", 2, seed=i, prefix=f"c{i}-")
    merge_h5ad([(tmp_path / "0.h5ad", "S0", "0"), (tmp_path / "1.h5ad", "S1", "1")], tmp_path / "m.h5ad", 10)
    merge_h5ad([(tmp_path / "m.h5ad", "S01", "m"), (tmp_path / "2.h5ad", "S2", "2")], tmp_path / "n.h5ad", 10)
    merged = REAL_READ(tmp_path / "n.h5ad")
    assert list(merged.obs[merge.SAMPLE_COLUMN]) == ["S01"] * 4 + ["S2"] * 2
    assert list(merged.obs.columns).count(merge.SAMPLE_COLUMN) == 1


def refused(tmp_path, inputs, max_cells=100) -> MergeSkipped:
    target = tmp_path / "m.h5ad"
    with pytest.raises(MergeSkipped) as caught:
        merge_h5ad(inputs, target, max_cells)
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".h5ad") or p.name.startswith(".")]
    assert leftovers == []
    return caught.value


def test_fewer_than_two_files_are_refused(tmp_path):
    build(tmp_path / "a.h5ad", 3, seed=1)
    assert refused(tmp_path, [(tmp_path / "a.h5ad", "S1", "a")]).code == "too_few_files"
    assert refused(tmp_path, []).code == "too_few_files"


def test_other_genes_are_refused(tmp_path):
    build(tmp_path / "a.h5ad", 3, seed=1)
    build(tmp_path / "b.h5ad", 3, seed=2, genes=[*GENES[:-1], "other"])
    error = refused(tmp_path, [(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "b")])
    assert error.code == "genes_incompatible"
    assert "b" in error.message


def test_raw_counts_in_some_files_only_are_refused(tmp_path):
    build(tmp_path / "a.h5ad", 3, seed=1, raw=True)
    build(tmp_path / "b.h5ad", 3, seed=2)
    error = refused(tmp_path, [(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "b")])
    assert error.code == "raw_incompatible"


def test_too_many_cells_are_refused_before_anything_is_written(tmp_path, no_whole_reads, monkeypatch):
    build(tmp_path / "a.h5ad", 3, seed=1)
    build(tmp_path / "b.h5ad", 3, seed=2)

    def never(*args, **kwargs):
        raise AssertionError("nothing may be written for a refused merge")
    monkeypatch.setattr(merge, "_concat", never)
    error = refused(tmp_path, [(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "b")], max_cells=5)
    assert error.code == "too_many_cells"


def test_a_dense_matrix_is_refused_without_dask(tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "_have_dask", lambda: False)
    build(tmp_path / "a.h5ad", 3, seed=1, dense=True)
    build(tmp_path / "b.h5ad", 3, seed=2, dense=True)
    error = refused(tmp_path, [(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "b")])
    assert error.code == "unsupported_matrix"


def test_a_file_that_is_not_hdf5_is_an_input_error(tmp_path):
    build(tmp_path / "a.h5ad", 3, seed=1)
    (tmp_path / "b.h5ad").write_bytes(b"gene,count\n")
    with pytest.raises(Exception) as caught:
        merge_h5ad([(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "file b")],
                   tmp_path / "m.h5ad", 10)
    assert caught.value.code == "not_hdf5"
    assert "file b" in caught.value.message and str(tmp_path) not in caught.value.message


def test_file_labels_must_be_unique(tmp_path):
    with pytest.raises(ValueError):
        merge_h5ad([(tmp_path / "a.h5ad", "S1", "a"), (tmp_path / "b.h5ad", "S2", "a")], tmp_path / "m.h5ad", 10)
