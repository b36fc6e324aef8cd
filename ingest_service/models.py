"""The ingest service's tables: one row per job, the truth about where each job is."""
from __future__ import annotations

import peewee
from playhouse.migrate import SchemaMigrator, migrate

from common.db import utcnow
from common.migrations import Migration, Schema, create_tables

database = peewee.DatabaseProxy()

JOB_TABLE = "ingest_job"


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
    # The run that holds the job (see jobs.claim) and its last sign of life: a claim whose
    # heartbeat is older than [ingest] heartbeat_stale belongs to a run that is gone.
    claimed_by = peewee.CharField(max_length=255, null=True)
    heartbeat = peewee.DateTimeField(null=True)
    # The authenticated user who created the job; None in open mode.
    owner = peewee.BigIntegerField(null=True, index=True)

    class Meta:
        database = database
        table_name = JOB_TABLE


class ApiToken(peewee.Model):
    """A user's API token, stored only as the SHA-256 hex digest of the token."""

    digest = peewee.CharField(max_length=64, primary_key=True)
    user = peewee.BigIntegerField(index=True)
    label = peewee.CharField(default="")
    created = peewee.DateTimeField(default=utcnow)
    revoked = peewee.DateTimeField(null=True)

    class Meta:
        database = database
        table_name = "ingest_api_token"


class ResumableUpload(peewee.Model):
    """A resumable (tus) upload: its bytes arrive in PATCHes at ``offset`` into a part file on the
    staging volume (``Staging.upload_part``) until ``length``; then it becomes job ``job_id``."""

    upload_id = peewee.CharField(max_length=64, primary_key=True)
    # The authenticated user who created it; None in open mode. Only they may go on with it.
    owner = peewee.BigIntegerField(null=True, index=True)
    length = peewee.BigIntegerField()
    # Bytes durably on the staging volume (fsynced before this is stored).
    offset = peewee.BigIntegerField(default=0)
    # The Upload-Metadata header as the client sent it (tus clients read it back on HEAD).
    metadata = peewee.TextField(default="")
    created = peewee.DateTimeField(default=utcnow)
    # Past this an unfinished upload is gone (410), and the reaper removes its bytes.
    expires = peewee.DateTimeField(index=True)
    job_id = peewee.BigIntegerField(null=True)

    class Meta:
        database = database
        table_name = "ingest_resumable_upload"


def _job_table_v1_0() -> type[peewee.Model]:
    """The job table as schema 1.0 created it, frozen: step 1.0 must build what 1.0 had, or
    step 1.1 would find its columns already there on a new database."""

    # Named Job like the original: peewee names the index after the class (job_updated).
    class Job(peewee.Model):
        job_id = peewee.BigIntegerField(primary_key=True)
        kind = peewee.CharField(max_length=16, default="upload")
        state = peewee.CharField(max_length=16, default="OK")
        task = peewee.CharField(max_length=64, default="UPLOADING")
        task_percent = peewee.DecimalField(max_digits=7, decimal_places=3, default=0, auto_round=True)
        exception = peewee.TextField(default="")
        created = peewee.DateTimeField(default=utcnow)
        updated = peewee.DateTimeField(default=utcnow, index=True)
        attempts = peewee.IntegerField(default=0)
        file_id_start = peewee.BigIntegerField(null=True)
        file_count = peewee.IntegerField(default=0)

        class Meta:
            # No database: only the migration step binds it (and the test fixtures that
            # empty every model of this module's database do not see it).
            table_name = JOB_TABLE
    return Job


def _claims_owner_and_tokens(db: peewee.Database) -> None:
    # Fresh field objects: the migrator renames the fields it is given.
    migrator = SchemaMigrator.from_database(db)
    migrate(
        migrator.add_column(JOB_TABLE, "claimed_by", peewee.CharField(max_length=255, null=True)),
        migrator.add_column(JOB_TABLE, "heartbeat", peewee.DateTimeField(null=True)),
        migrator.add_column(JOB_TABLE, "owner", peewee.BigIntegerField(null=True)),
        migrator.add_index(JOB_TABLE, ("owner",)),
    )
    create_tables(ApiToken)(db)


SCHEMA = Schema("ingest", [
    Migration((1, 0), "job table", create_tables(_job_table_v1_0())),
    Migration((1, 1), "job claims, heartbeats and owners; API tokens", _claims_owner_and_tokens),
    Migration((1, 2), "resumable (tus) uploads", create_tables(ResumableUpload)),
])
