"""PNG figures of AnnData and table statistics, drawn with matplotlib's Figure API.

No pyplot: each figure is its own ``Figure`` on an Agg canvas, so nothing global is touched
and figures can be drawn from any thread. PNG bytes carry no software or date metadata,
so the same statistics give the same bytes. Scatter plots draw at most ``MAX_POINTS``
cells, chosen by a fixed-seed generator.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from stats_service.anndata_qc import AnnDataStats
from stats_service.errors import FIGURE_FAILED

logger = logging.getLogger(__name__)

MAX_POINTS = 50_000
DPI = 100
WIDTH = 8.0          # inches: 800 px at DPI
MAX_GROUPS = 40      # bars or violins beyond this are folded into "other"
PALETTE = "tab20"


# --- public API -------------------------------------------------------------------------

def make_figures(stats: AnnDataStats, title: str) -> tuple[dict[str, bytes], dict[str, dict]]:
    """File figures and, per figure that failed, ``{"code": "figure_failed", "message"}``."""
    return _draw_all(_file_plan(stats, title))


def file_figures(stats: AnnDataStats, title: str) -> dict[str, bytes]:
    """PNG bytes by figure name for one file; figures that do not apply are left out."""
    return make_figures(stats, title)[0]


def make_project_figures(items: Sequence[tuple[str, AnnDataStats]], title: str
                         ) -> tuple[dict[str, bytes], dict[str, dict]]:
    """Project figures (files side by side) and the errors of those that failed."""
    return _draw_all(_project_plan(list(items), title))


def project_figures(items: Sequence[tuple[str, AnnDataStats]], title: str) -> dict[str, bytes]:
    """PNG bytes by figure name for a project: one group per (label, stats) file."""
    return make_project_figures(items, title)[0]


def table_figures(table_stats: dict, title: str) -> dict[str, bytes]:
    """``column_histograms``: one grid of the numeric columns' histograms (if any)."""
    return make_table_figures(table_stats, title)[0]


def make_table_figures(table_stats: dict, title: str
                       ) -> tuple[dict[str, bytes], dict[str, dict]]:
    numeric = [c for c in table_stats.get("columns", []) if c.get("histogram")]
    plan = {"column_histograms": lambda: _column_histograms(numeric, title)} if numeric else {}
    return _draw_all(plan)


def highest_expressed_genes_tsv(stats: AnnDataStats) -> bytes:
    """The table behind ``highest_expressed_genes``: per top gene, its share across cells."""
    lines = ["gene\ttotal_counts\tpct_of_all_counts\tmedian_pct_per_cell\tmean_pct_per_cell"]
    grand_total = float(stats.gene_total_counts.sum()) or 1.0
    for slot, gene in enumerate(stats.top_genes):
        pct = stats.top_gene_pct[:, slot].astype(np.float64)
        pct = pct[np.isfinite(pct)]
        median = float(np.median(pct)) if pct.size else float("nan")
        mean = float(pct.mean()) if pct.size else float("nan")
        lines.append(f"{stats.gene_names[gene]}\t{stats.gene_total_counts[gene]:.6g}\t"
                     f"{100.0 * stats.gene_total_counts[gene] / grand_total:.4f}\t"
                     f"{median:.4f}\t{mean:.4f}")
    return ("\n".join(lines) + "\n").encode()


# --- plans: which figures apply ---------------------------------------------------------

def _file_plan(stats: AnnDataStats, title: str) -> dict[str, Callable[[], Figure]]:
    groups = _groups(stats.sample_codes, stats.sample_categories)
    plan = {
        "qc_violins": lambda: _qc_violins(_split(stats, groups), title, stats.n_obs),
        "genes_vs_counts": lambda: _genes_vs_counts([stats], title),
        "mito_vs_counts": lambda: _mito_vs_counts([stats], title),
        "highest_expressed_genes": lambda: _highest_expressed(stats, title),
        "knee": lambda: _knee([("all cells", stats)], title),
    }
    if stats.sample_codes is not None:
        plan["cells_per_sample"] = lambda: _bars(
            _counts(stats.sample_codes, stats.sample_categories),
            f"{title}: cells per sample ({stats.sample_key})", "sample", stats.n_obs)
    if stats.celltype_codes is not None:
        plan["cell_types"] = lambda: _bars(
            _counts(stats.celltype_codes, stats.celltype_categories),
            f"{title}: cells per cell type ({stats.celltype_key})", "cell type", stats.n_obs)
    if stats.umap is not None:
        plan["umap"] = lambda: _embedding(stats, stats.umap, "UMAP", title)
    if stats.pca.shape[1] >= 2:
        plan["pca"] = lambda: _embedding(stats, stats.pca[:, :2], "PC", title)
    return plan


