"""Stats that come by themselves: an ingest brings its project's statistics and figures up to date,
equal to an in-memory computation; a repeated request is a cache hit; a new input rebuilds only
what depends on it; corrupt files fail alone."""
import io

import numpy as np
import pytest
import requests

from tests.helpers import h5ad_bytes, new_project, payload_bundle, wait_for

pytest.importorskip("anndata")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSV = b"gene,score,group\nA,1.5,x\nB,2.5,y\nC,,x\nD,4.0,NA\n"


def stats_of(stack, project: str, files: int, timeout: float = 120) -> dict:
    """The project's summary once it covers ``files`` files, none of them still without a verdict."""
    def ready():
        document = requests.get(f"{stack.url('stats')}/stats/{project}", timeout=30).json()
        if document.get("state") == "ok" and len(document.get("files", [])) == files:
            return document
        return None
    return wait_for(ready, timeout=timeout, interval=0.3, message=f"stats of {project}")


def by_path(document: dict) -> dict:
    return {entry["path"]: entry for entry in document["files"]}


@pytest.fixture(scope="module")
def ingested(stack):
    project = new_project(stack, "stats")
    (a, a_counts), (b, b_counts) = h5ad_bytes(seed=1), h5ad_bytes(seed=2, raw=True, samples=("s3",))
    final = stack.ingest(payload_bundle({"run1/a.h5ad": a, "run2/b.h5ad": b, "tables/c.csv": CSV},
                                        project=project), timeout=120)
    assert final["state"] == "OK", final
    return project, {"run1/a.h5ad": a_counts, "run2/b.h5ad": b_counts}


def test_an_ingest_brings_the_projects_stats_with_no_further_command(stack, ingested):
    project, counts = ingested
    document = stats_of(stack, project, 3)
    files = by_path(document)
    for path, matrix in counts.items():
        entry = files[path]
        assert entry["state"] == "ok" and entry["kind"] == "anndata", entry
        stats = entry["stats"]
        totals = matrix.sum(axis=1)
        mito = matrix[:, :13].sum(axis=1) / totals * 100
        assert (stats["n_obs"], stats["n_vars"]) == matrix.shape
        assert stats["nnz"] == int(np.count_nonzero(matrix))
        assert stats["per_cell"]["total_counts"]["mean"] == pytest.approx(totals.mean(), rel=1e-6)
        assert stats["per_cell"]["total_counts"]["median"] == pytest.approx(np.median(totals), rel=1e-6)
        assert stats["per_cell"]["pct_counts_mt"]["max"] == pytest.approx(mito.max(), rel=1e-5)
        assert stats["per_cell"]["n_genes_by_counts"]["min"] == (matrix > 0).sum(axis=1).min()
        assert stats["per_gene"]["total_counts"]["max"] == pytest.approx(matrix.sum(axis=0).max(), rel=1e-6)
    assert files["run2/b.h5ad"]["stats"]["matrix"] == "raw.X"
    table = files["tables/c.csv"]
    assert table["state"] == "ok" and table["stats"]["rows"] == 4
    assert document["totals"]["cells"] == sum(m.shape[0] for m in counts.values())
    assert document["project_stats"]["cells_per_sample"].keys() == {"s1", "s2", "s3"}


def test_every_figure_is_listed_and_decodes(stack, ingested):
    import matplotlib.image
    project, _ = ingested
    stats_of(stack, project, 3)
    base = f"{stack.url('stats')}/stats/{project}/figures"
    listed = requests.get(base, timeout=30).json()
    names = {figure["name"] for figure in listed}
    # Embeddings are per file (each file's PCA and UMAP have their own axes).
    assert {"qc_violins", "genes_vs_counts", "mito_vs_counts", "knee", "cells_per_sample",
            "cell_types"} <= names, names
    for figure in listed:
        response = requests.get(f"{base}/{figure['name']}.png", timeout=30)
        assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
        assert response.content.startswith(PNG_SIGNATURE) and len(response.content) == figure["size"]
        assert matplotlib.image.imread(io.BytesIO(response.content), format="png").ndim == 3
        assert response.headers["ETag"] == f'"{figure["sha256"]}"'
        again = requests.get(f"{base}/{figure['name']}.png", headers={"If-None-Match": response.headers["ETag"]},
                             timeout=30)
        assert again.status_code == 304 and again.content == b""
    file_id = by_path(stats_of(stack, project, 3))["run1/a.h5ad"]["file_id"]
    per_file = requests.get(f"{stack.url('stats')}/stats/files/{file_id}/figures", timeout=30).json()
    assert {"qc_violins", "genes_vs_counts", "mito_vs_counts", "highest_expressed_genes", "knee",
            "cells_per_sample", "cell_types", "umap", "pca"} <= {figure["name"] for figure in per_file}
    png = requests.get(f"{stack.url('stats')}/stats/files/{file_id}/figures/highest_expressed_genes.png",
                       timeout=30)
    assert png.status_code == 200 and png.content.startswith(PNG_SIGNATURE)


