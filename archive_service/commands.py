"""The archive's command-line commands (``labvault fixity``, ``labvault import-bucket``):
parse, call the domain, print."""
from __future__ import annotations

import argparse

from archive_service import fixity, models
from archive_service.backends import make_storage
from common import migrations
from common.commands import CommandError, id_value
from common.errors import LabvaultError
from common.settings import Settings


def add_commands(add) -> None:
    fixity = add("fixity", cmd_fixity, "Re-read stored files and record whether their digest still matches.")
    add_fixity_arguments(fixity)
    import_bucket = add("import-bucket", cmd_import_bucket,
                        "Record the objects of an existing bucket as archive files in one transaction.")
    add_import_bucket_arguments(import_bucket)


def add_fixity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file-id", type=int, help="check this file only")
    parser.add_argument("--older-than", type=float, metavar="DAYS",
                        help="only files not checked for DAYS days (default: [archive] fixity_days)")
    parser.add_argument("--limit", type=int, help="check at most N files (default: [archive] fixity_batch)")


def cmd_fixity(args: argparse.Namespace, settings: Settings) -> int:
    """Re-check stored files; prints each problem and a count; exit 1 when a problem was found."""
    limit = args.limit if args.limit is not None else settings.getint("archive", "fixity_batch")
    older = args.older_than if args.older_than is not None else settings.getfloat("archive", "fixity_days")
    try:
        db = migrations.bind_service(models.database, settings.database_url("archive"), models.SCHEMA)
        storage = make_storage(settings)
        storage.prepare(create=False)
        with db.connection_context():
            outcomes = fixity.run(storage, limit, None if args.file_id is not None else older, args.file_id)
    except LabvaultError as exc:
        raise CommandError(exc.as_exception_text(), 2) from None
    if args.file_id is not None and not outcomes:
        raise CommandError(f"file {args.file_id} is not in the archive", 1)
    for outcome in outcomes:
        if outcome.result != models.OK:
            print(outcome)
    problems = sum(outcome.result != models.OK for outcome in outcomes)
    print(f"fixity: {len(outcomes)} checked, {len(outcomes) - problems} ok, {problems} with problems")
    return 1 if problems else 0


def add_import_bucket_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="s3://BUCKET/PREFIX", help="the objects to import")
    parser.add_argument("--project", required=True, help="project id of the transaction")
    parser.add_argument("--instrument", required=True, help="instrument id of the transaction")
    parser.add_argument("--submitter", required=True, help="submitting user id")
    parser.add_argument("--endpoint-url", help="S3 endpoint of the source (default: [archive] endpoint_url)")
    parser.add_argument("--allow-bucket-wipe", action="store_true",
                        help="accept that every object imported from this prefix before is gone")


def cmd_import_bucket(args: argparse.Namespace, settings: Settings) -> int:
    """Import the objects under ``args.source`` as one metadata transaction; print what changed."""
    from archive_service.archive import Archive
    from archive_service.bucket_import import import_bucket, parse_source
    from common.clients import MetadataClient

    try:
        source = parse_source(args.source)
        db = migrations.bind_service(models.database, settings.database_url("archive"), models.SCHEMA)
        storage = make_storage(settings)
        storage.prepare(create=settings.getbool("archive", "create_bucket", False))
        archive_endpoint = settings.get("archive", "endpoint_url", "").strip() or None
        endpoint = args.endpoint_url or archive_endpoint
        client = _s3_client(settings, endpoint)
        # A server-side copy needs the source on the archive's own endpoint.
        server_side = storage.media == "s3" and endpoint == archive_endpoint
        with db.connection_context():
            report = import_bucket(Archive(storage), client, source, MetadataClient(settings),
                                   id_value(args.submitter), args.project, id_value(args.instrument),
                                   allow_wipe=args.allow_bucket_wipe, server_side=server_side)
    except LabvaultError as exc:
        raise CommandError(exc.as_exception_text(), 1) from None
    for key in report.removed:
        print(f"removed: {key}")
    for key in report.changed:
        print(f"changed: {key} (the archived copy is kept as it was)")
    transaction = f" in transaction {report.transaction_id}" if report.transaction_id is not None else ""
    print(f"import {report.source}: {len(report.added)} added{transaction}, {len(report.removed)} removed, "
          f"{len(report.changed)} changed, {report.unchanged} unchanged")
    return 0


def _s3_client(settings: Settings, endpoint: str | None):
    # boto3 only for this command, as for the S3 backend.
    import boto3
    from botocore.config import Config
    style = settings.get("archive", "addressing_style", "auto").strip().lower() or "auto"
    return boto3.client("s3", endpoint_url=endpoint, region_name=settings.get("archive", "region", "").strip() or None,
                        config=Config(s3={"addressing_style": style}, retries={"max_attempts": 5, "mode": "standard"},
                                      max_pool_connections=16))
