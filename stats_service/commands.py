"""The stats service's ``labvault`` commands: ``regenerate``."""
from __future__ import annotations

from common.commands import CommandError
from common.errors import LabvaultError
from common.settings import Settings


def add_commands(add) -> None:
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
