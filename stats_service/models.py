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


class ComputedFile(peewee.Model):
    """A ready-made download of a project (or one of its samples): the newest build of its kind."""

    id = peewee.AutoField()
    project = peewee.CharField(max_length=255, index=True)
    # "" for a whole-project file; the sample's name for a sample package.
    sample = peewee.CharField(max_length=255, default="")
    kind = peewee.CharField(max_length=32)   # project_zip | sample_zip | metadata_zip | merged_anndata
    run = peewee.CharField(max_length=32, null=True)
    output = peewee.CharField(max_length=200, null=True)  # the run's output holding the bytes
    filename = peewee.CharField(max_length=300, default="")
    size = peewee.BigIntegerField(null=True)
    sha256 = peewee.CharField(max_length=64, null=True)
    # Why there is no file (merged AnnData of one file, incompatible genes, too many cells).
    skipped_code = peewee.CharField(max_length=64, null=True)
    skipped_reason = peewee.TextField(null=True)
    created = peewee.DateTimeField(default=utcnow)
    updated = peewee.DateTimeField(default=utcnow)

    class Meta:
        database = database
        table_name = "stats_computed_file"
        indexes = ((("project", "sample", "kind"), True),)


class DownloadToken(peewee.Model):
    """An API token for downloads (ScPCA's API-KEY); only its SHA-256 is kept."""

    digest = peewee.CharField(max_length=64, primary_key=True)
    email = peewee.CharField(max_length=254)
    is_activated = peewee.BooleanField(default=False)
    terms_version = peewee.CharField(max_length=16, null=True)
    # The labvault user who asked for it (identified as the ingest service identifies uploaders);
    # None when it was made anonymously: such a token opens public projects only.
    user = peewee.BigIntegerField(null=True)
    created = peewee.DateTimeField(default=utcnow)
    expires = peewee.DateTimeField()
    revoked = peewee.DateTimeField(null=True)

    class Meta:
        database = database
        table_name = "stats_download_token"


class IssuedDownload(peewee.Model):
    """Every download URL handed out, and every streamed download, with the token behind it."""

    id = peewee.AutoField()
    token = peewee.CharField(max_length=64, index=True)
    what = peewee.CharField(max_length=300)      # "computed_file 7", "transaction 12", "project 1234a"
    url_kind = peewee.CharField(max_length=16)   # signed | s3 | stream
    created = peewee.DateTimeField(default=utcnow)
    expires = peewee.DateTimeField(null=True)
    # A download that broke (a stored file no longer matching its digest): code and message.
    error = peewee.TextField(null=True)

    class Meta:
        database = database
        table_name = "stats_issued_download"


class Secret(peewee.Model):
    """Secrets every stats process must share (the URL-signing key), made once on first use."""

    name = peewee.CharField(max_length=64, primary_key=True)
    value = peewee.CharField(max_length=128)

    class Meta:
        database = database
        table_name = "stats_secret"


SCHEMA = Schema("stats", [
    Migration((1, 0), "runs, outputs, project and file stats, computed files, download tokens",
              create_tables(Run, RunOutput, ProjectStats, FileStats, ComputedFile, DownloadToken, IssuedDownload,
                            Secret)),
])
