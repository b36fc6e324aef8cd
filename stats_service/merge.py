"""A merged AnnData file of several ``.h5ad`` inputs, built on disk with bounded memory.

The tables (obs, var) are concatenated by ``anndata.experimental.concat_on_disk``; so is
``X`` when the inputs order their genes differently (it reindexes in row slices). When the
gene order is the same everywhere (the usual case) concat_on_disk would read each input's
whole matrix at once, so it is handed an empty placeholder instead and the CSR arrays are
stacked here, slice by slice (``MAX_LOADED_ELEMS``). concat_on_disk carries neither
``.raw`` nor ``.uns``: the raw counts go through a second pass of the same kind into the
target's ``raw`` group (an ``h5py`` copy when concat_on_disk built them). Every input is first checked
by reading only its shapes and names, so a refusal (``MergeSkipped``) writes nothing.

What the merged file keeps: ``X``, ``raw.X`` with ``raw.var``, the ``obs`` columns common to
every input plus ``labvault_sample`` and ``labvault_file``, and the ``var`` columns equal in
every input. Layers, ``obsm``, ``obsp`` and ``uns`` are left out: they differ per sample and
dense ones would need dask. Memory grows with the obs and var tables (concat_on_disk reads
them whole; a few dozen bytes a cell), never with the matrices. Heavy libraries are
imported inside the functions.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stats_service.errors import INVALID_MATRIX, MISSING_MATRIX, NOT_HDF5, StatsInputError

logger = logging.getLogger(__name__)

# Refusal codes (on MergeSkipped).
TOO_FEW_FILES = "too_few_files"
GENES_INCOMPATIBLE = "genes_incompatible"
RAW_INCOMPATIBLE = "raw_incompatible"
TOO_MANY_CELLS = "too_many_cells"
UNSUPPORTED_MATRIX = "unsupported_matrix"

SAMPLE_COLUMN = "labvault_sample"
FILE_COLUMN = "labvault_file"
# Separator concat_on_disk puts between a clashing obs name and its file label.
INDEX_SEPARATOR = "-"
# Elements of a sparse matrix held at once while concatenating (values and indices):
# about 10 M elements is ~100 MB, a fraction of anndata's 100 M default.
MAX_LOADED_ELEMS = 10_000_000

CSR = "csr_matrix"
DENSE = "array"


class MergeSkipped(Exception):
    """The inputs cannot (or should not) be merged; ``code`` says why. Nothing was written."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        return str(self)


@dataclass
class _Input:
    path: Path
    sample: str
    label: str
    cells: int
    genes: list[str]
    encoding: str
    raw_genes: list[str] | None
    raw_encoding: str | None


def merge_h5ad(inputs: list[tuple[Path, str, str]], target: Path, max_cells: int,
               progress: Callable[[float, str], None] | None = None) -> dict:
    """Merge ``(path, sample, file_label)`` inputs, in the order given, into one ``.h5ad`` at ``target``.

    Returns ``{"cells", "genes", "files", "has_raw"}``; raises MergeSkipped before writing
    anything when the inputs are too few, incompatible or too many cells."""
    report = progress or (lambda percent, message: None)
    labels = [str(label) for _, _, label in inputs]
    if len(set(labels)) != len(labels):
        raise ValueError("file labels must be unique: they name each cell's source")
    if len(inputs) < 2:
        raise MergeSkipped(TOO_FEW_FILES, f"a merge needs at least 2 AnnData files, there are {len(inputs)}")
    report(0, "checking the inputs")
    described = [_describe(Path(path), str(sample), str(label)) for path, sample, label in inputs]
    _check(described, max_cells)
    clash = _obs_names_clash(described)

    target = Path(target)
    scratch = Path(tempfile.mkdtemp(prefix=".merge-", dir=target.parent))
    partial = target.with_name(f".{target.name}.partial")
    has_raw = described[0].raw_genes is not None
    try:
        views = scratch / "views.h5"
        stacked = _write_views(views, described)
        report(10, "merging the matrices")
        _concat(views, "X", partial, labels, clash)
        if "X" in stacked:
            _stack_into(partial, "X", described, "X")
        if has_raw:
            report(55, "merging the raw counts")
            raw_merged = scratch / "raw.h5"
            _concat(views, "raw", raw_merged, labels, clash)
            _attach_raw(raw_merged, partial, copy_matrix="raw" not in stacked)
            if "raw" in stacked:
                _stack_into(partial, "raw/X", described, "raw/X")
        report(95, "labelling the cells")
        _label_cells(partial, described)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(100, "merged")
    return {"cells": sum(item.cells for item in described), "genes": len(described[0].genes),
            "files": len(described), "has_raw": has_raw}