def _project_plan(items: list[tuple[str, AnnDataStats]], title: str
                  ) -> dict[str, Callable[[], Figure]]:
    n = sum(s.n_obs for _, s in items)
    plan = {
        "qc_violins": lambda: _qc_violins(
            [(label, s.total_counts, s.n_genes_by_counts, s.pct_counts_mt)
             for label, s in items], title, n),
        "genes_vs_counts": lambda: _genes_vs_counts([s for _, s in items], title),
        "mito_vs_counts": lambda: _mito_vs_counts([s for _, s in items], title),
        "knee": lambda: _knee(items, title),
        "cells_per_sample": lambda: _bars(_project_counts(items, "sample"),
                                          f"{title}: cells per file/sample", "sample", n),
    }
    if any(s.celltype_codes is not None for _, s in items):
        plan["cell_types"] = lambda: _bars(_project_counts(items, "celltype"),
                                           f"{title}: cells per cell type", "cell type", n)
    if len(items) == 1:
        plan["highest_expressed_genes"] = lambda: _highest_expressed(items[0][1], title)
    return plan


def _draw_all(plan: dict[str, Callable[[], Figure]]) -> tuple[dict[str, bytes], dict[str, dict]]:
    figures, errors = {}, {}
    for name, draw in plan.items():
        try:
            figures[name] = _png(draw())
        except Exception as exc:  # one figure's failure must not cost the others
            logger.exception("figure %s failed", name)
            errors[name] = {"code": FIGURE_FAILED,
                            "message": f"{name}: {type(exc).__name__}: "
                                       + " ".join(str(exc).split())[:200]}
    return figures, errors


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _figure(height: float, ncols: int = 1, nrows: int = 1, **kwargs):
    figure = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False, **kwargs)
    return figure, axes


# --- data helpers ---------------------------------------------------------------------

def _groups(codes, categories) -> list[tuple[str, np.ndarray]] | None:
    if codes is None:
        return None
    return [(str(name), codes == i) for i, name in enumerate(categories)
            if np.any(codes == i)][:MAX_GROUPS]


def _split(stats: AnnDataStats, groups):
    if not groups or len(groups) == 1:
        return [("all cells", stats.total_counts, stats.n_genes_by_counts, stats.pct_counts_mt)]
    return [(name, stats.total_counts[m], stats.n_genes_by_counts[m], stats.pct_counts_mt[m])
            for name, m in groups]


def _counts(codes, categories) -> list[tuple[str, int]]:
    counts = np.bincount(codes[codes >= 0], minlength=len(categories))
    pairs = [(str(name), int(n)) for name, n in zip(categories, counts) if n]
    missing = int(np.count_nonzero(codes < 0))
    if missing:
        pairs.append(("(missing)", missing))
    return pairs


def _project_counts(items, which: str) -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for label, s in items:
        codes = getattr(s, f"{which}_codes")
        if codes is None:
            pairs = [(label, s.n_obs)] if which == "sample" else [("(none)", s.n_obs)]
        else:
            categories = getattr(s, f"{which}_categories")
            pairs = [(f"{label}/{n}" if which == "sample" and len(items) > 1 else n, c)
                     for n, c in _counts(codes, categories)]
        for name, count in pairs:
            totals[name] = totals.get(name, 0) + count
    return list(totals.items())


