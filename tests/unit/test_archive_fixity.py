"""Fixity on real SQLite and PostgreSQL databases and POSIX storage: results, history, the
sha256 every write now records, the command and the Celery task function."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io

import pytest

from archive_service import commands, fixity, models, tasks
from archive_service.archive import Archive
from archive_service.models import ArchiveFile
from archive_service.storage import PosixStorage
from common import migrations
from common.commands import CommandError
from common.migrations import Schema
from common.errors import LabvaultError
from tests.helpers import make_settings

DATA = b"fixity bytes\n" * 500


@pytest.fixture
def archive(tmp_path, archive_db):
    return Archive(PosixStorage(tmp_path / "archive"))


def flip_a_byte(storage, file_id):
    path = storage.path_for(file_id)
    path.chmod(0o640)
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x20
    path.write_bytes(bytes(raw))


def test_every_write_records_the_sha256_whatever_was_declared(archive):
    archive.put(1, io.BytesIO(DATA), "md5", hashlib.md5(DATA).hexdigest())
    archive.put(2, io.BytesIO(DATA))
    for file_id in (1, 2):
        assert archive.stat(file_id).sha256 == hashlib.sha256(DATA).hexdigest()
    assert archive.stat(1).hashtype == "md5" and archive.stat(2).hashtype == "sha1"


def test_flipped_byte_is_a_mismatch_and_a_missing_file_unreadable(archive):
    storage = archive.storage
    for file_id in (1, 2, 3):
        archive.put(file_id, io.BytesIO(DATA + bytes([file_id])))
    flip_a_byte(storage, 2)
    storage.delete(3)
    outcomes = {o.file_id: o for o in fixity.run(storage, limit=10)}
    assert {n: o.result for n, o in outcomes.items()} == {1: "ok", 2: "mismatch", 3: "unreadable"}
    assert "no stored bytes" in outcomes[3].detail
    rows = {row.file_id: row for row in ArchiveFile.select()}
    assert rows[2].fixity_result == "mismatch" and rows[2].fixity_checked is not None
    assert [entry["result"] for entry in fixity.history(3)] == ["unreadable"]
    assert fixity.summary()["mismatch"] == 1
    assert [item["file_id"] for item in fixity.problems("unreadable")["items"]] == [3]


def test_an_unreadable_file_is_never_ok(archive, monkeypatch):
    archive.put(4, io.BytesIO(DATA))

    def broken(*_args, **_kwargs):
        raise OSError("input/output error")
    monkeypatch.setattr(archive.storage, "open_read", broken)
    [outcome] = fixity.run(archive.storage, file_id=4)
    assert outcome.result == "unreadable" and "input/output error" in outcome.detail


def test_files_from_before_the_sha256_column_are_checked_against_their_declared_hash(archive):
    archive.put(5, io.BytesIO(DATA))
    ArchiveFile.update(sha256=None).where(ArchiveFile.file_id == 5).execute()
    assert fixity.run(archive.storage, file_id=5)[0].result == "ok"
    # Verified against the declared hash, the sha256 is kept from now on.
    assert ArchiveFile.get_by_id(5).sha256 == hashlib.sha256(DATA).hexdigest()


def test_older_than_skips_recent_checks(archive):
    for file_id in (6, 7):
        archive.put(file_id, io.BytesIO(DATA))
    fixity.run(archive.storage, limit=10)
    assert fixity.run(archive.storage, limit=10, older_than_days=1) == []
    ArchiveFile.update(fixity_checked=datetime.datetime(2000, 1, 1)).where(ArchiveFile.file_id == 7).execute()
    assert [o.file_id for o in fixity.run(archive.storage, limit=10, older_than_days=1)] == [7]
    with pytest.raises(LabvaultError):
        fixity.run(archive.storage, limit=0)


def test_the_command_and_the_task(tmp_path, archive_db, capsys):
    settings = make_settings(tmp_path, archive={"database": _url(archive_db, tmp_path)})
    archive = Archive(PosixStorage(settings.path("archive", "root")))
    for file_id in (8, 9):
        archive.put(file_id, io.BytesIO(DATA + bytes([file_id])))
    args = argparse.Namespace(file_id=None, older_than=None, limit=None)
    assert commands.cmd_fixity(args, settings) == 0
    assert "2 checked, 2 ok, 0 with problems" in capsys.readouterr().out
    flip_a_byte(archive.storage, 9)
    assert commands.cmd_fixity(argparse.Namespace(file_id=9, older_than=None, limit=None), settings) == 1
    out = capsys.readouterr().out
    assert "file 9: mismatch" in out and "1 with problems" in out
    with pytest.raises(CommandError):
        commands.cmd_fixity(argparse.Namespace(file_id=99, older_than=None, limit=None), settings)
    parser = argparse.ArgumentParser()
    commands.add_fixity_arguments(parser)
    parsed = parser.parse_args(["--file-id", "3", "--older-than", "2.5", "--limit", "7"])
    assert (parsed.file_id, parsed.older_than, parsed.limit) == (3, 2.5, 7)

    ArchiveFile.update(fixity_checked=datetime.datetime(2000, 1, 1)).execute()
    assert tasks.check_fixity(settings) == {"ok": 1, "mismatch": 1}
    assert tasks.check_fixity.task_name == "archive.check_fixity"
    assert tasks.sweep_uploads(settings) == 0


def _url(db, tmp_path) -> str:
    """The URL of the database the fixture bound (SQLite file or PostgreSQL)."""
    from common.db import is_sqlite
    if is_sqlite(db):
        return f"sqlite:///{db.database}"
    params = db.connect_params
    return f"postgresql://{params.get('user')}@{params.get('host')}:{params.get('port')}/{db.database}"


def test_an_archive_of_version_1_0_keeps_its_files_through_the_upgrade(empty_database):
    db = empty_database
    first = Schema("archive", models.SCHEMA.migrations[:1])
    assert migrations.sync(db, first) == [(1, 0)]
    db.execute_sql("INSERT INTO archive_file (file_id, size, hashtype, hashsum, mtime, created) "
                   "VALUES (1, 3, 'sha1', 'abc', '2020-01-01 00:00:00', '2020-01-01 00:00:00')")
    assert migrations.sync(db, models.SCHEMA) == [(1, 1), (1, 2)]
    with db.bind_ctx([ArchiveFile, models.FixityCheck, models.ImportedObject]):
        row = ArchiveFile.get_by_id(1)
        assert (row.size, row.hashsum, row.sha256, row.fixity_result) == (3, "abc", None, None)
        assert models.FixityCheck.select().count() == 0 and models.ImportedObject.select().count() == 0
