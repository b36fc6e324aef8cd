"""The ingest service's tables: one row per job, the truth about where each job is; API tokens;
idempotency keys; webhook subscriptions and the log of their deliveries."""
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
    # The project the bundle's metadata names, once read (for events; None before or without one).
    project = peewee.CharField(max_length=255, null=True)

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


class IdempotencyKey(peewee.Model):
    """An ``Idempotency-Key`` an uploader sent, bound to the job its bundle created.

    ``uploader`` is the authenticated user, or ``ANYONE`` in open mode; one key per uploader
    (a unique index, so of two concurrent uploads with one key only one binds it).
    """

    id = peewee.AutoField()
    key = peewee.CharField(max_length=255)
    uploader = peewee.BigIntegerField()
    # SHA-256 hex of the bundle's bytes, computed while they streamed to the staging volume.
    digest = peewee.CharField(max_length=64)
    job_id = peewee.BigIntegerField()
    created = peewee.DateTimeField(default=utcnow)
    expires = peewee.DateTimeField(index=True)

    class Meta:
        database = database
        table_name = "ingest_idempotency_key"
        indexes = ((("uploader", "key"), True),)


class Subscription(peewee.Model):
    """A webhook: where events of some types (of one project, or of all) are POSTed, signed with ``secret``."""

    id = peewee.AutoField()
    url = peewee.TextField()
    # Comma-separated event types (common.events.TYPES).
    events = peewee.CharField(max_length=255)
    project = peewee.CharField(max_length=255, null=True)
    # The user the subscription acts for (its events are those the user may see); None: an
    # operator's subscription made with the command line, which sees every project.
    owner = peewee.BigIntegerField(null=True)
    # The HMAC key; kept in clear because every delivery is signed with it.
    secret = peewee.CharField(max_length=255)
    enabled = peewee.BooleanField(default=True)
    # Failed deliveries in a row (reset by a success, or by ``webhook enable``).
    failures = peewee.IntegerField(default=0)
    last_error = peewee.TextField(default="")
    last_delivery = peewee.DateTimeField(null=True)
    disabled_at = peewee.DateTimeField(null=True)
    created = peewee.DateTimeField(default=utcnow)

    class Meta:
        database = database
        table_name = "ingest_webhook"


class Delivery(peewee.Model):
    """One attempt to deliver one event to one subscription, and its answer."""

    id = peewee.AutoField()
    subscription = peewee.IntegerField(index=True)
    event_id = peewee.CharField(max_length=64, index=True)
    event_type = peewee.CharField(max_length=64)
    attempt = peewee.IntegerField()
    # The HTTP status of the answer, or None when there was none (``error`` says why).
    status = peewee.IntegerField(null=True)
    error = peewee.TextField(default="")
    duration_ms = peewee.IntegerField(default=0)
    at = peewee.DateTimeField(default=utcnow, index=True)

    class Meta:
        database = database
        table_name = "ingest_webhook_delivery"


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


def _idempotency_and_webhooks(db: peewee.Database) -> None:
    migrator = SchemaMigrator.from_database(db)
    migrate(migrator.add_column(JOB_TABLE, "project", peewee.CharField(max_length=255, null=True)))
    create_tables(IdempotencyKey, Subscription, Delivery)(db)


SCHEMA = Schema("ingest", [
    Migration((1, 0), "job table", create_tables(_job_table_v1_0())),
    Migration((1, 1), "job claims, heartbeats and owners; API tokens", _claims_owner_and_tokens),
    Migration((1, 2), "job projects; idempotency keys; webhook subscriptions and deliveries",
              _idempotency_and_webhooks),
    Migration((1, 3), "resumable (tus) uploads", create_tables(ResumableUpload)),
])