def _sample(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, limit, replace=False))


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _fold(pairs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    pairs = sorted(pairs, key=lambda p: -p[1])
    if len(pairs) <= MAX_GROUPS:
        return pairs
    rest = sum(c for _, c in pairs[MAX_GROUPS - 1:])
    return pairs[:MAX_GROUPS - 1] + [(f"other ({len(pairs) - MAX_GROUPS + 1})", rest)]


# --- figures --------------------------------------------------------------------------

def _qc_violins(groups, title: str, n_cells: int) -> Figure:
    figure, axes = _figure(4.2, ncols=3)
    metrics = (("total counts per cell", 1, True), ("genes per cell", 2, True),
               ("% counts in mitochondrial genes", 3, False))
    labels = [g[0] for g in groups]
    # A violin's density costs cells x grid points: a fixed subsample draws the same shape.
    groups = [(g[0], *(np.asarray(v)[_sample(len(v), MAX_POINTS // len(groups))]
                       for v in g[1:])) for g in groups]
    for ax, (label, index, log) in zip(axes[0], metrics):
        series = [_finite(g[index]) for g in groups]
        if log:
            series = [np.log10(s[s > 0]) for s in series]
        positions = [i for i, s in enumerate(series) if s.size > 1]
        if positions:
            parts = ax.violinplot([series[i] for i in positions], positions=positions,
                                  showmedians=True, widths=0.8)
            for body in parts["bodies"]:
                body.set_alpha(0.6)
        ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 3 else 0,
                      ha="right" if len(labels) > 3 else "center", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(f"log10({label})" if log else label, fontsize=9)
    figure.suptitle(f"{title}: QC metrics ({n_cells:,} cells)")
    return figure


def _scatter_cells(stats_list, x_of, y_of, c_of, title, xlabel, ylabel, clabel, logx, logy):
    figure, axes = _figure(5.5)
    ax = axes[0, 0]
    xs, ys, cs = [], [], []
    for s in stats_list:
        keep = _sample(s.n_obs, MAX_POINTS // max(1, len(stats_list)))
        xs.append(x_of(s)[keep])
        ys.append(y_of(s)[keep])
        cs.append(c_of(s)[keep])
    x, y, c = (np.concatenate(v).astype(np.float64) for v in (xs, ys, cs))
    n = sum(s.n_obs for s in stats_list)
    ok = np.isfinite(x) & np.isfinite(y) & (~logx | (x > 0)) & (~logy | (y > 0))
    points = ax.scatter(x[ok], y[ok], c=np.nan_to_num(c[ok]), s=2, cmap="viridis",
                        rasterized=True, linewidths=0)
    figure.colorbar(points, ax=ax, label=clabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    shown = int(ok.sum())
    ax.set_title(f"{title}: {n:,} cells" + (f" ({shown:,} shown)" if shown < n else ""))
    return figure


def _genes_vs_counts(stats_list, title: str) -> Figure:
    return _scatter_cells(stats_list, lambda s: s.total_counts, lambda s: s.n_genes_by_counts,
                          lambda s: s.pct_counts_mt, f"{title}: genes vs counts",
                          "total counts per cell", "genes per cell", "% mitochondrial",
                          True, True)


def _mito_vs_counts(stats_list, title: str) -> Figure:
    return _scatter_cells(stats_list, lambda s: s.total_counts, lambda s: s.pct_counts_mt,
                          lambda s: s.n_genes_by_counts, f"{title}: mitochondrial share",
                          "total counts per cell", "% counts in mitochondrial genes",
                          "genes per cell", True, False)


def _highest_expressed(stats: AnnDataStats, title: str) -> Figure:
    n_top = stats.top_genes.size
    figure, axes = _figure(max(3.0, 0.3 * n_top + 1.2))
    ax = axes[0, 0]
    keep = _sample(stats.n_obs)
    data = [_finite(stats.top_gene_pct[keep, slot]) for slot in range(n_top)][::-1]
    names = [str(stats.gene_names[g]) for g in stats.top_genes][::-1]
    ax.boxplot(data, widths=0.7, showfliers=False, patch_artist=True,
               boxprops={"facecolor": "#9ecae1"}, **_horizontal())
    ax.set_yticks(range(1, n_top + 1), names)
    ax.set_xlabel("% of the cell's total counts")
    ax.set_title(f"{title}: {n_top} most expressed genes ({stats.n_obs:,} cells)")
    ax.tick_params(axis="y", labelsize=8)
    return figure


def _horizontal() -> dict:
    # matplotlib 3.10 replaced boxplot's ``vert`` with ``orientation``; 3.7 knows only vert.
    import matplotlib
    major, minor = (int(p) for p in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def _knee(items, title: str) -> Figure:
    figure, axes = _figure(5.0)
    ax = axes[0, 0]
    n = 0
    for label, s in items:
        counts = np.sort(_finite(s.total_counts))[::-1]
        counts = counts[counts > 0]
        n += s.n_obs
        if counts.size == 0:
            continue
        # A log-spaced subset of ranks draws the same curve with a few thousand points.
        ranks = np.unique(np.geomspace(1, counts.size, min(counts.size, 5000)).astype(int))
        ax.plot(ranks, counts[ranks - 1], label=label, linewidth=1.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cell rank by total counts")
    ax.set_ylabel("total counts")
    ax.grid(True, which="both", alpha=0.3)
    if len(items) > 1:
        ax.legend(fontsize=8)
    ax.set_title(f"{title}: counts per cell by rank ({n:,} cells)")
    return figure


def _bars(pairs: list[tuple[str, int]], title: str, xlabel: str, n_cells: int) -> Figure:
    pairs = _fold(pairs)
    figure, axes = _figure(4.5)
    ax = axes[0, 0]
    names = [p[0] for p in pairs]
    values = [p[1] for p in pairs]
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0,
                  ha="right" if len(names) > 4 else "center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cells")
    if values and max(values) > 100 * max(1, min(values)):
        ax.set_yscale("log")
    ax.set_title(f"{title} ({n_cells:,} cells)", fontsize=10)
    return figure


def _embedding(stats: AnnDataStats, coords: np.ndarray, axis_name: str, title: str) -> Figure:
    panels = [(stats.sample_key, stats.sample_codes, stats.sample_categories),
              (stats.celltype_key, stats.celltype_codes, stats.celltype_categories)]
    panels = [p for p in panels if p[1] is not None] or [(None, None, None)]
    figure, axes = _figure(4.6 if len(panels) == 2 else 6.0, ncols=len(panels))
    keep = _sample(stats.n_obs)
    xy = coords[keep].astype(np.float64)
    for ax, (key, codes, categories) in zip(axes[0], panels):
        if codes is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=1, color="#4c72b0", rasterized=True, linewidths=0)
            ax.set_title("all cells", fontsize=10)
        else:
            c = codes[keep]
            cmap = _cmap()
            colours = np.asarray([cmap(i % cmap.N) for i in range(max(1, len(categories)))])
            # One scatter call for all groups (far cheaper than one per group), a legend
            # from proxy markers; missing values in grey.
            rgba = np.where((c >= 0)[:, None], colours[np.maximum(c, 0)], (0.7, 0.7, 0.7, 1.0))
            ax.scatter(xy[:, 0], xy[:, 1], s=1, c=rgba, rasterized=True, linewidths=0)
            if len(categories) <= 20:
                handles = [Line2D([], [], marker="o", linestyle="", markersize=4,
                                  color=colours[i], label=str(name))
                           for i, name in enumerate(categories)]
                ax.legend(handles=handles, fontsize=7, loc="upper right", frameon=False)  # "best" costs 0.25 s
            ax.set_title(f"coloured by {key}", fontsize=10)
        ax.set_xlabel(f"{axis_name}1")
        ax.set_ylabel(f"{axis_name}2")
        ax.set_xticks([])
        ax.set_yticks([])
    extra = ""
    if axis_name == "PC" and stats.pca_variance_ratio.size >= 2:
        extra = (f", PC1 {100 * stats.pca_variance_ratio[0]:.1f}%"
                 f" PC2 {100 * stats.pca_variance_ratio[1]:.1f}% of HVG variance")
    figure.suptitle(f"{title}: {axis_name if axis_name != 'PC' else 'PCA'} "
                    f"({stats.n_obs:,} cells{extra})")
    return figure


def _cmap():
    from matplotlib import colormaps
    return colormaps[PALETTE]


def _column_histograms(columns: list[dict], title: str) -> Figure:
    columns = columns[:36]
    ncols = min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    figure, axes = _figure(2.6 * nrows + 0.6, ncols=ncols, nrows=nrows)
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, columns):
        hist = column["histogram"]
        edges = np.asarray(hist["edges"], dtype=np.float64)
        counts = np.asarray(hist["counts"], dtype=np.float64)
        ax.stairs(counts, edges, fill=True, color="#4c72b0")
        ax.set_title(f"{column['name']} ({column['type']})", fontsize=9)
        ax.set_ylabel("rows", fontsize=8)
        ax.tick_params(labelsize=7)
        if counts.size and counts.max() > 100 * max(1.0, counts[counts > 0].min()):
            ax.set_yscale("log")
    figure.suptitle(f"{title}: numeric columns")
    return figure
