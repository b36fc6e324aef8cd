"""labvault import-bucket against a real S3 server and a real metadata service: 1,000 objects
become archive files with verified digests in one transaction; later runs add the new ones,
report the removed ones, and refuse to take a wiped prefix for granted."""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import uuid

import pytest
import requests

from archive_service import commands, models
from archive_service.archive import Archive
from archive_service.bucket_import import BucketWipeRefused, import_bucket, parse_source
from archive_service.s3 import S3Storage
from common import db as common_db
from common import migrations
from common.commands import CommandError
from common.clients import MetadataClient
from common.errors import BadRequest
from metadata_service import models as metadata_models
from metadata_service.app import build_app as build_metadata_app
from metadata_service.seed import load_seed
from tests.helpers import FIXTURES, make_settings, serve_wsgi

pytestmark = pytest.mark.s3


@pytest.fixture
def metadata_url(tmp_path):
    settings = make_settings(tmp_path / "metadata")
    db = common_db.bind(metadata_models.database, settings.database_url("metadata"))
    migrations.sync(db, metadata_models.SCHEMA)
    load_seed(FIXTURES / "metadata-seed")
    common_db.close_quietly(db)
    with serve_wsgi(build_metadata_app(settings)) as url:
        yield url


@pytest.fixture
def settings(tmp_path, s3_endpoint, s3_bucket, metadata_url):
    settings = make_settings(tmp_path, archive={"backend": "s3", "bucket": s3_bucket, "prefix": "archive",
                                                "endpoint_url": s3_endpoint.url, "addressing_style": "path",
                                                "create_bucket": "true"},
                             metadata={"url": metadata_url}, http={"retries": 0})
    db = common_db.bind(models.database, settings.database_url("archive"))
    migrations.sync(db, models.SCHEMA)
    yield settings
    common_db.close_quietly(db)


@pytest.fixture
def source(s3_endpoint):
    client = s3_endpoint.client()
    bucket = f"labvault-src-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def put_objects(client, bucket, names) -> dict[str, bytes]:
    contents = {name: f"{name}\n".encode() * (1 + len(name) % 7) for name in names}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: client.put_object(Bucket=bucket, Key=name, Body=contents[name]), names))
    return contents


def run(settings, client, bucket, allow_wipe=False):
    storage = S3Storage.from_settings(settings)
    storage.prepare(create=True)
    return import_bucket(Archive(storage), client, parse_source(f"s3://{bucket}/runs/"), MetadataClient(settings),
                         10, "1234a", 54, allow_wipe=allow_wipe, server_side=True)


def metadata_files(settings, transaction_id) -> list[dict]:
    return requests.get(f"{settings.service_url('metadata')}/files",
                        params={"transaction": transaction_id, "items_per_page": 5000}, timeout=30).json()


def test_import_then_add_then_refuse_a_wipe(settings, source, s3_endpoint):
    client, bucket = source
    names = [f"runs/day{n % 10}/frame{n:04d}.raw" for n in range(1000)]
    contents = put_objects(client, bucket, names)
    client.put_object(Bucket=bucket, Key="elsewhere/not-me", Body=b"outside the prefix")

    first = run(settings, client, bucket)
    assert len(first.added) == 1000 and first.removed == [] and first.changed == []
    file_ids = dict(first.added)
    rows = {row.file_id: row for row in models.ArchiveFile.select()}
    assert len(rows) == 1000
    for name in names[::97]:
        row = rows[file_ids[name]]
        assert row.sha256 == hashlib.sha256(contents[name]).hexdigest() and row.size == len(contents[name])
        archived = S3Storage.from_settings(settings).open_read(row.file_id).read()
        assert archived == contents[name]
    recorded = metadata_files(settings, first.transaction_id)
    assert len(recorded) == 1000
    sample = next(entry for entry in recorded if entry["_id"] == file_ids[names[5]])
    assert (sample["subdir"], sample["name"]) == ("day5", "frame0005.raw")
    assert sample["hashtype"] == "sha256" and sample["hashsum"] == hashlib.sha256(contents[names[5]]).hexdigest()

    put_objects(client, bucket, [f"runs/new/extra{n}.raw" for n in range(10)])
    gone = names[:5]
    for name in gone:
        client.delete_object(Bucket=bucket, Key=name)
    client.put_object(Bucket=bucket, Key=names[500], Body=b"rewritten")
    second = run(settings, client, bucket)
    assert sorted(key for key, _ in second.added) == [f"runs/new/extra{n}.raw" for n in range(10)]
    assert second.removed == sorted(gone) and second.changed == [names[500]]
    assert second.unchanged == 1000 - 5 - 1
    assert len(metadata_files(settings, second.transaction_id)) == 10
    # Nothing new: no transaction, nothing reported twice.
    third = run(settings, client, bucket)
    assert (third.added, third.removed, third.transaction_id) == ([], [], None)

    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/"):
        for item in page.get("Contents") or []:
            client.delete_object(Bucket=bucket, Key=item["Key"])
    with pytest.raises(BucketWipeRefused):
        run(settings, client, bucket)
    args = argparse.Namespace(source=f"s3://{bucket}/runs", project="1234a", instrument="54", submitter="10",
                              endpoint_url=None, allow_bucket_wipe=False)
    with pytest.raises(CommandError, match="bucket_wipe_refused: every object under"):
        commands.cmd_import_bucket(args, settings)
    assert models.ArchiveFile.select().count() == 1010  # archived files stay: write-once
    wiped = run(settings, client, bucket, allow_wipe=True)
    assert len(wiped.removed) == 1005 and wiped.added == []
    assert run(settings, client, bucket).removed == []


def test_a_copy_that_fails_leaves_nothing(settings, source, monkeypatch):
    client, bucket = source
    put_objects(client, bucket, [f"runs/f{n}" for n in range(20)])
    original = Archive.adopt

    def adopt(self, file_id, size, mtime, md5=None, source_sha256=None):
        if file_id % 7 == 3:
            md5 = "0" * 32  # what a corrupted copy would read back as
        return original(self, file_id, size, mtime, md5, source_sha256)
    monkeypatch.setattr(Archive, "adopt", adopt)
    with pytest.raises(BadRequest):
        run(settings, client, bucket)
    storage = S3Storage.from_settings(settings)
    assert storage.client.list_objects_v2(Bucket=storage.bucket).get("Contents") is None
    assert models.ArchiveFile.select().count() == 0 and models.ImportedObject.select().count() == 0


def test_the_command_reads_the_source_url_and_reports(settings, source, capsys):
    client, bucket = source
    put_objects(client, bucket, ["runs/a.txt", "runs/sub/b.txt"])
    args = argparse.Namespace(source=f"s3://{bucket}/runs", project="1234a", instrument="54", submitter="10",
                              endpoint_url=None, allow_bucket_wipe=False)
    assert commands.cmd_import_bucket(args, settings) == 0
    assert "2 added in transaction" in capsys.readouterr().out
    for bad in ("http://x/y", "s3://A_B/c"):
        with pytest.raises(CommandError, match="invalid_source"):
            commands.cmd_import_bucket(argparse.Namespace(**{**vars(args), "source": bad}), settings)
    with pytest.raises(CommandError, match="source_not_found"):
        commands.cmd_import_bucket(argparse.Namespace(**{**vars(args), "source": "s3://no-such-bucket-here"}),
                                   settings)
