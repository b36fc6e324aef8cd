"""The archive's command-line commands (``labvault fixity``): parse, call the domain, print."""
from __future__ import annotations

import argparse

from archive_service import fixity, models
from archive_service.storage import make_storage
from common import migrations
from common.cli import CommandError
from common.errors import LabvaultError
from common.settings import Settings


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
