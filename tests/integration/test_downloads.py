"""Computed files and downloads: per project and per sample zips (with MANIFEST.sha256 and
metadata.tsv), a merged AnnData, tokens and signed URLs, tars of a transaction, and purge."""
import csv
import datetime
import io
import subprocess
import tarfile
import zipfile

import pytest
import requests

from common.db import bind
from stats_service import downloads, models
from tests.helpers import archive_sha1, h5ad_bytes, new_project, payload_bundle, wait_for

pytest.importorskip("anndata")
CSV_A, CSV_B = b"x,y\n1,2\n", b"x,y\n3,4\n5,6\n"


def computed(stack, project, expected: int, timeout=120) -> dict:
    """The project's computed files by (kind, sample) once there are ``expected`` of them."""
    def ready():
        listed = requests.get(f"{stack.url('stats')}/computed_files", params={"project": project}, timeout=30).json()
        return {(row["kind"], row["sample"]): row for row in listed} if len(listed) == expected else None
    return wait_for(ready, timeout=timeout, interval=0.3, message=f"computed files of {project}")


def token(stack, activated=True) -> str:
    answer = requests.post(f"{stack.url('stats')}/tokens", json={"email": "reader@example.org",
                                                                  "is_activated": activated}, timeout=30)
    assert answer.status_code == 201, answer.text
    assert answer.json()["is_activated"] is activated and answer.json()["terms_and_conditions"]
    return answer.json()["id"]


