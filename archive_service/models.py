"""The archive's own table: one row per stored file, the record of what the bytes must hash to."""
from __future__ import annotations

import peewee

from common.migrations import Migration, Schema, create_tables

# Bound to a real database by app.build_app (or a test); nothing connects at import.
database = peewee.DatabaseProxy()


class ArchiveFile(peewee.Model):
    """A file the archive holds. The row is written after the bytes are published."""

    # Ids come from the metadata service, so no autoincrement here.
    file_id = peewee.BigIntegerField(primary_key=True)
    size = peewee.BigIntegerField()
    hashtype = peewee.CharField(max_length=16)
    hashsum = peewee.CharField(max_length=128)
    # Both naive UTC.
    mtime = peewee.DateTimeField()
    created = peewee.DateTimeField()

    class Meta:
        database = database
        table_name = "archive_file"


SCHEMA = Schema("archive", [
    Migration((1, 0), "initial tables", create_tables(ArchiveFile)),
])
