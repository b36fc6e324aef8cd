"""The stats service's tables: operation runs (the cache), their outputs, and per-project state."""
from __future__ import annotations

import peewee

from common.db import utcnow
from common.migrations import Migration, Schema, create_tables

# Bound to a real database by app.build_app, the tasks or a test; nothing connects at import.
database = peewee.DatabaseProxy()

QUEUED, RUNNING, OK, FAILED = "queued", "running", "ok", "failed"


class Run(peewee.Model):
    """One run of an operation on some inputs. An ``ok`` run is the cached result of its key."""

    run_id = peewee.CharField(max_length=32, primary_key=True)
    operation = peewee.CharField(max_length=100)
    version = peewee.CharField(max_length=40)
    # sha256(name, version, canonical inputs, input digests): equal keys, equal results.
    cache_key = peewee.CharField(max_length=64, index=True)
    inputs = peewee.TextField()          # canonical JSON
    input_digests = peewee.TextField()   # JSON {file_id: "hashtype:hashsum"}
    # What the run is about, for listings (a project's runs, a file's runs).
    project = peewee.CharField(max_length=255, null=True, index=True)
    file_id = peewee.BigIntegerField(null=True, index=True)
    state = peewee.CharField(max_length=16, default=QUEUED)
    percent = peewee.FloatField(default=0)
    message = peewee.TextField(default="")
    result = peewee.TextField(null=True)        # JSON the operation returned
    error_code = peewee.CharField(max_length=64, null=True)
    error_message = peewee.TextField(null=True)
    environment = peewee.TextField(null=True)   # JSON: library versions that computed it
    created = peewee.DateTimeField(default=utcnow)
    started = peewee.DateTimeField(null=True)
    finished = peewee.DateTimeField(null=True)
    seconds = peewee.FloatField(null=True)
    cache_hits = peewee.IntegerField(default=0)
    last_hit = peewee.DateTimeField(null=True)
    # The ingest reaper's pattern: a run holds a claim and keeps a heartbeat; attempts counted.
    claimed_by = peewee.CharField(max_length=255, null=True)
    heartbeat = peewee.DateTimeField(null=True)
    attempts = peewee.IntegerField(default=0)

    class Meta:
        database = database
        table_name = "stats_run"


class RunOutput(peewee.Model):
    """A file a run produced, stored in the archive under ``archive_id``."""

    run = peewee.ForeignKeyField(Run, backref="outputs", on_delete="CASCADE", column_name="run_id")
    name = peewee.CharField(max_length=200)
    archive_id = peewee.BigIntegerField()
    size = peewee.BigIntegerField()
    sha256 = peewee.CharField(max_length=64)
    content_type = peewee.CharField(max_length=100)
    created = peewee.DateTimeField(default=utcnow)

    class Meta:
        database = database
        table_name = "stats_run_output"
        indexes = ((("run", "name"), True),)


class ProjectStats(peewee.Model):
    """A project's statistics as last built, and who is building them now."""

    project = peewee.CharField(max_length=255, primary_key=True)
    state = peewee.CharField(max_length=16, default="none")  # none | building | ok | failed | skipped
    summary = peewee.TextField(null=True)       # JSON served by GET /stats/<project>
    # sha256 of the project's (file id, digest) list the summary was built from.
    inputs_digest = peewee.CharField(max_length=64, null=True)
    figures_run = peewee.CharField(max_length=32, null=True)
    built = peewee.DateTimeField(null=True)
    error = peewee.TextField(null=True)
    # Set when new inputs arrive while a build runs: the builder goes round once more.
    dirty = peewee.BooleanField(default=False)
    claimed_by = peewee.CharField(max_length=255, null=True)
    heartbeat = peewee.DateTimeField(null=True)

    class Meta:
        database = database
        table_name = "stats_project"


class FileStats(peewee.Model):
    """The run that holds a file's statistics (per file, for GET /stats/files/<id>)."""

    file_id = peewee.BigIntegerField(primary_key=True)
    project = peewee.CharField(max_length=255, index=True)
    path = peewee.TextField()
    kind = peewee.CharField(max_length=32)
    digest = peewee.CharField(max_length=300)
    run = peewee.CharField(max_length=32, null=True)
    updated = peewee.DateTimeField(default=utcnow)

    class Meta:
        database = database
        table_name = "stats_file"


SCHEMA = Schema("stats", [
    Migration((1, 0), "runs, outputs, project and file stats", create_tables(Run, RunOutput, ProjectStats, FileStats)),
])
