"""Benchmark: AnnData QC statistics and figures of a large sparse ``.h5ad``, against scanpy.

Writes a CSR ``.h5ad`` in anndata's on-disk format block by block (so the generator stays
bounded too): lognormal gene weights, 13 ``MT-`` genes, categorical ``sample`` and
``cell_type``, an ``obsm/X_umap``. Then, each in its own child process (peak RSS is the
child's own), runs ``stats_service.anndata_qc.compute``, the file figures from the saved
statistics, and, when scanpy is installed, ``scanpy.read_h5ad`` + ``calculate_qc_metrics``.
Prints a table and ratios; asserts nothing.

    python -m tests.bench.stats [--cells 200000 --genes 20000 --nnz 100000000] [--json out.json]

Targets: statistics under 512 MiB peak RSS and at most half of scanpy's time; figures
under 5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BLOCK_CELLS = 4000
MT_GENES = 13


def _string_array(group, name: str, values) -> None:
    import h5py
    ds = group.create_dataset(name, data=np.array(values, dtype=object),
                              dtype=h5py.string_dtype())
    ds.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})


def _categorical(group, name: str, codes: np.ndarray, categories) -> None:
    node = group.create_group(name)
    node.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0",
                       "ordered": False})
    node.create_dataset("codes", data=codes)
    _string_array(node, "categories", categories)


def _dataframe(group, index, columns: dict) -> None:
    group.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0",
                        "_index": "_index", "column-order": list(columns)})
    _string_array(group, "_index", index)
    for name, (codes, categories) in columns.items():
        _categorical(group, name, codes, categories)


def make_h5ad(path: Path, n_cells: int, n_genes: int, nnz: int, seed: int = 0) -> int:
    """Write the synthetic file; return its number of stored values."""
    import h5py
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.0, n_genes)
    weights[:MT_GENES] *= 20                     # mitochondrial genes are highly expressed
    p = weights / weights.sum()
    cdf = np.cumsum(p)
    per_cell = nnz / n_cells
    genes = [f"MT-{i}" for i in range(MT_GENES)] + [f"G{i}" for i in range(MT_GENES, n_genes)]
    samples = [f"sample{i}" for i in range(8)]
    cell_types = ["T cell", "B cell", "NK cell", "monocyte", "dendritic", "platelet"]
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": (n_cells, n_genes)})
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32,
                                chunks=(1 << 18,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32,
                                   chunks=(1 << 18,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        written = 0
        for start in range(0, n_cells, BLOCK_CELLS):
            stop = min(n_cells, start + BLOCK_CELLS)
            n = stop - start
            # Draws per cell vary 10x; drawing with replacement and merging repeats gives
            # counts, with more draws than genes kept so the unique pairs reach the target.
            draws = np.maximum(1, (rng.lognormal(0, 0.5, n) * per_cell * 0.95)).astype(np.int64)
            rows = np.repeat(np.arange(n, dtype=np.int64), draws)
            cols = np.minimum(np.searchsorted(cdf, rng.random(rows.size) * cdf[-1]), n_genes - 1)
            keys, counts = np.unique(rows * n_genes + cols, return_counts=True)
            row_of = keys // n_genes
            indptr[start + 1:stop + 1] = written + np.cumsum(np.bincount(row_of, minlength=n))
            data.resize((written + keys.size,))
            indices.resize((written + keys.size,))
            data[written:] = counts.astype(np.float32)
            indices[written:] = (keys % n_genes).astype(np.int32)
            written += keys.size
        # As scipy (and so anndata) stores them: indptr and indices share one integer type.
        x.create_dataset("indptr", data=indptr.astype(np.int32) if written < 2**31 else indptr)
        obs_codes = {
            "sample": (np.sort(rng.integers(0, len(samples), n_cells)).astype(np.int8), samples),
            "cell_type": (rng.integers(0, len(cell_types), n_cells).astype(np.int8), cell_types),
        }
        _dataframe(f.create_group("obs"), [f"c{i}" for i in range(n_cells)], obs_codes)
        _dataframe(f.create_group("var"), genes, {})
        obsm = f.create_group("obsm")
        obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        centres = rng.normal(0, 8, (len(cell_types), 2))
        umap = centres[obs_codes["cell_type"][0]] + rng.normal(0, 1, (n_cells, 2))
        ds = obsm.create_dataset("X_umap", data=umap.astype(np.float32))
        ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        for name in ("layers", "obsp", "varm", "varp", "uns"):
            g = f.create_group(name)
            g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    return written


# --- children ---------------------------------------------------------------------------

def child_compute(path: str, out: str) -> dict:
    from stats_service import anndata_qc
    started = time.perf_counter()
    stats = anndata_qc.compute(path)
    wall = time.perf_counter() - started
    with open(out, "wb") as f:
        stats.save(f)
    return {"wall": wall, "timings": stats.timings, "n_hvg": int(stats.hvg.size)}


def child_figures(stats_path: str) -> dict:
    from stats_service import anndata_qc, figures
    with open(stats_path, "rb") as f:
        stats = anndata_qc.AnnDataStats.load(f)
    started = time.perf_counter()
    made, errors = figures.make_figures(stats, "benchmark")
    wall = time.perf_counter() - started
    return {"wall": wall, "figures": sorted(made), "errors": errors,
            "bytes": sum(len(v) for v in made.values())}


def child_scanpy(path: str) -> dict:
    import scanpy as sc
    started = time.perf_counter()
    adata = sc.read_h5ad(path)
    read = time.perf_counter() - started
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=[20], log1p=False,
                               inplace=True)
    wall = time.perf_counter() - started
    return {"wall": wall, "read": read, "qc": wall - read}


def run_child(kind: str, *args: str) -> dict:
    """Run a child of this script; its result plus its own peak RSS in MiB."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.stats", "--child", kind, *args],
                            cwd=REPO, stdout=subprocess.PIPE)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed with status {proc.returncode}")
    result = json.loads(output.decode().strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024     # Linux reports KiB
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=100_000_000, help="about this many values")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-scanpy", action="store_true", help="skip the scanpy comparison")
    parser.add_argument("--keep", help="write the .h5ad here (reused when it exists)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"compute": child_compute, "figures": child_figures,
                  "scanpy": child_scanpy}[kind](*rest)
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="stats-bench-") as scratch:
        path = Path(args.keep) if args.keep else Path(scratch) / "bench.h5ad"
        started = time.perf_counter()
        if not path.exists():
            nnz = make_h5ad(path, args.cells, args.genes, args.nnz)
        else:
            import h5py
            with h5py.File(path, "r") as f:
                nnz = f["X/data"].shape[0]
        print(f"file: {args.cells} cells x {args.genes} genes, {nnz:,} values, "
              f"{path.stat().st_size / 2**20:,.0f} MiB, made in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        results: dict = {"cells": args.cells, "genes": args.genes, "nnz": nnz}
        stats_path = str(Path(scratch) / "stats.npz")
        results["compute"] = run_child("compute", str(path), stats_path)
        results["figures"] = run_child("figures", stats_path)
        have_scanpy = not args.no_scanpy and _has_scanpy()
        if have_scanpy:
            results["scanpy"] = run_child("scanpy", str(path))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _has_scanpy() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("scanpy") is not None
    except ImportError:
        return False


def report(results: dict) -> None:
    c, fig = results["compute"], results["figures"]
    t = c["timings"]
    rows = [
        ("labvault compute (all)", c["wall"], c["peak_rss_mib"]),
        ("  QC metrics pass", t.get("qc", 0.0), None),
        ("  HVG", t.get("hvg", 0.0), None),
        ("  PCA (2 passes)", t.get("pca", 0.0), None),
        ("labvault file figures", fig["wall"], fig["peak_rss_mib"]),
    ]
    if "scanpy" in results:
        s = results["scanpy"]
        rows += [("scanpy read + QC", s["wall"], s["peak_rss_mib"]),
                 ("  read_h5ad", s["read"], None), ("  calculate_qc_metrics", s["qc"], None)]
    print(f"\n{'step':<28}{'seconds':>10}{'peak RSS MiB':>14}")
    for name, seconds, rss in rows:
        print(f"{name:<28}{seconds:>10.2f}{'' if rss is None else f'{rss:,.0f}':>14}")
    if fig.get("errors"):
        print("figure errors:", fig["errors"])
    if "scanpy" in results:
        s = results["scanpy"]
        results["ratios"] = {
            "time_all_vs_scanpy": c["wall"] / s["wall"],
            "time_qc_vs_scanpy": t.get("qc", 0.0) / s["wall"],
            "rss_vs_scanpy": c["peak_rss_mib"] / s["peak_rss_mib"],
        }
        r = results["ratios"]
        print(f"\nlabvault / scanpy: time (all stats) {r['time_all_vs_scanpy']:.2f}, "
              f"time (QC pass only) {r['time_qc_vs_scanpy']:.2f}, "
              f"peak RSS {r['rss_vs_scanpy']:.2f}")
    print("targets: stats < 512 MiB peak RSS, <= 0.5 x scanpy's time; figures < 5 s")


if __name__ == "__main__":
    raise SystemExit(main())