def _describe(path: Path, sample: str, label: str) -> _Input:
    """Shapes, names and matrix encodings of one input, read with h5py (no matrix is loaded)."""
    import h5py
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise StatsInputError(f"{label}: not an HDF5 (AnnData) file", code=NOT_HDF5) from None
    with handle:
        try:
            return _describe_open(handle, path, sample, label)
        except KeyError:  # an attribute or dataset the AnnData layout requires is missing
            raise StatsInputError(f"{label}: is not laid out as an AnnData file", code=INVALID_MATRIX) from None


def _describe_open(handle, path: Path, sample: str, label: str) -> _Input:
    if "X" not in handle:
        raise StatsInputError(f"{label}: has no X matrix", code=MISSING_MATRIX)
    if "obs" not in handle or "var" not in handle:
        raise StatsInputError(f"{label}: has no obs or var table", code=INVALID_MATRIX)
    cells = len(handle["obs"][_index_key(handle["obs"])])
    genes = _names(handle["var"])
    encoding, shape = _matrix(handle["X"])
    if tuple(shape) != (cells, len(genes)):
        raise StatsInputError(f"{label}: X is {tuple(shape)}, obs and var say {(cells, len(genes))}",
                              code=INVALID_MATRIX)
    raw_genes = raw_encoding = None
    if "raw" in handle and "X" in handle["raw"]:
        raw_genes = _names(handle["raw"]["var"])
        raw_encoding, raw_shape = _matrix(handle["raw"]["X"])
        if tuple(raw_shape) != (cells, len(raw_genes)):
            raise StatsInputError(f"{label}: raw.X is {tuple(raw_shape)}, expected {cells} cells "
                                  f"by {len(raw_genes)} genes", code=INVALID_MATRIX)
    return _Input(path.resolve(), sample, label, cells, genes, encoding, raw_genes, raw_encoding)


def _index_key(group) -> str:
    key = group.attrs.get("_index", "_index")
    return key.decode() if isinstance(key, bytes) else str(key)


def _names(group) -> list[str]:
    from anndata.io import read_elem
    return [str(name) for name in read_elem(group[_index_key(group)])]


def _matrix(element) -> tuple[str, tuple[int, ...]]:
    import h5py
    if isinstance(element, h5py.Dataset):
        return DENSE, tuple(element.shape)
    encoding = element.attrs.get("encoding-type", "")
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    return encoding, tuple(int(n) for n in element.attrs.get("shape", ()))


def _check(described: list[_Input], max_cells: int) -> None:
    first = described[0]
    for item in described[1:]:
        if not _same_genes(first.genes, item.genes):
            raise MergeSkipped(GENES_INCOMPATIBLE, f"{item.label} does not have the genes of {first.label}")
        if (item.raw_genes is None) != (first.raw_genes is None):
            with_raw, without = (first, item) if item.raw_genes is None else (item, first)
            raise MergeSkipped(RAW_INCOMPATIBLE, f"{with_raw.label} has raw counts, {without.label} has none")
        if first.raw_genes is not None and not _same_genes(first.raw_genes, item.raw_genes):
            raise MergeSkipped(GENES_INCOMPATIBLE,
                               f"{item.label} does not have the raw genes of {first.label}")
    total = sum(item.cells for item in described)
    if total > max_cells:
        raise MergeSkipped(TOO_MANY_CELLS, f"the files hold {total} cells, a merge takes at most {max_cells}")
    for kind, encodings in (("X", [item.encoding for item in described]),
                            ("raw.X", [item.raw_encoding for item in described if item.raw_encoding])):
        if encodings and not (set(encodings) == {CSR} or (set(encodings) == {DENSE} and _have_dask())):
            # concat_on_disk streams CSR by rows; dense matrices need dask, CSC cannot stack by rows.
            raise MergeSkipped(UNSUPPORTED_MATRIX,
                               f"{kind} must be a CSR sparse matrix in every file (found {sorted(set(encodings))})")