def download(stack, computed_id, key) -> bytes:
    answer = requests.get(f"{stack.url('stats')}/computed_files/{computed_id}", headers={"API-KEY": key}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = requests.get(answer.json()["download_url"], timeout=60)
    assert body.status_code == 200, body.text
    return body.content


@pytest.fixture(scope="module")
def project(stack):
    name = new_project(stack, "dl")
    (a, _), (b, _) = h5ad_bytes(seed=11, n_cells=50, raw=True), h5ad_bytes(seed=12, n_cells=70, raw=True)
    for payload, sample in (({"cells/a.h5ad": a, "tables/a.csv": CSV_A}, "s1"),
                            ({"cells/b.h5ad": b, "tables/b.csv": CSV_B}, "s2")):
        final = stack.ingest(payload_bundle(payload, project=name, keys={"sample": sample, "tissue": "liver"}))
        assert final["state"] == "OK", final
    return name


def test_the_zips_hold_exactly_the_expected_members_and_their_manifest_checks(stack, project, tmp_path):
    files = computed(stack, project, 5)
    key = token(stack)
    assert {(kind, sample) for kind, sample in files} == {
        ("project_zip", None), ("metadata_zip", None), ("sample_zip", "s1"), ("sample_zip", "s2"),
        ("merged_anndata", None)}
    expected = {("project_zip", None): {"s1/cells/a.h5ad", "s1/tables/a.csv", "s2/cells/b.h5ad", "s2/tables/b.csv"},
                ("sample_zip", "s1"): {"s1/cells/a.h5ad", "s1/tables/a.csv"},
                ("sample_zip", "s2"): {"s2/cells/b.h5ad", "s2/tables/b.csv"},
                ("metadata_zip", None): set()}
    for which, data_members in expected.items():
        raw = download(stack, files[which]["id"], key)
        archive = zipfile.ZipFile(io.BytesIO(raw))
        assert set(archive.namelist()) == data_members | {"metadata.tsv", "README.md", "MANIFEST.sha256"}
        folder = tmp_path / f"{which[0]}-{which[1]}"
        archive.extractall(folder)
        check = subprocess.run(["sha256sum", "-c", "MANIFEST.sha256"], cwd=folder, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        rows = list(csv.DictReader(io.StringIO(archive.read("metadata.tsv").decode()), delimiter="\t"))
        assert len(rows) == (len(data_members) or 4)
        assert all(row["tissue"] == "liver" and row["project"] == project for row in rows)
        assert {row["sample"] for row in rows} <= {"s1", "s2"}
        readme = archive.read("README.md").decode()
        assert project in readme and "sha256sum -c MANIFEST.sha256" in readme


def test_a_bundle_sent_twice_packages_both_copies_under_distinct_names(stack):
    name = new_project(stack, "twice")
    bundle = payload_bundle({"tables/a.csv": CSV_A}, project=name, keys={"sample": "s1"})
    jobs = [stack.ingest(bundle) for _ in range(2)]
    assert [final["state"] for final in jobs] == ["OK", "OK"], jobs
    ids = sorted(row["_id"] for job in jobs for row in requests.get(
        f"{stack.url('metadata')}/files", params={"transaction": job["job_id"]}, timeout=30).json())

    def both_packaged():
        row = computed(stack, name, 3).get(("project_zip", None))
        return row if row and row["sha256"] and {str(i) for i in ids} <= set(row["inputs"]) else None
    row = wait_for(both_packaged, timeout=120, interval=0.3, message="a project zip of both copies")
    archive = zipfile.ZipFile(io.BytesIO(download(stack, row["id"], token(stack))))
    assert {member for member in archive.namelist() if member.startswith("s1/")} == {
        "s1/tables/a.csv", f"s1/tables/a.file-{ids[0]}.csv"}
    assert archive.read("s1/tables/a.csv") == archive.read(f"s1/tables/a.file-{ids[0]}.csv") == CSV_A


def test_the_merged_anndata_has_every_cell_and_the_raw_counts(stack, project, tmp_path):
    import anndata
    files = computed(stack, project, 5)
    path = tmp_path / "merged.h5ad"
    path.write_bytes(download(stack, files[("merged_anndata", None)]["id"], token(stack)))
    merged = anndata.read_h5ad(path)
    assert merged.n_obs == 120 and merged.raw is not None and merged.raw.X.shape[0] == 120
    assert set(merged.obs["labvault_sample"]) == {"s1", "s2"}


def test_building_again_changes_nothing_and_a_new_bundle_rebuilds_only_its_sample(stack, project):
    before = computed(stack, project, 5)
    stack.cli("regenerate", "--project", project, "--now")
    again = computed(stack, project, 5)
    assert {k: (v["sha256"], v["inputs"]) for k, v in again.items()} == \
        {k: (v["sha256"], v["inputs"]) for k, v in before.items()}
    final = stack.ingest(payload_bundle({"tables/c.csv": b"x,y\n7,8\n"}, project=project, keys={"sample": "s1"}))
    assert final["state"] == "OK"
    changed = (("project_zip", None), ("metadata_zip", None), ("sample_zip", "s1"))
    after = wait_for(lambda: (lambda c: c if all(c[k]["sha256"] != before[k]["sha256"] for k in changed) else None)(
        computed(stack, project, 5)), timeout=120, message="the project's and sample s1's zips rebuilt")
    assert after[("sample_zip", "s2")] == before[("sample_zip", "s2")]
    assert after[("merged_anndata", None)]["sha256"] == before[("merged_anndata", None)]["sha256"]


def test_tokens_decide_who_gets_a_url(stack, project):
    url = stack.url("stats")
    row = computed(stack, project, 5)[("metadata_zip", None)]
    plain = requests.get(f"{url}/computed_files/{row['id']}", timeout=30).json()
    assert "download_url" not in plain and plain["sha256"] == row["sha256"]
    assert requests.get(f"{url}/computed_files", params={"project": project}, timeout=30).json()[0].get(
        "download_url") is None
    inactive, revoked, expired = token(stack, activated=False), token(stack), token(stack)
    assert "revoked" in stack.cli("download-token", "revoke", downloads.token_digest(revoked)[:12]).stdout
    with stats_database(stack):
        models.DownloadToken.update(expires=datetime.datetime(2000, 1, 1)).where(
            models.DownloadToken.digest == downloads.token_digest(expired)).execute()
    for key, code in (("nonsense", "invalid_token"), (inactive, "token_not_activated"), (revoked, "token_revoked"),
                      (expired, "token_expired")):
        answer = requests.get(f"{url}/computed_files/{row['id']}", headers={"API-KEY": key}, timeout=30)
        assert answer.status_code == 403 and answer.json()["code"] == code, (key, answer.text)
    assert requests.get(f"{url}/tokens/terms", timeout=30).json()["version"] == downloads.TERMS_VERSION


def test_a_signed_url_serves_the_bytes_and_refuses_tampering_and_age(stack, project):
    row = computed(stack, project, 5)[("project_zip", None)]
    answer = requests.get(f"{stack.url('stats')}/computed_files/{row['id']}", headers={"API-KEY": token(stack)},
                          timeout=30).json()
    body = requests.get(answer["download_url"], timeout=60)
    assert body.status_code == 200 and len(body.content) == row["size"]
    assert body.headers["Content-Disposition"].startswith("attachment;")
    import hashlib
    assert hashlib.sha256(body.content).hexdigest() == row["sha256"]
    tampered = answer["download_url"].replace(f"/computed/{row['id']}?", f"/computed/{row['id'] + 1}?")
    assert requests.get(tampered, timeout=30).json()["code"] == "invalid_signature"
    with stats_database(stack):
        old, _ = downloads.signed_path(row["id"], -5)
    assert requests.get(stack.url("stats") + old, timeout=30).json()["code"] == "url_expired"


def test_a_transaction_downloads_as_a_tar_and_a_corrupt_file_breaks_it(stack, project, tmp_path):
    key = token(stack)
    metadata = stack.url("metadata")
    transaction = requests.get(f"{metadata}/transactions", params={"project": project}, timeout=30).json()[0]["_id"]
    answer = requests.get(f"{stack.url('stats')}/download/transaction/{transaction}", headers={"API-KEY": key},
                          timeout=60)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(answer.content)) as tar:
        tar.extractall(tmp_path / "tx", filter="data")
    rows = requests.get(f"{metadata}/files", params={"transaction": transaction}, timeout=30).json()
    import hashlib
    for row in rows:
        extracted = tmp_path / "tx" / row["subdir"] / row["name"]
        assert hashlib.sha1(extracted.read_bytes()).hexdigest() == row["hashsum"]
    victim = rows[0]
    stored = stack.settings.path("archive", "root") / f"{victim['_id'] % 256:02x}" / str(victim["_id"])
    stored.chmod(0o640)
    raw = bytearray(stored.read_bytes())
    raw[0] ^= 0xFF
    stored.write_bytes(bytes(raw))
    broken = requests.get(f"{stack.url('stats')}/download/transaction/{transaction}", headers={"API-KEY": key},
                          timeout=60)
    with pytest.raises(tarfile.TarError), tarfile.open(fileobj=io.BytesIO(broken.content)) as tar:
        for member in tar:
            extracted = tar.extractfile(member)
            assert member.name != f"{victim['subdir']}/{victim['name']}" or extracted.read() != bytes(raw)
    with stats_database(stack):
        errors = [row.error for row in models.IssuedDownload.select().where(models.IssuedDownload.error.is_null(False))]
    assert any(victim["name"] in error for error in errors)
    raw[0] ^= 0xFF
    stored.write_bytes(bytes(raw))
    assert archive_sha1(stack, victim["_id"]) == victim["hashsum"]


def test_purge_leaves_nothing_of_the_project(stack):
    name = new_project(stack, "purge")
    (a, _), (b, _) = h5ad_bytes(seed=21, n_cells=30), h5ad_bytes(seed=22, n_cells=30)
    assert stack.ingest(payload_bundle({"a.h5ad": a, "b.h5ad": b}, project=name, keys={"sample": "x"}))["state"] == "OK"
    listed = computed(stack, name, 4)
    files = requests.get(f"{stack.url('stats')}/stats/{name}", timeout=30).json()
    refused = stack.cli("purge", "--project", name, check=False)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    with stats_database(stack):
        outputs = [row.archive_id for row in models.RunOutput.select().join(models.Run).where(
            (models.Run.project == name))]
    done = stack.cli("purge", "--project", name, "--delete-files", "--yes")
    assert "done" in done.stdout and "archived file(s)" in done.stdout
    url = stack.url("stats")
    assert requests.get(f"{url}/computed_files", params={"project": name}, timeout=30).json() == []
    assert requests.get(f"{url}/stats/{name}", timeout=30).json()["state"] == "none"
    for archive_id in outputs + [entry["file_id"] for entry in files["files"]]:
        assert requests.head(f"{stack.url('archive')}/{archive_id}", timeout=30).status_code == 404
    assert requests.get(f"{stack.url('metadata')}/transactions", params={"project": name}, timeout=30).json() == []
    assert listed


class stats_database:
    """The stack's stats database, bound in the test process for what the API does not show."""

    def __init__(self, stack):
        self.db = bind(models.database, stack.settings.database_url("stats").replace("+pool", ""))

    def __enter__(self):
        self.db.connect(reuse_if_open=True)
        return self.db

    def __exit__(self, *exc_info):
        self.db.close()