def test_the_same_request_again_is_a_cache_hit(stack, ingested):
    project, _ = ingested
    entry = by_path(stats_of(stack, project, 3))["run1/a.h5ad"]
    run_id = entry["runs"]["anndata_qc"]
    before = requests.get(f"{stack.url('stats')}/operations/runs/{run_id}", timeout=30).json()
    answer = requests.post(f"{stack.url('stats')}/operations/anndata_qc",
                           json={"inputs": {"file_id": entry["file_id"]}}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["cached"] is True and body["run_id"] == run_id and body["state"] == "ok"
    assert body["cache_hits"] == before["cache_hits"] + 1
    assert body["version"] == "1" and set(body["environment"]) >= {"python", "numpy", "h5py", "matplotlib"}
    assert body["input_digests"] == {str(entry["file_id"]): before["input_digests"][str(entry["file_id"])]}
    assert body["seconds"] is not None and body["finished"]


def test_a_forced_request_is_queued_and_run_by_a_worker(stack, ingested):
    project, _ = ingested
    entry = by_path(stats_of(stack, project, 3))["tables/c.csv"]
    answer = requests.post(f"{stack.url('stats')}/operations/table_stats",
                           json={"inputs": {"file_id": entry["file_id"]}, "force": True}, timeout=30)
    assert answer.status_code == 202, answer.text
    run_id = answer.json()["run_id"]
    assert run_id != entry["runs"]["table_stats"] and answer.json()["state"] == "queued"
    done = wait_for(lambda: (lambda r: r if r["state"] in ("ok", "failed") else None)(
        requests.get(f"{stack.url('stats')}/operations/runs/{run_id}", timeout=30).json()), timeout=60,
        message="the queued run")
    assert done["state"] == "ok" and done["percent"] == 100 and done["result"]["rows"] == 4
    assert done["attempts"] == 1 and "column_histograms.png" in done["outputs"]


def test_a_new_input_rebuilds_exactly_what_depends_on_it(stack, ingested):
    project, _ = ingested
    before = stats_of(stack, project, 3)
    # The cached run of each (operation, file) now: a rebuild must hit exactly these.
    old_runs = {path: {name: requests.post(f"{stack.url('stats')}/operations/{name}",
                                           json={"inputs": {"file_id": entry["file_id"]}}, timeout=30).json()["run_id"]
                       for name in entry["runs"]}
                for path, entry in by_path(before).items()}
    c, _ = h5ad_bytes(seed=3)
    assert stack.ingest(payload_bundle({"run3/c.h5ad": c}, project=project), timeout=120)["state"] == "OK"
    after = stats_of(stack, project, 4)
    new_runs = {path: entry.get("runs") for path, entry in by_path(after).items()}
    for path, runs in old_runs.items():
        assert new_runs[path] == runs, path  # cache hits: nothing recomputed for unchanged files
    earlier = {runs["anndata_qc"] for runs in old_runs.values() if "anndata_qc" in runs}
    assert new_runs["run3/c.h5ad"]["anndata_qc"] not in earlier
    assert after["figures_run"] != before["figures_run"]


def test_corrupt_anndata_files_fail_alone_and_the_ingest_stays_ok(stack):
    project = new_project(stack, "corrupt")
    good, _ = h5ad_bytes(seed=4)
    import h5py
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle.create_dataset("not_x", data=np.arange(3))
    payload = {"good.h5ad": good, "truncated.h5ad": good[: len(good) // 2], "text.h5ad": b"not hdf5 at all",
               "nox.h5ad": buffer.getvalue()}
    assert stack.ingest(payload_bundle(payload, project=project), timeout=120)["state"] == "OK"
    files = by_path(stats_of(stack, project, 4))
    assert files["good.h5ad"]["state"] == "ok"
    codes = {path: files[path].get("error", {}).get("code") for path in ("truncated.h5ad", "text.h5ad", "nox.h5ad")}
    assert codes == {"truncated.h5ad": "truncated_file", "text.h5ad": "not_hdf5", "nox.h5ad": "missing_matrix"}
    for path in codes:
        assert files[path]["state"] == "failed" and "/" not in files[path]["error"]["message"].replace("h5ad", "")


def test_operations_are_described_and_bad_inputs_are_422(stack):
    url = stack.url("stats")
    listed = {op["name"]: op for op in requests.get(f"{url}/operations", timeout=30).json()}
    assert {"anndata_qc", "table_stats", "project_figures"} <= set(listed)
    assert listed["anndata_qc"]["input_schema"]["required"] == ["file_id"]
    for body in ({"inputs": {"file_id": "x"}}, {"inputs": {}}, {"inputs": {"file_id": 1, "extra": 2}},
                 {"inputs": {"file_id": 10 ** 30}}):
        answer = requests.post(f"{url}/operations/anndata_qc", json=body, timeout=30)
        assert answer.status_code == 422 and answer.json()["code"] == "invalid_inputs", (body, answer.text)
    missing = requests.post(f"{url}/operations/anndata_qc", json={"inputs": {"file_id": 999999999}}, timeout=30)
    assert missing.status_code == 422 and missing.json()["code"] == "unknown_input"
    assert requests.post(f"{url}/operations/nope", json={"inputs": {}}, timeout=30).status_code == 404
    assert requests.get(f"{url}/operations/runs/nope", timeout=30).json()["code"] == "run_not_found"


def test_unknown_projects_and_files_are_404_and_a_project_without_stats_says_so(stack):
    url = stack.url("stats")
    assert requests.get(f"{url}/stats/no-such-project", timeout=30).json()["code"] == "project_not_found"
    assert requests.get(f"{url}/stats/files/999999999", timeout=30).json()["code"] == "file_not_found"
    quiet = new_project(stack, "quiet")
    document = requests.get(f"{url}/stats/{quiet}", timeout=30).json()
    assert document["state"] == "none" and "no statistics yet" in document["message"]
    assert requests.get(f"{url}/stats/{quiet}/figures", timeout=30).json() == []
    assert requests.get(f"{url}/stats/{quiet}/figures/knee.png", timeout=30).status_code == 404
