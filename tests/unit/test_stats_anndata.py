"""AnnData QC statistics read in chunks equal scanpy's and numpy's in-memory answers."""
from __future__ import annotations

import io

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
sp = pytest.importorskip("scipy.sparse")
anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

from stats_service import anndata_qc  # noqa: E402
from stats_service.errors import StatsInputError  # noqa: E402

N_CELLS, N_GENES = 61, 45
CHUNK = 7


def make_counts(seed: int = 0, n_cells: int = N_CELLS, n_genes: int = N_GENES) -> np.ndarray:
    """Dense integer counts with lognormal gene weights; some cells nearly empty, one empty."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.5, n_genes)
    depth = rng.integers(1, 400, n_cells)
    counts = np.stack([rng.poisson(weights / weights.sum() * d) for d in depth])
    counts[3] = 0                      # a cell without counts
    counts[5, :] = 0
    counts[5, :4] = [1, 2, 3, 4]       # a cell with fewer than 20 genes
    return counts.astype(np.int64)


def make_adata(counts: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_cells, n_genes = counts.shape
    genes = [f"MT-{i}" if i < 3 else f"mt-x{i}" if i == 3 else f"GENE{i}" for i in range(n_genes)]
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    obs["sample"] = pd.Categorical(rng.choice(["s1", "s2", "s3"], n_cells))
    obs["cell_type"] = pd.Categorical(rng.choice(["T", "B", "NK"], n_cells))
    adata = anndata.AnnData(X=counts.astype(np.float32), obs=obs,
                            var=pd.DataFrame(index=genes))
    adata.obsm["X_umap"] = rng.normal(size=(n_cells, 2)).astype(np.float32)
    return adata


def write(tmp_path, adata, name="data.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def with_int64_indices(path):
    with h5py.File(path, "r+") as f:
        for key in ("indptr", "indices"):
            values = f["X"][key][...].astype(np.int64)
            del f["X"][key]
            f["X"].create_dataset(key, data=values)
        assert f["X/indptr"].dtype == np.int64
    return path


def scanpy_qc(adata):
    sc = pytest.importorskip("scanpy")
    adata = adata.copy()
    adata.var["mt"] = adata.var_names.str.startswith(("MT-", "mt-"))
    obs, var = sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=[20],
                                          log1p=False, inplace=False)
    return obs, var


def assert_matches_scanpy(stats, adata):
    obs, var = scanpy_qc(adata)
    np.testing.assert_allclose(stats.total_counts, obs["total_counts"], rtol=1e-6)
    np.testing.assert_array_equal(stats.n_genes_by_counts, obs["n_genes_by_counts"])
    np.testing.assert_allclose(stats.pct_counts_mt, obs["pct_counts_mt"], rtol=1e-6,
                               equal_nan=True)
    np.testing.assert_allclose(stats.pct_counts_in_top_20_genes,
                               obs["pct_counts_in_top_20_genes"], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(stats.gene_total_counts, var["total_counts"], rtol=1e-6)
    np.testing.assert_array_equal(stats.gene_n_cells_by_counts, var["n_cells_by_counts"])


def lognorm(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(total > 0, counts * 1e4 / total, 0.0)
    return np.log1p(scaled)


def reference_hvg(counts: np.ndarray, n_top: int) -> np.ndarray:
    x = lognorm(counts)
    mean, var = x.mean(axis=0), x.var(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(var / mean)
    valid = np.isfinite(disp)
    edges = np.linspace(mean[valid].min(), mean[valid].max(), 21)
    bins = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, 19)
    norm = np.full(mean.size, -np.inf)
    for b in np.unique(bins[valid]):
        members = valid & (bins == b)
        d = disp[members]
        std = d.std(ddof=1) if d.size > 1 else np.nan
        z = (d - d.mean()) / std if np.isfinite(std) and std > 0 else np.zeros(d.size)
        norm[members] = z
    order = np.lexsort((np.arange(mean.size), -norm))
    return np.sort(order[:n_top])


def reference_pca(counts: np.ndarray, hvg: np.ndarray, k: int):
    x = lognorm(counts)[:, hvg]
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    variance = s**2
    return centred @ vt[:k].T, variance[:k] / variance.sum()


def assert_same_up_to_sign(actual, expected):
    for j in range(expected.shape[1]):
        a, e = actual[:, j].astype(np.float64), expected[:, j]
        sign = 1.0 if np.dot(a, e) >= 0 else -1.0
        np.testing.assert_allclose(sign * a, e, rtol=1e-3, atol=1e-3 * np.abs(e).max())


@pytest.mark.parametrize("layout", ["csr", "csc", "dense", "csr_int64", "csc_int64"])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_qc_metrics_equal_scanpy(tmp_path, layout, dtype):
    counts = make_counts()
    adata = make_adata(counts)
    matrix = counts.astype(dtype)
    adata.X = (sp.csc_matrix(matrix) if layout.startswith("csc") else
               sp.csr_matrix(matrix) if layout.startswith("csr") else matrix)
    path = write(tmp_path, adata)
    if layout.endswith("int64"):
        with_int64_indices(path)
    seen = []
    stats = anndata_qc.compute(path, chunk_rows=CHUNK, hvg_genes=20, pca_components=5,
                               progress=lambda f, m: seen.append(f))

    assert (stats.n_obs, stats.n_vars) == counts.shape
    assert stats.nnz == np.count_nonzero(counts)
    assert stats.matrix == "X"
    assert stats.matrix_format == layout.split("_")[0]
    assert_matches_scanpy(stats, adata)
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    assert seen == sorted(seen)

    top = np.argsort(-counts.sum(axis=0), kind="stable")[:20]
    np.testing.assert_array_equal(stats.top_genes, top)
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected_pct = 100.0 * counts[:, top] / total
    np.testing.assert_allclose(stats.top_gene_pct, expected_pct, rtol=1e-5, equal_nan=True)

    np.testing.assert_array_equal(stats.hvg, reference_hvg(counts, 20))
    coords, ratio = reference_pca(counts, stats.hvg, 5)
    np.testing.assert_allclose(stats.pca_variance_ratio, ratio, rtol=1e-6)
    assert_same_up_to_sign(stats.pca, coords)

    assert stats.sample_key == "sample" and stats.celltype_key == "cell_type"
    np.testing.assert_array_equal(stats.sample_categories[stats.sample_codes],
                                  adata.obs["sample"].astype(str))
    np.testing.assert_array_equal(stats.celltype_categories[stats.celltype_codes],
                                  adata.obs["cell_type"].astype(str))
    np.testing.assert_allclose(stats.umap, adata.obsm["X_umap"])


def test_raw_counts_are_used_when_present(tmp_path):
    counts = make_counts(seed=1)
    raw = make_adata(counts, seed=1)
    raw.X = sp.csr_matrix(counts.astype(np.float32))
    adata = raw[:, 10:].copy()
    adata.raw = raw
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()) * 3)   # a processed X that differs
    path = write(tmp_path, adata)

    stats = anndata_qc.compute(path, chunk_rows=CHUNK, hvg_genes=15, pca_components=3)

    assert stats.matrix == "raw.X"
    assert stats.n_vars == N_GENES
    assert list(stats.gene_names[:4]) == ["MT-0", "MT-1", "MT-2", "mt-x3"]
    assert_matches_scanpy(stats, raw)


def test_budgeted_blocks_equal_tiny_blocks(tmp_path, monkeypatch):
    counts = make_counts(seed=2, n_cells=300, n_genes=80)
    adata = make_adata(counts, seed=2)
    adata.X = sp.csr_matrix(counts.astype(np.float32))
    path = write(tmp_path, adata)
    whole = anndata_qc.compute(path, hvg_genes=30, pca_components=4)
    monkeypatch.setattr(anndata_qc, "BLOCK_BUDGET", 800)   # about 100 values a block
    monkeypatch.setattr(anndata_qc, "HVG_CACHE_BUDGET", 0)  # and re-read for the projection
    chunked = anndata_qc.compute(path, hvg_genes=30, pca_components=4)
    for name in ("total_counts", "pct_counts_in_top_20_genes", "gene_total_counts",
                 "pca_variance_ratio"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-9,
                                   equal_nan=True)
    np.testing.assert_allclose(chunked.pca, whole.pca, rtol=1e-4, atol=1e-4)


def test_summary_and_save_load_round_trip(tmp_path):
    import json
    counts = make_counts(seed=3)
    adata = make_adata(counts, seed=3)
    adata.X = sp.csr_matrix(counts.astype(np.float32))
    path = write(tmp_path, adata)
    stats = anndata_qc.compute(path, chunk_rows=CHUNK, hvg_genes=10, pca_components=3)

    summary = json.loads(json.dumps(stats.summary(), allow_nan=False))
    assert summary["n_obs"] == N_CELLS and summary["matrix"] == "X"
    assert summary["matrix_format"] == "csr"
    assert set(summary["per_cell"]["pct_counts_mt"]) == {"mean", "median", "min", "max",
                                                          "q25", "q75"}
    assert len(summary["top_genes"]) == 20
    assert sum(summary["cells_per_sample"].values()) == N_CELLS
    assert summary["cells_per_cell_type"].keys() == {"B", "NK", "T"}
    assert summary["n_hvg"] == 10 and len(summary["pca_variance_ratio"]) == 3

    buffer = io.BytesIO()
    stats.save(buffer)
    buffer.seek(0)
    loaded = anndata_qc.AnnDataStats.load(buffer)
    assert loaded.summary() == stats.summary()
    np.testing.assert_array_equal(loaded.pca, stats.pca)
    np.testing.assert_array_equal(loaded.gene_names, stats.gene_names)


def test_no_obs_columns_and_no_umap(tmp_path):
    counts = make_counts(seed=4)
    adata = anndata.AnnData(X=sp.csr_matrix(counts.astype(np.float32)))
    path = write(tmp_path, adata)
    stats = anndata_qc.compute(path, hvg_genes=10, pca_components=2)
    assert stats.sample_codes is None and stats.celltype_codes is None and stats.umap is None
    summary = stats.summary()
    assert summary["cells_per_sample"] is None and summary["has_umap"] is False
    buffer = io.BytesIO()
    stats.save(buffer)
    buffer.seek(0)
    assert anndata_qc.AnnDataStats.load(buffer).umap is None


def test_configurable_obs_keys_and_string_columns(tmp_path):
    counts = make_counts(seed=5)
    adata = make_adata(counts, seed=5)
    adata.obs["donor_name"] = [f"d{i % 4}" for i in range(N_CELLS)]   # plain strings
    adata.obs["leiden"] = pd.Categorical([str(i % 2) for i in range(N_CELLS)])
    del adata.obs["cell_type"]
    adata.X = sp.csr_matrix(counts.astype(np.float32))
    path = write(tmp_path, adata)
    stats = anndata_qc.compute(path, hvg_genes=10, pca_components=2,
                               sample_keys=("donor_name",))
    assert stats.sample_key == "donor_name"
    assert list(stats.sample_categories) == ["d0", "d1", "d2", "d3"]
    assert stats.celltype_key == "leiden"
    assert np.bincount(stats.celltype_codes).tolist() == [31, 30]


# --- damaged input ---------------------------------------------------------------------

def error_code(path) -> str:
    with pytest.raises(StatsInputError) as caught:
        anndata_qc.compute(path)
    assert caught.value.status == 422
    assert str(path) not in caught.value.message and "\n" not in caught.value.message
    return caught.value.code


def test_random_bytes_are_not_hdf5(tmp_path):
    path = tmp_path / "junk.h5ad"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert error_code(path) == "not_hdf5"


def test_empty_file_is_not_hdf5(tmp_path):
    path = tmp_path / "empty.h5ad"
    path.write_bytes(b"")
    assert error_code(path) == "not_hdf5"


def test_truncated_file(tmp_path):
    counts = make_counts(seed=6, n_cells=400, n_genes=200)
    adata = make_adata(counts, seed=6)
    adata.X = sp.csr_matrix(counts.astype(np.float32))
    path = write(tmp_path, adata)
    data = path.read_bytes()
    for size in (len(data) // 2, len(data) - 100):
        cut = tmp_path / f"cut{size}.h5ad"
        cut.write_bytes(data[:size])
        assert error_code(cut) == "truncated_file"


def test_hdf5_without_matrix(tmp_path):
    path = tmp_path / "nox.h5ad"
    with h5py.File(path, "w") as f:
        f.create_group("obs")
    assert error_code(path) == "missing_matrix"


@pytest.mark.parametrize("damage", ["indptr_length", "indptr_end", "index_range", "no_shape",
                                    "strings"])
def test_invalid_matrix(tmp_path, damage):
    counts = make_counts(seed=7)
    adata = make_adata(counts, seed=7)
    adata.X = sp.csr_matrix(counts.astype(np.float32))
    path = write(tmp_path, adata)
    with h5py.File(path, "r+") as f:
        x = f["X"]
        if damage == "indptr_length":
            indptr = x["indptr"][:-3]
            del x["indptr"]
            x.create_dataset("indptr", data=indptr)
        elif damage == "indptr_end":
            indptr = x["indptr"][...]
            indptr[-1] += 5
            del x["indptr"]
            x.create_dataset("indptr", data=indptr)
        elif damage == "index_range":
            indices = x["indices"][...]
            indices[-1] = N_GENES + 10
            del x["indices"]
            x.create_dataset("indices", data=indices)
        elif damage == "no_shape":
            del x.attrs["shape"]
        else:
            del f["X"]
            f.create_dataset("X", data=np.array([["a", "b"]], dtype="S1"))
    assert error_code(path) == "invalid_matrix"


def test_pca_with_many_hvgs_equals_numpy(tmp_path):
    # Enough HVGs that the top components come from Lanczos rather than a full eigh.
    counts = make_counts(seed=8, n_cells=300, n_genes=260)
    adata = make_adata(counts, seed=8)
    adata.X = sp.csr_matrix(counts.astype(np.float32))
    path = write(tmp_path, adata)
    stats = anndata_qc.compute(path, chunk_rows=CHUNK, hvg_genes=200, pca_components=6)
    np.testing.assert_array_equal(stats.hvg, reference_hvg(counts, 200))
    coords, ratio = reference_pca(counts, stats.hvg, 6)
    np.testing.assert_allclose(stats.pca_variance_ratio, ratio, rtol=1e-6)
    assert_same_up_to_sign(stats.pca, coords)
