"""Quality-control statistics of an ``.h5ad`` file, read in bounded memory.

The matrix is never loaded whole: it is read with h5py in blocks of rows (CSR, dense)
or of columns (CSC), each block holding about ``BLOCK_BUDGET`` bytes of stored values.
Only arrays of one value per cell or per gene (and a gene x gene covariance over the
highly variable genes) live for the whole run.

Definitions (the per-cell and per-gene ones are scanpy's ``calculate_qc_metrics``):

- ``total_counts``: sum of a cell's counts; ``n_genes_by_counts``: its non-zero genes.
- ``pct_counts_mt``: percent of a cell's counts in genes named ``MT-*`` or ``mt-*``.
- ``pct_counts_in_top_20_genes``: percent of a cell's counts in its own 20 highest
  values (all of them for a cell with fewer than 20 genes).
- Highly variable genes: each cell normalised to 1e4 counts, then ``log1p``; per gene the
  mean and variance of these values; dispersion ``log(var / mean)``; genes binned into 20
  equal-width bins of mean, dispersion standardised within its bin (a bin of one gene, or
  of zero spread, gives 0); the ``hvg_genes`` highest standardised dispersions win.
  (scanpy's ``flavor='seurat'`` takes mean and variance of ``expm1`` of the data instead.)
- PCA: of the log-normalised values of the HVGs, centred, not scaled; eigenvectors of the
  gene x gene covariance, signs fixed so each component's largest loading is positive.

This module imports numpy, scipy and h5py: only stats operations import it.
"""
from __future__ import annotations

import io
import json
import logging
import time
from itertools import islice
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import h5py
import numpy as np
import scipy.sparse as sp

from stats_service.errors import (INVALID_MATRIX, MISSING_MATRIX, NOT_HDF5, TRUNCATED_FILE,
                                  StatsInputError)

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

# Bytes of stored values (data + indices) per block: a block's working set is a few times
# this, which keeps a whole run well under 512 MiB whatever the file's size.
BLOCK_BUDGET = 16 * 2**20
TOP_N = 20
TARGET_SUM = 1e4
HVG_BINS = 20
SAMPLE_KEYS = ("sample", "sample_id", "donor", "batch")
CELLTYPE_KEYS = ("cell_type", "celltype", "cell_types", "cell_ontology_class", "cluster",
                 "leiden", "louvain")