def _same_genes(first: list[str], other: list[str]) -> bool:
    if first == other:
        return True
    # Another order is reindexed by name, which needs names that are unique.
    return len(first) == len(other) == len(set(first)) and set(first) == set(other)


def _have_dask() -> bool:
    try:
        import dask  # noqa: F401
    except ImportError:
        return False
    return True


def _obs_names_clash(described: list[_Input]) -> bool:
    """True when two cells (in one file or across files) share an obs name."""
    import h5py
    seen: set[str] = set()
    count = 0
    for item in described:
        with h5py.File(item.path, "r") as handle:
            seen.update(_names(handle["obs"]))
        count += item.cells
        if len(seen) != count:
            return True
    return False


def _write_views(views: Path, described: list[_Input]) -> set[str]:
    """An HDF5 file of AnnData-shaped groups that link (external links: no bytes copied) to each
    input's matrix and tables: ``X/<i>`` for the processed matrix, ``raw/<i>`` for raw counts.
    Returns the kinds whose matrices get an empty placeholder, to be stacked by ``_stack_into``."""
    import h5py
    from anndata.io import write_elem
    stacked = {kind for kind, genes, encodings in (
        ("X", [item.genes for item in described], {item.encoding for item in described}),
        ("raw", [item.raw_genes for item in described], {item.raw_encoding for item in described}))
        if genes[0] is not None and all(names == genes[0] for names in genes) and encodings == {CSR}}
    with h5py.File(views, "w") as handle:
        for number, item in enumerate(described):
            source = str(item.path)
            for kind in ("X", "raw"):
                if kind == "raw" and item.raw_genes is None:
                    continue
                group = handle.create_group(f"{kind}/{number}")
                group.attrs["encoding-type"], group.attrs["encoding-version"] = "anndata", "0.1.0"
                prefix = "" if kind == "X" else "/raw"
                if kind in stacked:
                    genes = item.genes if kind == "X" else item.raw_genes
                    _placeholder(group, (item.cells, len(genes)))
                else:
                    group["X"] = h5py.ExternalLink(source, f"{prefix}/X")
                group["var"] = h5py.ExternalLink(source, f"{prefix}/var")
                if kind == "X":
                    group["obs"] = h5py.ExternalLink(source, "/obs")
                else:
                    # Only the cell names: the obs columns come with the processed matrix.
                    with h5py.File(item.path, "r") as input_file:
                        index = _index_key(input_file["obs"])
                    obs = group.create_group("obs")
                    obs.attrs.update({"_index": "_index", "encoding-type": "dataframe",
                                      "encoding-version": "0.2.0"})
                    obs.attrs.create("column-order", [], dtype=h5py.string_dtype())
                    obs["_index"] = h5py.ExternalLink(source, f"/obs/{index}")
                # Left out on purpose (see the module docstring); concat_on_disk needs them present.
                for name in ("obsm", "varm", "obsp", "varp", "layers"):
                    write_elem(group, name, {})
    return stacked


def _placeholder(group, shape: tuple[int, int]) -> None:
    """An all-zero CSR matrix of ``shape`` that takes no memory: indptr is all HDF5 fill value."""
    import numpy as np
    matrix = group.create_group("X")
    matrix.attrs.update({"encoding-type": CSR, "encoding-version": "0.1.0", "shape": shape})
    matrix.create_dataset("data", shape=(0,), dtype=np.float32)
    matrix.create_dataset("indices", shape=(0,), dtype=np.int32)
    matrix.create_dataset("indptr", shape=(shape[0] + 1,), dtype=np.int64, fillvalue=0)


