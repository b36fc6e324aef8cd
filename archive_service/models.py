"""The archive's own tables: one row per stored file (what its bytes must hash to, and how
its last fixity check went) and the history of fixity checks."""
from __future__ import annotations

import peewee
from playhouse.migrate import SchemaMigrator, migrate

from common.migrations import Migration, Schema, create_tables

# Bound to a real database by app.build_app (or a test); nothing connects at import.
database = peewee.DatabaseProxy()

ARCHIVE_TABLE = "archive_file"
# Fixity results. An unreadable file is never "ok": its bytes could not be hashed.
OK, MISMATCH, UNREADABLE = "ok", "mismatch", "unreadable"
RESULTS = (OK, MISMATCH, UNREADABLE)


class ArchiveFile(peewee.Model):
    """A file the archive holds. The row is written after the bytes are published."""

    # Ids come from the metadata service, so no autoincrement here.
    file_id = peewee.BigIntegerField(primary_key=True)
    size = peewee.BigIntegerField()
    # The hash the writer declared (or the default), as Pacifica clients know it.
    hashtype = peewee.CharField(max_length=16)
    hashsum = peewee.CharField(max_length=128)
    # Computed by the archive from the bytes as they streamed in, whatever was declared;
    # null only for files archived before the archive kept it.
    sha256 = peewee.CharField(max_length=64, null=True)
    # Both naive UTC.
    mtime = peewee.DateTimeField()
    created = peewee.DateTimeField()
    # The last fixity check (naive UTC) and its result; null: never checked.
    fixity_checked = peewee.DateTimeField(null=True, index=True)
    fixity_result = peewee.CharField(max_length=16, null=True, index=True)

    class Meta:
        database = database
        table_name = ARCHIVE_TABLE


class FixityCheck(peewee.Model):
    """One fixity check of one file: the history behind ``ArchiveFile.fixity_result``."""

    id = peewee.BigAutoField()
    # No foreign key: the history of a deleted file stays readable.
    file_id = peewee.BigIntegerField(index=True)
    checked = peewee.DateTimeField(index=True)
    result = peewee.CharField(max_length=16)
    # What was found: the digest and size read back, or why the bytes could not be read.
    sha256 = peewee.CharField(max_length=64, null=True)
    size = peewee.BigIntegerField(null=True)
    detail = peewee.CharField(max_length=255, default="")

    class Meta:
        database = database
        table_name = "archive_fixity_check"


class ImportedObject(peewee.Model):
    """An object of an existing bucket that ``labvault import-bucket`` recorded as an archive file."""

    id = peewee.BigAutoField()
    bucket = peewee.CharField(max_length=63)
    prefix = peewee.CharField(max_length=1024)
    key = peewee.CharField(max_length=1024)
    file_id = peewee.BigIntegerField()
    transaction_id = peewee.BigIntegerField()
    # The source object as it was when imported: a later run compares against these.
    etag = peewee.CharField(max_length=128)
    size = peewee.BigIntegerField()
    imported = peewee.DateTimeField()
    # When a later run found the object gone (naive UTC); null while it is there.
    removed = peewee.DateTimeField(null=True)

    class Meta:
        database = database
        table_name = "archive_imported_object"
        indexes = ((("bucket", "prefix", "key"), True),)


def _archive_table_v1_0() -> type[peewee.Model]:
    """The file table as version 1.0 created it (the model above has grown since)."""

    class ArchiveFile(peewee.Model):
        file_id = peewee.BigIntegerField(primary_key=True)
        size = peewee.BigIntegerField()
        hashtype = peewee.CharField(max_length=16)
        hashsum = peewee.CharField(max_length=128)
        mtime = peewee.DateTimeField()
        created = peewee.DateTimeField()

        class Meta:
            table_name = ARCHIVE_TABLE
    return ArchiveFile


def _digests_and_fixity(db: peewee.Database) -> None:
    # Fresh field objects: the migrator renames the fields it is given.
    migrator = SchemaMigrator.from_database(db)
    migrate(
        migrator.add_column(ARCHIVE_TABLE, "sha256", peewee.CharField(max_length=64, null=True)),
        migrator.add_column(ARCHIVE_TABLE, "fixity_checked", peewee.DateTimeField(null=True)),
        migrator.add_column(ARCHIVE_TABLE, "fixity_result", peewee.CharField(max_length=16, null=True)),
        migrator.add_index(ARCHIVE_TABLE, ("fixity_checked",)),
        migrator.add_index(ARCHIVE_TABLE, ("fixity_result",)),
    )
    create_tables(FixityCheck)(db)


SCHEMA = Schema("archive", [
    Migration((1, 0), "initial tables", create_tables(_archive_table_v1_0())),
    Migration((1, 1), "sha256 of every file; fixity results and their history", _digests_and_fixity),
    Migration((1, 2), "objects imported from existing buckets", create_tables(ImportedObject)),
])