# The HVG columns of every block are kept between the covariance and projection passes
# when they fit in this many bytes; otherwise the file is read a third time.
HVG_CACHE_BUDGET = 160 * 2**20
# Blocks read and worked on at once (the machines this runs on have two cores or more).
WORKERS = 2
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass
class AnnDataStats:
    """Everything the figures need of one file, small enough to keep (see ``save``)."""

    n_obs: int
    n_vars: int
    nnz: int
    matrix: str                      # "raw.X" or "X"
    matrix_format: str               # "csr", "csc" or "dense"
    gene_names: np.ndarray           # str, n_vars
    total_counts: np.ndarray         # per cell
    n_genes_by_counts: np.ndarray
    pct_counts_mt: np.ndarray
    pct_counts_in_top_20_genes: np.ndarray
    gene_total_counts: np.ndarray    # per gene
    gene_n_cells_by_counts: np.ndarray
    top_genes: np.ndarray            # gene indices, most expressed first
    top_gene_pct: np.ndarray         # n_obs x len(top_genes): percent of each cell's counts
    hvg: np.ndarray                  # gene indices, ascending
    pca: np.ndarray                  # n_obs x n_components
    pca_variance_ratio: np.ndarray
    sample_key: str | None = None
    sample_codes: np.ndarray | None = None       # int32 per cell, -1 for missing
    sample_categories: np.ndarray | None = None
    celltype_key: str | None = None
    celltype_codes: np.ndarray | None = None
    celltype_categories: np.ndarray | None = None
    umap: np.ndarray | None = None               # n_obs x 2
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able digest: totals, six-number summaries, top genes, groups, HVG and PCA."""
        per_cell = {name: _describe(getattr(self, name)) for name in
                    ("total_counts", "n_genes_by_counts", "pct_counts_mt",
                     "pct_counts_in_top_20_genes")}
        per_gene = {"total_counts": _describe(self.gene_total_counts),
                    "n_cells_by_counts": _describe(self.gene_n_cells_by_counts)}
        grand_total = float(self.gene_total_counts.sum())
        top = [{"gene": str(self.gene_names[g]),
                "total_counts": float(self.gene_total_counts[g]),
                "pct_of_counts": _finite(100.0 * self.gene_total_counts[g] / grand_total)
                if grand_total else None}
               for g in self.top_genes]
        return {
            "n_obs": self.n_obs, "n_vars": self.n_vars, "nnz": self.nnz,
            "matrix": self.matrix, "matrix_format": self.matrix_format,
            "total_counts": grand_total,
            "per_cell": per_cell, "per_gene": per_gene,
            "top_genes": top,
            "sample_key": self.sample_key,
            "cells_per_sample": _group_counts(self.sample_codes, self.sample_categories),
            "celltype_key": self.celltype_key,
            "cells_per_cell_type": _group_counts(self.celltype_codes, self.celltype_categories),
            "n_hvg": int(self.hvg.size),
            "pca_variance_ratio": [float(v) for v in self.pca_variance_ratio],
            "has_umap": self.umap is not None,
            "timings": dict(self.timings),
        }

    def save(self, fileobj) -> None:
        """Write to ``fileobj`` as a compressed ``.npz`` that loads without pickle."""
        arrays = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "timings":
                value = json.dumps(value)
            arrays[f.name] = np.asarray(value)
        np.savez_compressed(fileobj, **arrays)

    @classmethod
    def load(cls, fileobj) -> AnnDataStats:
        """Read what ``save`` wrote."""
        with np.load(fileobj, allow_pickle=False) as npz:
            values = {}
            for f in fields(cls):
                if f.name not in npz.files:
                    continue
                value = npz[f.name]
                if f.name == "timings":
                    value = json.loads(str(value))
                elif f.name in ("n_obs", "n_vars", "nnz"):
                    value = int(value)
                elif value.ndim == 0 and value.dtype.kind == "U":
                    value = str(value)
                values[f.name] = value
        return cls(**values)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.save(buffer)
        return buffer.getvalue()


def compute(path, *, chunk_rows: int | None = None, progress: Progress | None = None,
            hvg_genes: int = 2000, pca_components: int = 20,
            sample_keys: tuple[str, ...] = SAMPLE_KEYS,
            celltype_keys: tuple[str, ...] = CELLTYPE_KEYS) -> AnnDataStats:
    """QC statistics, HVGs and PCA of the ``.h5ad`` at ``path``; raises ``StatsInputError``.

    ``chunk_rows`` fixes the rows (or, for CSC, columns) per block instead of the budget.
    """
    report = progress or (lambda fraction, message: None)
    _check_signature(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise StatsInputError("The HDF5 file cannot be opened: it is truncated or damaged.",
                              code=TRUNCATED_FILE) from exc
    try:
        with handle:
            return _compute(handle, chunk_rows, report, hvg_genes, pca_components,
                            sample_keys, celltype_keys)
    except OSError as exc:
        # h5py raises OSError for unreadable chunks and broken object headers alike.
        raise StatsInputError("The HDF5 file cannot be read: it is truncated or damaged.",
                              code=TRUNCATED_FILE) from exc


def _compute(h5: h5py.File, chunk_rows, report: Progress, hvg_genes: int,
             pca_components: int, sample_keys, celltype_keys) -> AnnDataStats:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    matrix_name, node, var_group = _find_matrix(h5)
    source = _open_matrix(node, matrix_name, chunk_rows)
    n_obs, n_vars = source.shape
    gene_names = _read_index(var_group, n_vars, "var") if var_group is not None else None
    if gene_names is None:
        gene_names = np.array([str(i) for i in range(n_vars)])
    is_mt = np.char.startswith(gene_names, "MT-") | np.char.startswith(gene_names, "mt-")

    report(0.0, f"reading {matrix_name} ({n_obs} cells x {n_vars} genes)")
    qc = _qc_pass(source, is_mt, report)
    timings["qc"] = time.perf_counter() - started

    top_genes = np.argsort(-qc.gene_total, kind="stable")[:min(TOP_N, n_vars)]

    hvg_started = time.perf_counter()
    if not source.by_rows:
        _lognorm_moments_by_columns(source, qc, report)
    hvg = _highly_variable(qc.lognorm_sum, qc.lognorm_sumsq, n_obs, hvg_genes)
    timings["hvg"] = time.perf_counter() - hvg_started

    pca_started = time.perf_counter()
    coords, ratio, top_pct = _pca(source, qc, hvg, top_genes, pca_components, report)
    timings["pca"] = time.perf_counter() - pca_started

    obs = h5.get("obs")
    sample = _find_column(obs, sample_keys, n_obs)
    celltype = _find_column(obs, celltype_keys, n_obs)
    umap = _read_umap(h5, n_obs)
    timings["total"] = time.perf_counter() - started
    report(1.0, "statistics done")

    with np.errstate(divide="ignore", invalid="ignore"):
        pct_mt = 100.0 * qc.mt_total / qc.cell_total
        pct_top = 100.0 * qc.top_sum / qc.cell_total
    return AnnDataStats(
        n_obs=n_obs, n_vars=n_vars, nnz=source.nnz, matrix=matrix_name,
        matrix_format=source.format, gene_names=gene_names,
        total_counts=qc.cell_total, n_genes_by_counts=qc.cell_ngenes,
        pct_counts_mt=pct_mt, pct_counts_in_top_20_genes=pct_top,
        gene_total_counts=qc.gene_total, gene_n_cells_by_counts=qc.gene_ncells,
        top_genes=top_genes, top_gene_pct=top_pct, hvg=hvg,
        pca=coords, pca_variance_ratio=ratio,
        sample_key=sample[0], sample_codes=sample[1], sample_categories=sample[2],
        celltype_key=celltype[0], celltype_codes=celltype[1], celltype_categories=celltype[2],
        umap=umap, timings=timings)


# --- reading the matrix ---------------------------------------------------------------

def _check_signature(path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise StatsInputError("The input file cannot be opened.", code=NOT_HDF5) from exc
    # HDF5 may also put its superblock at 512, 1024, ... after a user block; h5py knows.
    if head != HDF5_SIGNATURE and not h5py.is_hdf5(path):
        raise StatsInputError("The input is not an HDF5 (.h5ad) file.", code=NOT_HDF5)


def _find_matrix(h5: h5py.File):
    """(name, node, var group) of the counts: ``raw/X`` when present, else ``X``."""
    raw = h5.get("raw")
    if isinstance(raw, h5py.Group) and "X" in raw:
        return "raw.X", raw["X"], raw.get("var")
    if "X" in h5:
        return "X", h5["X"], h5.get("var")
    raise StatsInputError("The file holds no matrix X.", code=MISSING_MATRIX)


def _attr_str(node, name: str) -> str | None:
    value = node.attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


class _Matrix:
    """A matrix read in blocks: rows for CSR and dense, columns for CSC."""

    def __init__(self, node, name: str, chunk: int | None):
        self.name = name
        if isinstance(node, h5py.Dataset):
            if node.ndim != 2:
                raise StatsInputError(f"{name} is not two-dimensional.", code=INVALID_MATRIX)
            if node.dtype.kind not in "biuf":
                raise StatsInputError(f"{name} is not numeric.", code=INVALID_MATRIX)
            self.format = "dense"
            self.shape = tuple(int(n) for n in node.shape)
            self.dense = node
            self.nnz = -1  # counted while reading
            per_row = max(1, self.shape[1] * node.dtype.itemsize)
            step = chunk or max(1, BLOCK_BUDGET // per_row)
            self.bounds = _even_bounds(self.shape[0], step)
            return
        encoding = _attr_str(node, "encoding-type") or _attr_str(node, "h5sparse_format")
        encoding = (encoding or "").replace("_matrix", "")
        if encoding not in ("csr", "csc"):
            raise StatsInputError(f"{name} is neither a dense array nor a CSR or CSC matrix.",
                                  code=INVALID_MATRIX)
        shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
        try:
            self.shape = tuple(int(n) for n in shape)
            self.data, self.indices, indptr = node["data"], node["indices"], node["indptr"]
        except (TypeError, KeyError) as exc:
            raise StatsInputError(f"{name} lacks its shape, data, indices or indptr.",
                                  code=INVALID_MATRIX) from exc
        if len(self.shape) != 2 or self.data.dtype.kind not in "biuf":
            raise StatsInputError(f"{name} has a bad shape or non-numeric data.",
                                  code=INVALID_MATRIX)
        self.format = encoding
        major = self.shape[0] if encoding == "csr" else self.shape[1]
        self.indptr = indptr[...].astype(np.int64)
        self.nnz = int(self.data.shape[0])
        if (self.indptr.shape != (major + 1,) or self.indptr[0] != 0
                or self.indptr[-1] != self.nnz or self.indices.shape[0] != self.nnz
                or np.any(np.diff(self.indptr) < 0)):
            raise StatsInputError(f"{name} has an indptr that does not match its shape or data.",
                                  code=INVALID_MATRIX)
        if chunk:
            self.bounds = _even_bounds(major, chunk)
        else:
            per_value = self.data.dtype.itemsize + self.indices.dtype.itemsize
            self.bounds = _budget_bounds(self.indptr, max(1, BLOCK_BUDGET // per_value))

    @property
    def by_rows(self) -> bool:
        return self.format != "csc"

    def blocks(self, columns: np.ndarray | None = None) -> Iterator[tuple[int, int, sp.spmatrix]]:
        """Yield (start, stop, block) in order.

        For CSR/dense a block is a CSR of rows start:stop x all genes; for CSC a CSC of all
        cells x columns start:stop. ``columns`` (CSC only) skips blocks with none of them.
        """
        return self.map(lambda a, b, block: (a, b, block), columns)

    def map(self, work: Callable, columns: np.ndarray | None = None) -> Iterator:
        """Yield ``work(start, stop, block)`` for every block, in order.

        Two blocks are read and worked on at once on two threads: h5py and numpy's sorts,
        ufuncs and scipy's sparse kernels release the GIL for most of their time.
        """
        bounds = self.bounds
        if columns is not None and not self.by_rows:
            bounds = [(a, b) for a, b in bounds
                      if np.searchsorted(columns, a) < np.searchsorted(columns, b)]
        todo = iter(bounds)

        def job(a: int, b: int):
            return work(a, b, self._read(a, b))

        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            pending = deque(pool.submit(job, a, b) for a, b in islice(todo, WORKERS))
            while pending:
                result = pending.popleft().result()
                following = next(todo, None)
                if following is not None:
                    pending.append(pool.submit(job, *following))
                yield result

    def _read(self, a: int, b: int) -> sp.spmatrix:
        if self.format == "dense":
            return sp.csr_matrix(self.dense[a:b])
        lo, hi = int(self.indptr[a]), int(self.indptr[b])
        data = self.data[lo:hi]
        indices = self.indices[lo:hi]
        if indices.dtype.kind not in "iu":
            raise StatsInputError(f"{self.name} has non-integer indices.", code=INVALID_MATRIX)
        if indices.dtype.kind == "u":
            indices = indices.astype(np.int64)  # bincount refuses unsigned indices
        minor = self.shape[1] if self.format == "csr" else self.shape[0]
        if indices.size and (indices.min() < 0 or indices.max() >= minor):
            raise StatsInputError(f"{self.name} has indices outside its shape.",
                                  code=INVALID_MATRIX)
        indptr = self.indptr[a:b + 1] - lo
        if self.format == "csr":
            return sp.csr_matrix((data, indices, indptr), shape=(b - a, self.shape[1]))
        return sp.csc_matrix((data, indices, indptr), shape=(self.shape[0], b - a))


def _open_matrix(node, name: str, chunk: int | None) -> _Matrix:
    if chunk is not None and chunk < 1:
        raise ValueError("chunk_rows must be positive")
    return _Matrix(node, name, chunk)


def _even_bounds(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _budget_bounds(indptr: np.ndarray, per_block: int) -> list[tuple[int, int]]:
    """Split the major axis so each block holds about ``per_block`` stored values."""
    n = indptr.size - 1
    bounds, a = [], 0
    while a < n:
        b = int(np.searchsorted(indptr, indptr[a] + per_block, side="right")) - 1
        b = min(n, max(a + 1, b))
        bounds.append((a, b))
        a = b
    return bounds


# --- pass 1: QC metrics ---------------------------------------------------------------

@dataclass
class _QC:
    cell_total: np.ndarray
    cell_ngenes: np.ndarray
    mt_total: np.ndarray
    top_sum: np.ndarray
    gene_total: np.ndarray
    gene_ncells: np.ndarray
    lognorm_sum: np.ndarray
    lognorm_sumsq: np.ndarray
    nnz: int = 0


def _qc_pass(source: _Matrix, is_mt: np.ndarray, report: Progress) -> _QC:
    n_obs, n_vars = source.shape
    qc = _QC(*(np.zeros(n) for n in (n_obs,) * 4 + (n_vars,) * 4))
    total_blocks = len(source.bounds)
    if source.by_rows:
        work = lambda a, b, block: _qc_rows(block, is_mt, n_vars)  # noqa: E731
        for i, (a, b, part) in enumerate(_with_bounds(source, work)):
            rows = slice(a, b)
            (qc.cell_total[rows], qc.cell_ngenes[rows], qc.mt_total[rows],
             qc.top_sum[rows]) = part["cells"]
            for name, values in part["genes"].items():
                getattr(qc, name)[:] += values
            qc.nnz += part["nnz"]
            report(0.5 * (i + 1) / total_blocks, f"QC metrics: block {i + 1} of {total_blocks}")
    else:
        _qc_columns(source, is_mt, qc, report)
    source.nnz = qc.nnz if source.nnz < 0 else source.nnz
    return qc


def _with_bounds(source: _Matrix, work: Callable) -> Iterator:
    return source.map(lambda a, b, block: (a, b, work(a, b, block)))


def _qc_rows(block: sp.csr_matrix, is_mt: np.ndarray, n_vars: int) -> dict:
    """Every pass-1 quantity of a CSR row block: its cells' values and its genes' sums."""
    data, indices, indptr = block.data, block.indices, block.indptr
    counts = np.diff(indptr)
    zeros = data == 0
    data64 = data.astype(np.float64)   # once: bincount would convert it on every call
    n_zeros = int(np.count_nonzero(zeros))
    cell_total = _segment_sums(data64, indptr)
    n_genes = counts - (_segment_sums(zeros, indptr) if n_zeros else 0)
    # Few values are mitochondrial: find them, then their rows, rather than mask every value.
    mt_at = np.flatnonzero(is_mt[indices])
    mt_rows = np.searchsorted(indptr, mt_at, side="right") - 1
    mt_total = np.bincount(mt_rows, weights=data64[mt_at], minlength=counts.size)
    top_sum = _row_top_values(data, indptr, TOP_N).sum(axis=1)
    present = indices[~zeros] if n_zeros else indices
    values = _lognorm(data, counts, cell_total)
    genes = {
        "gene_total": np.bincount(indices, weights=data64, minlength=n_vars),
        "gene_ncells": np.bincount(present, minlength=n_vars),
        "lognorm_sum": np.bincount(indices, weights=values, minlength=n_vars),
        "lognorm_sumsq": np.bincount(indices, weights=values * values, minlength=n_vars),
    }
    return {"cells": (cell_total, n_genes, mt_total, top_sum), "genes": genes,
            "nnz": int(data.size - n_zeros)}


def _qc_columns(source: _Matrix, is_mt: np.ndarray, qc: _QC, report: Progress) -> None:
    n_obs = source.shape[0]
    # CSC: a cell's values arrive over many blocks, so its running top 20 is kept.
    running_top = np.zeros((n_obs, TOP_N))
    total_blocks = len(source.bounds)
    for i, (a, b, block) in enumerate(source.blocks()):
        data, indices = block.data, block.indices
        nonzero = data != 0
        has_zeros = not nonzero.all()
        counts = np.diff(block.indptr)
        qc.nnz += int(np.count_nonzero(nonzero))
        qc.cell_total += np.bincount(indices, weights=data, minlength=n_obs)
        qc.cell_ngenes += np.bincount(indices[nonzero] if has_zeros else indices,
                                      minlength=n_obs)
        mt_cols = is_mt[a:b]
        if mt_cols.any():
            owner = np.repeat(mt_cols, counts)
            qc.mt_total += np.bincount(indices[owner], weights=data[owner], minlength=n_obs)
        qc.gene_total[a:b] = _segment_sums(data, block.indptr)
        qc.gene_ncells[a:b] = counts - (_segment_sums(~nonzero, block.indptr) if has_zeros
                                        else 0)
        by_cell = block.tocsr()
        candidates = _row_top_values(by_cell.data, by_cell.indptr, TOP_N)
        merged = np.sort(np.concatenate([running_top, candidates], axis=1), axis=1)
        running_top = merged[:, TOP_N:]
        report(0.5 * (i + 1) / total_blocks, f"QC metrics: block {i + 1} of {total_blocks}")
    qc.top_sum = running_top.sum(axis=1)


def _segment_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Sum (in float64) of each segment ``indptr[i]:indptr[i+1]``; empty segments give 0."""
    # A float64 running sum differenced at the bounds: several times faster than
    # np.add.reduceat with a float64 accumulator on float32 values.
    running = np.zeros(values.size + 1)
    np.cumsum(values, dtype=np.float64, out=running[1:])
    return running[indptr[1:]] - running[indptr[:-1]]