def _stack_into(target: Path, name: str, described: list[_Input], source_name: str) -> None:
    """Replace ``name`` in ``target`` by the inputs' ``source_name`` CSR matrices stacked by rows,
    copying at most ``MAX_LOADED_ELEMS`` values at a time."""
    import contextlib

    import h5py
    import numpy as np
    step = max(1, MAX_LOADED_ELEMS)
    with contextlib.ExitStack() as stack, h5py.File(target, "a") as handle:
        sources = [stack.enter_context(h5py.File(item.path, "r"))[source_name] for item in described]
        cells = sum(int(source.attrs["shape"][0]) for source in sources)
        genes = int(sources[0].attrs["shape"][1])
        nnz = sum(source["indices"].shape[0] for source in sources)
        if name in handle:
            del handle[name]  # the placeholder concat_on_disk copied
        matrix = handle.create_group(name)
        matrix.attrs.update({"encoding-type": CSR, "encoding-version": "0.1.0", "shape": (cells, genes)})
        outputs = {
            "data": matrix.create_dataset("data", shape=(nnz,),
                                          dtype=np.result_type(*(s["data"].dtype for s in sources))),
            "indices": matrix.create_dataset("indices", shape=(nnz,),
                                             dtype=np.result_type(*(s["indices"].dtype for s in sources))),
        }
        indptr = matrix.create_dataset("indptr", shape=(cells + 1,),
                                       dtype=np.int64 if nnz >= np.iinfo(np.int32).max else np.int32)
        indptr[0] = 0
        row = offset = 0
        for source in sources:
            count = source["indices"].shape[0]
            for key, output in outputs.items():
                for start in range(0, count, step):
                    stop = min(count, start + step)
                    output[offset + start:offset + stop] = source[key][start:stop]
            rows = int(source.attrs["shape"][0])
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                # indptr[0] of each input is 0: its rows continue where the last input ended.
                indptr[row + start + 1:row + stop + 1] = source["indptr"][start + 1:stop + 1].astype(np.int64) + offset
            row += rows
            offset += count


def _concat(views: Path, kind: str, out: Path, labels: list[str], clash: bool) -> None:
    import h5py
    from anndata.experimental import concat_on_disk
    # Opened read-only here so the external links open the inputs read-only too.
    with h5py.File(views, "r") as handle, h5py.File(out, "w") as output:
        groups = [handle[f"{kind}/{number}"] for number in range(len(handle[kind]))]
        concat_on_disk(groups, output, axis=0, join="inner", merge="same", keys=labels,
                       index_unique=INDEX_SEPARATOR if clash else None, max_loaded_elems=MAX_LOADED_ELEMS)


def _attach_raw(raw_merged: Path, target: Path, copy_matrix: bool) -> None:
    """Copy the merged raw var table (and counts, unless they are stacked separately) into
    ``target``'s ``raw`` group (HDF5 copies)."""
    import h5py
    from anndata.io import write_elem
    with h5py.File(raw_merged, "r") as source, h5py.File(target, "a") as handle:
        raw = handle.create_group("raw")
        raw.attrs["encoding-type"], raw.attrs["encoding-version"] = "raw", "0.1.0"
        if copy_matrix:
            source.copy(source["X"], raw, "X")
        source.copy(source["var"], raw, "var")
        write_elem(raw, "varm", {})


def _label_cells(target: Path, described: list[_Input]) -> None:
    """Write the ``labvault_sample`` and ``labvault_file`` categorical obs columns, and make the cell
    names unique when one input repeated a name (the file label alone cannot separate those)."""
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import write_elem
    counts = [item.cells for item in described]
    samples = list(dict.fromkeys(item.sample for item in described))
    columns = {
        SAMPLE_COLUMN: pd.Categorical.from_codes(
            np.repeat([samples.index(item.sample) for item in described], counts), categories=samples),
        FILE_COLUMN: pd.Categorical.from_codes(
            np.repeat(np.arange(len(described)), counts), categories=[item.label for item in described]),
    }
    with h5py.File(target, "a") as handle:
        obs = handle["obs"]
        index = pd.Index(_names(obs))
        if not index.is_unique:
            from anndata.utils import make_index_unique
            del obs[_index_key(obs)]
            write_elem(obs, _index_key(obs), make_index_unique(index).to_numpy())
        order = [str(name) for name in obs.attrs.get("column-order", []) if str(name) not in columns]
        for name, values in columns.items():
            if name in obs:  # an input that was itself a merge: its labels are replaced
                del obs[name]
            write_elem(obs, name, values)
        obs.attrs.create("column-order", [*order, *columns], dtype=h5py.string_dtype())
