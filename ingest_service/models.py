"""The ingest service's tables: one row per job, the truth about where each job is."""
from __future__ import annotations

import peewee

from common.db import utcnow
from common.migrations import Migration, Schema, create_tables

database = peewee.DatabaseProxy()


class Job(peewee.Model):
    """An upload (or move) job; its id is also the metadata transaction id."""

    job_id = peewee.BigIntegerField(primary_key=True)
    kind = peewee.CharField(max_length=16, default="upload")
    state = peewee.CharField(max_length=16, default="OK")
    task = peewee.CharField(max_length=64, default="UPLOADING")
    # NUMERIC(7,3) on PostgreSQL: exact, so "42.5" comes back as 42.5; jobs.check_percent keeps it in 0..100.
    task_percent = peewee.DecimalField(max_digits=7, decimal_places=3, default=0, auto_round=True)
    exception = peewee.TextField(default="")
    created = peewee.DateTimeField(default=utcnow)
    updated = peewee.DateTimeField(default=utcnow, index=True)
    attempts = peewee.IntegerField(default=0)
    # File ids reserved for the job on its first run, so a second run reuses them.
    file_id_start = peewee.BigIntegerField(null=True)
    file_count = peewee.IntegerField(default=0)

    class Meta:
        database = database
        table_name = "ingest_job"


SCHEMA = Schema("ingest", [
    Migration((1, 0), "job table", create_tables(Job)),
])