def _row_top_values(data: np.ndarray, indptr: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` largest stored values (unordered), padded with zeros: rows x k.

    Rows are grouped by length into power-of-two widths, padded into a dense array and
    sorted (numpy's vectorised sort is much faster than partition on tied counts), so no
    Python loop runs per row.
    """
    counts = np.diff(indptr)
    n_rows = counts.size
    out = np.zeros((n_rows, k))
    if n_rows == 0 or data.size == 0:
        return out
    dtype = data.dtype if data.dtype.kind == "f" else np.float64
    width = np.maximum(k, 1 << np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64))
    for w in np.unique(width):
        rows = np.flatnonzero((width == w) & (counts > 0))
        if rows.size == 0:
            continue
        lengths = counts[rows]
        first = np.cumsum(lengths) - lengths
        position = np.arange(int(lengths.sum())) - np.repeat(first, lengths)
        source = np.repeat(indptr[rows], lengths) + position
        if w == k:
            # Short rows: every value is in the row's top k.
            out[np.repeat(rows, lengths), position] = data[source]
            continue
        padded = np.full((rows.size, int(w)), -np.inf, dtype=dtype)
        padded[np.repeat(np.arange(rows.size), lengths), position] = data[source]
        padded.sort(axis=1)
        top = padded[:, w - k:]
        out[rows] = np.where(np.isfinite(top), top, 0.0)
    return out


def _lognorm(data: np.ndarray, counts: np.ndarray, cell_total: np.ndarray,
             dtype=np.float32) -> np.ndarray:
    """log1p(x * 1e4 / cell total) for CSR-ordered values; cells without counts give 0.

    float32 by default: the per-gene moments are summed in float64 anyway, and float32
    halves the memory traffic of the largest arrays of a pass.
    """
    with np.errstate(divide="ignore"):
        scale = np.where(cell_total > 0, TARGET_SUM / cell_total, 0.0).astype(dtype)
    return np.log1p(data.astype(dtype, copy=False) * np.repeat(scale, counts))


def _lognorm_moments_by_columns(source: _Matrix, qc: _QC, report: Progress) -> None:
    # CSC: the per-cell totals are only complete after pass 1, so one more pass.
    with np.errstate(divide="ignore"):
        scale = np.where(qc.cell_total > 0, TARGET_SUM / qc.cell_total, 0.0)
    total_blocks = len(source.bounds)
    for i, (a, b, block) in enumerate(source.blocks()):
        values = np.log1p(block.data.astype(np.float64) * scale[block.indices])
        qc.lognorm_sum[a:b] = _segment_sums(values, block.indptr)
        qc.lognorm_sumsq[a:b] = _segment_sums(values * values, block.indptr)
        report(0.5 + 0.1 * (i + 1) / total_blocks, f"gene dispersion: block {i + 1}")


# --- highly variable genes -------------------------------------------------------------

def _highly_variable(total: np.ndarray, total_sq: np.ndarray, n_obs: int, n_top: int
                     ) -> np.ndarray:
    """Indices (ascending) of the ``n_top`` genes of highest binned, standardised dispersion."""
    n_vars = total.size
    if n_top >= n_vars or n_obs < 2:
        return np.arange(n_vars)
    mean = total / n_obs
    var = np.maximum(total_sq - n_obs * mean * mean, 0.0) / (n_obs - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(var / mean)
    norm = _binned_dispersion(mean, dispersion)
    order = np.lexsort((np.arange(n_vars), -np.nan_to_num(norm, nan=-np.inf)))
    return np.sort(order[:n_top])


def _binned_dispersion(mean: np.ndarray, dispersion: np.ndarray) -> np.ndarray:
    """Dispersion standardised within 20 equal-width bins of mean (NaN where undefined)."""
    valid = np.isfinite(dispersion)
    norm = np.full(mean.size, np.nan)
    if not valid.any():
        return norm
    lo, hi = mean[valid].min(), mean[valid].max()
    edges = np.linspace(lo, hi, HVG_BINS + 1)
    bins = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, HVG_BINS - 1)
    bins_valid = bins[valid]
    disp = dispersion[valid]
    n = np.bincount(bins_valid, minlength=HVG_BINS)
    s = np.bincount(bins_valid, weights=disp, minlength=HVG_BINS)
    ss = np.bincount(bins_valid, weights=disp * disp, minlength=HVG_BINS)
    with np.errstate(divide="ignore", invalid="ignore"):
        bin_mean = s / n
        bin_std = np.sqrt(np.maximum(ss - n * bin_mean * bin_mean, 0.0) / (n - 1))
        z = (disp - bin_mean[bins_valid]) / bin_std[bins_valid]
    norm[valid] = np.where(np.isfinite(z), z, 0.0)
    return norm


# --- PCA and top-gene shares: passes 2 and 3 ---------------------------------------------

def _pca(source: _Matrix, qc: _QC, hvg: np.ndarray, top_genes: np.ndarray, n_components: int,
         report: Progress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coordinates n_obs x k, explained variance ratio, top-gene percent per cell)."""
    n_obs = source.shape[0]
    mean = qc.lognorm_sum[hvg] / max(n_obs, 1)
    if source.by_rows:
        cross, cache, top_pct = _cross_products_by_rows(source, qc, hvg, top_genes, report)
    else:
        cross = _cross_products_by_columns(source, qc, hvg, report)
        cache = None
        top_pct = _top_gene_pct_by_columns(source, qc, top_genes)
    k = max(0, min(n_components, hvg.size, n_obs - 1))
    if k == 0:
        return np.zeros((n_obs, 0), np.float32), np.zeros(0), top_pct
    # In place: at 2,000 HVGs each gene x gene matrix is 32 MB.
    covariance = cross
    covariance -= n_obs * np.outer(mean, mean)
    covariance /= n_obs - 1
    eigenvalues, components = _top_eigenvectors(covariance, k)
    # Eigenvectors have no sign; fix one so the same data always gives the same picture.
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(k)])
    components *= np.where(signs == 0, 1.0, signs)
    total_variance = float(np.trace(covariance))
    ratio = (np.maximum(eigenvalues, 0.0) / total_variance if total_variance > 0
             else np.zeros(k))
    del covariance, cross
    coords = _project(source, qc, hvg, components, mean @ components, cache, report)
    return coords, ratio, top_pct


def _top_eigenvectors(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues (descending) of a symmetric matrix and their eigenvectors."""
    n = matrix.shape[0]
    if n > 4 * k + 50:
        from scipy.sparse.linalg import eigsh
        # Lanczos needs only products with the matrix: ten times faster than a full
        # decomposition at 2,000 genes. A fixed start vector keeps the answer reproducible.
        values, vectors = eigsh(matrix, k=k, which="LA", v0=np.ones(n), tol=0)
    else:
        values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(values)[::-1][:k]
    return values[order], vectors[:, order]


def _hvg_lookup(n_vars: int, genes: np.ndarray) -> np.ndarray:
    lookup = np.full(n_vars, -1, dtype=np.int32)
    lookup[genes] = np.arange(genes.size)
    return lookup


def _select_rows(block: sp.csr_matrix, lookup: np.ndarray):
    """(rows, positions, values) of a CSR block's values in the looked-up columns."""
    column = lookup[block.indices]
    at = np.flatnonzero(column >= 0)
    rows = np.searchsorted(block.indptr, at, side="right") - 1
    return rows, column[at], block.data[at]


def _hvg_rows(block: sp.csr_matrix, cell_total: np.ndarray, lookup: np.ndarray, n_hvg: int
              ) -> sp.csr_matrix:
    """Log-normalised HVG columns of a CSR row block, as a float64 CSR (rows x n_hvg)."""
    n_rows = block.shape[0]
    rows, columns, data = _select_rows(block, lookup)
    counts = np.bincount(rows, minlength=n_rows)
    values = _lognorm(data, counts, cell_total, dtype=np.float64)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return sp.csr_matrix((values, columns, indptr), shape=(n_rows, n_hvg))


def _pass2_rows(a: int, b: int, block: sp.csr_matrix, cell_total: np.ndarray,
                lookup: np.ndarray, n_hvg: int, top_lookup: np.ndarray, n_top: int):
    """(HVG block, its X'X as a sparse matrix, percent of counts in each top gene)."""
    sub = _hvg_rows(block, cell_total, lookup, n_hvg)
    # The sparse product is far cheaper than a dense one: HVG rows are mostly zeros. It
    # comes out CSC; being symmetric, its columns are its rows, so no conversion is needed.
    product = sub.T @ sub
    rows, slots, data = _select_rows(block, top_lookup)
    sums = np.bincount(rows * n_top + slots, weights=data,
                       minlength=(b - a) * n_top).reshape(b - a, n_top)
    with np.errstate(divide="ignore", invalid="ignore"):
        top_pct = (100.0 * sums / cell_total[:, None]).astype(np.float32)
    return sub, product, top_pct


def _cross_products_by_rows(source, qc, hvg, top_genes, report):
    n_obs, n_vars = source.shape
    lookup = _hvg_lookup(n_vars, hvg)
    top_lookup = _hvg_lookup(n_vars, top_genes)
    cross = np.zeros((hvg.size, hvg.size))
    top_pct = np.zeros((n_obs, top_genes.size), dtype=np.float32)
    cache: list | None = []
    cached_bytes = 0
    total_blocks = len(source.bounds)

    def work(a, b, block):
        return _pass2_rows(a, b, block, qc.cell_total[a:b], lookup, hvg.size, top_lookup,
                           top_genes.size)

    for i, (a, b, (sub, product, pct)) in enumerate(_with_bounds(source, work)):
        rows = np.repeat(np.arange(product.shape[0]), np.diff(product.indptr))
        cross[rows, product.indices] += product.data
        top_pct[a:b] = pct
        if cache is not None:
            sub.data = sub.data.astype(np.float32)
            sub.indices = sub.indices.astype(np.int32)
            sub.indptr = sub.indptr.astype(np.int32)
            cached_bytes += sub.data.nbytes + sub.indices.nbytes + sub.indptr.nbytes
            if cached_bytes > HVG_CACHE_BUDGET:
                cache = None
            else:
                cache.append((a, b, sub))
        report(0.5 + 0.35 * (i + 1) / total_blocks, f"PCA covariance: block {i + 1}")
    return cross, cache, top_pct


def _hvg_columns(block: sp.csc_matrix, a: int, scale: np.ndarray, lookup: np.ndarray
                 ) -> tuple[np.ndarray, sp.csc_matrix]:
    """(HVG positions, their log-normalised columns) of a CSC column block starting at a."""
    positions = lookup[a:a + block.shape[1]]
    keep = np.flatnonzero(positions >= 0)
    sub = block[:, keep]
    sub.data = np.log1p(sub.data.astype(np.float64) * scale[sub.indices])
    return positions[keep], sub


def _cross_products_by_columns(source, qc, hvg, report):
    # CSC holds columns, so X'X is built from pairs of column blocks: block i is held while
    # blocks i.. are read again. Reads grow with the square of the HVG blocks, memory not.
    n_vars = source.shape[1]
    lookup = _hvg_lookup(n_vars, hvg)
    with np.errstate(divide="ignore"):
        scale = np.where(qc.cell_total > 0, TARGET_SUM / qc.cell_total, 0.0)
    cross = np.zeros((hvg.size, hvg.size))
    blocks = [(a, b) for a, b in source.bounds if (lookup[a:b] >= 0).any()]
    for i, (a, b) in enumerate(blocks):
        pos_i, left = _hvg_columns(source._read(a, b), a, scale, lookup)
        for c, d in blocks[i:]:
            pos_j, right = _hvg_columns(source._read(c, d), c, scale, lookup)
            product = (left.T @ right).toarray()
            cross[np.ix_(pos_i, pos_j)] = product
            cross[np.ix_(pos_j, pos_i)] = product.T
        report(0.6 + 0.25 * (i + 1) / len(blocks), f"PCA covariance: block {i + 1}")
    return cross


def _top_gene_pct_by_columns(source, qc, top_genes) -> np.ndarray:
    n_obs = source.shape[0]
    top_pct = np.zeros((n_obs, top_genes.size), dtype=np.float32)
    for slot, gene in enumerate(top_genes):
        column = source._read(int(gene), int(gene) + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            top_pct[column.indices, slot] = (100.0 * column.data.astype(np.float64)
                                             / qc.cell_total[column.indices])
    with np.errstate(divide="ignore", invalid="ignore"):
        top_pct[qc.cell_total == 0] = np.nan
    return top_pct


def _project(source, qc, hvg, components, offset, cache, report) -> np.ndarray:
    n_obs, n_vars = source.shape
    coords = np.zeros((n_obs, components.shape[1]))
    lookup = _hvg_lookup(n_vars, hvg)
    if source.by_rows:
        pieces = cache if cache is not None else _with_bounds(
            source, lambda a, b, block: _hvg_rows(block, qc.cell_total[a:b], lookup, hvg.size))
        for a, b, sub in pieces:
            coords[a:b] = sub @ components
    else:
        with np.errstate(divide="ignore"):
            scale = np.where(qc.cell_total > 0, TARGET_SUM / qc.cell_total, 0.0)
        for a, b, block in source.blocks(columns=hvg):
            positions, sub = _hvg_columns(block, a, scale, lookup)
            coords += sub @ components[positions]
    report(0.95, "PCA projection done")
    return (coords - offset).astype(np.float32)


# --- obs, var and obsm ------------------------------------------------------------------

def _strings(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "SO":
        return np.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                         for v in values.tolist()])
    return values.astype(str)


def _read_dataset(ds: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.array(ds.asstr()[...], dtype=str) if ds.shape else np.array([])
    return ds[...]


def _read_index(group, n: int, what: str) -> np.ndarray | None:
    """Names of a modern obs/var group (``_index`` attr) or of an older layout; None if absent."""
    if isinstance(group, h5py.Dataset) and group.dtype.names:
        # anndata < 0.7: obs/var as one compound dataset with an "index" field.
        name = "index" if "index" in group.dtype.names else group.dtype.names[0]
        names = _strings(group[name])
    elif isinstance(group, h5py.Group):
        key = _attr_str(group, "_index") or ("_index" if "_index" in group else
                                             "index" if "index" in group else None)
        if key is None or key not in group:
            return None
        names = _strings(_read_dataset(group[key]))
    else:
        return None
    if names.shape != (n,):
        raise StatsInputError(f"{what} has {names.size} names for {n} entries.",
                              code=INVALID_MATRIX)
    return names


def _find_column(obs, keys, n_obs: int):
    """(key, codes int32 with -1 for missing, categories) of the first of ``keys`` in obs."""
    for key in keys:
        try:
            column = _read_column(obs, key)
        except (KeyError, ValueError, TypeError):
            logger.debug("obs column %s unreadable", key, exc_info=True)
            continue
        if column is None:
            continue
        codes, categories = column
        if codes.shape != (n_obs,):
            continue
        return key, codes.astype(np.int32), np.asarray(categories, dtype=str)
    return None, None, None


def _read_column(obs, key: str):
    if isinstance(obs, h5py.Dataset):
        if not obs.dtype.names or key not in obs.dtype.names:
            return None
        values = obs[key]
        categories = obs.file.get(f"uns/{key}_categories")
        if categories is not None and values.dtype.kind in "iu":
            return values, _strings(_read_dataset(categories))
        return _factorise(values)
    if not isinstance(obs, h5py.Group) or key not in obs:
        return None
    node = obs[key]
    if isinstance(node, h5py.Group):
        if "codes" in node and "categories" in node:
            return node["codes"][...], _strings(_read_dataset(node["categories"]))
        return None
    values = node[...] if h5py.check_string_dtype(node.dtype) is None else _read_dataset(node)
    # anndata 0.7: integer codes with the categories beside them or referenced by an attr.
    ref = node.attrs.get("categories")
    if ref is not None and values.dtype.kind in "iu":
        categories = obs.file[ref] if isinstance(ref, h5py.Reference) else None
        if categories is None and "__categories" in obs and key in obs["__categories"]:
            categories = obs["__categories"][key]
        if categories is not None:
            return values, _strings(_read_dataset(categories))
    return _factorise(values)


def _factorise(values: np.ndarray):
    if values.dtype.kind == "f":
        missing = np.isnan(values)
        labels = np.where(missing, 0, values)
        labels = np.array([f"{v:g}" for v in labels.tolist()])
    else:
        labels = _strings(values)
        missing = np.zeros(labels.size, dtype=bool)
    categories, codes = np.unique(labels, return_inverse=True)
    codes = codes.astype(np.int32)
    codes[missing] = -1
    return codes, categories


def _read_umap(h5: h5py.File, n_obs: int) -> np.ndarray | None:
    obsm = h5.get("obsm")
    node = None
    if isinstance(obsm, h5py.Group):
        node = obsm.get("X_umap")
    elif isinstance(obsm, h5py.Dataset) and obsm.dtype.names and "X_umap" in obsm.dtype.names:
        return np.asarray(obsm["X_umap"], dtype=np.float32)[:, :2]
    if not isinstance(node, h5py.Dataset) or node.ndim != 2 or node.shape[0] != n_obs \
            or node.shape[1] < 2:
        return None
    return np.asarray(node[:, :2], dtype=np.float32)


# --- summaries --------------------------------------------------------------------------

def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _describe(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {k: None for k in ("mean", "median", "min", "max", "q25", "q75")}
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {"mean": float(values.mean()), "median": float(median), "min": float(values.min()),
            "max": float(values.max()), "q25": float(q25), "q75": float(q75)}


def _group_counts(codes, categories) -> dict[str, int] | None:
    if codes is None:
        return None
    counts = np.bincount(codes[codes >= 0], minlength=len(categories))
    result = {str(name): int(n) for name, n in zip(categories, counts)}
    missing = int((codes < 0).sum())
    if missing:
        result["(missing)"] = missing
    return result
