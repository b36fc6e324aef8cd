"""The stats service's ``labvault`` commands: ``regenerate``, ``purge``, ``download-token``."""
from __future__ import annotations

from common.commands import CommandError
from common.db import utcnow
from common.errors import LabvaultError
from common.settings import Settings


def add_commands(add) -> None:
    add_stats_commands(add)
    add_download_commands(add)


def add_stats_commands(add) -> None:
    regenerate = add("regenerate", cmd_regenerate,
                     "Rebuild a project's statistics and figures (only what changed, unless --force).")
    target = regenerate.add_mutually_exclusive_group(required=True)
    target.add_argument("--project", help="the project whose statistics to rebuild")
    target.add_argument("--all", action="store_true", help="every project")
    regenerate.add_argument("--force", action="store_true",
                            help="run every operation again, even where the cached result is current")
    regenerate.add_argument("--now", action="store_true",
                            help="build in this process and wait (default: hand it to a stats worker)")


def cmd_regenerate(args, settings: Settings) -> int:
    from stats_service import models, projects, tasks
    engine = tasks.engine_for(settings)
    try:
        names = engine.catalog.projects() if args.all else [engine.catalog.require_project(args.project)["_id"]]
        for project in map(str, names):
            if not args.now:
                tasks.enqueue_refresh(settings, project, args.force)
                print(f"{project}: rebuild enqueued{' (forced)' if args.force else ''}")
                continue
            with models.database.connection_context():
                outcome = projects.refresh(engine, project, args.force)
                row = models.ProjectStats.get_or_none(models.ProjectStats.project == project)
            detail = f" ({row.error})" if row is not None and row.error else ""
            print(f"{project}: {outcome}{detail}")
    except LabvaultError as exc:
        raise CommandError(f"regenerate: {exc.as_exception_text()}") from None
    return 0


def add_download_commands(add) -> None:
    purge = add("purge", cmd_purge, "Remove a project's computed files, statistics and figures "
                                    "(with --delete-files also its archived files and metadata).")
    purge.add_argument("--project", required=True)
    purge.add_argument("--delete-files", action="store_true",
                       help="also remove the project's archived files and their metadata rows")
    purge.add_argument("--yes", action="store_true", help="do not ask (required without a terminal)")
    tokens = add("download-token", cmd_download_token, "List or revoke download tokens (the API-KEY of downloads).")
    tokens.add_argument("action", choices=["list", "revoke"])
    tokens.add_argument("token_id", nargs="?", help="revoke: the token's id, as 'download-token list' shows it")
    tokens.add_argument("--email", help="list: only this address's tokens")


def cmd_purge(args, settings: Settings) -> int:
    import sys

    from stats_service import models, purge, tasks
    engine = tasks.engine_for(settings)
    try:
        project = str(engine.catalog.require_project(args.project)["_id"])
        with models.database.connection_context():
            plan = purge.plan(engine, project, args.delete_files)
            print(f"purge {project}: will remove")
            for line in plan.lines():
                print(f"  {line}")
            if not args.yes:
                if not sys.stdin.isatty():
                    raise CommandError("not on a terminal: add --yes to purge without being asked")
                if input("go ahead? [y/N] ").strip().lower() not in ("y", "yes"):
                    print("nothing removed")
                    return 1
            purge.execute(engine, plan)
    except LabvaultError as exc:
        raise CommandError(f"purge: {exc.as_exception_text()}") from None
    print(f"purge {project}: done")
    return 0


def cmd_download_token(args, settings: Settings) -> int:
    from stats_service import downloads, models, tasks
    tasks.engine_for(settings)  # binds the stats database
    with models.database.connection_context():
        if args.action == "list":
            query = models.DownloadToken.select().order_by(models.DownloadToken.created)
            if args.email:
                query = query.where(models.DownloadToken.email == args.email)
            for row in query:
                state = ("revoked" if row.revoked else "expired" if row.expires <= utcnow()
                         else "active" if row.is_activated else "not activated")
                print(f"{row.digest[:12]}  {row.email}  user {row.user if row.user is not None else '-'}  "
                      f"created {row.created:%Y-%m-%d}  expires {row.expires:%Y-%m-%d}  {state}")
            return 0
        if not args.token_id:
            raise CommandError("download-token revoke needs the token's id, as 'download-token list' shows it")
        try:
            row = downloads.revoke_token(args.token_id)
        except LabvaultError as exc:
            raise CommandError(exc.message) from None
        print(f"revoked {row.digest[:12]} ({row.email})")
    return 0
