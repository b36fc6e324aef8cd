"""``labvault``: one command line for the whole suite."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from common import bundles, migrations
from common.celery_app import broker_folder, enqueue, make_celery
from common.clients import IngestClient
from common.db import bind
from common.errors import LabvaultError
from common.hashing import DEFAULT_HASH_TYPE, HASH_TYPES
from common.settings import SERVICES, Settings, SettingsError

logger = logging.getLogger("labvault")

# service -> (module with build_app, module with database/SCHEMA or None); `up` starts them in this order.
SERVICE_MODULES = {
    "metadata": ("metadata_service.app", "metadata_service.models"),
    "archive": ("archive_service.app", "archive_service.models"),
    "policy": ("policy_service.app", None),
    "stats": ("stats_service.app", None),
    "ingest": ("ingest_service.app", "ingest_service.models"),
}


class CommandError(Exception):
    """A command that cannot go on; the message is for the user, the code is the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# -- shared helpers -----------------------------------------------------------

def load_settings(args: argparse.Namespace) -> Settings:
    settings = Settings.load(args.config)
    if args.data_dir:
        settings = settings.with_overrides({"data": {"dir": str(Path(args.data_dir).resolve())}})
    return settings


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.get("log", "level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def service_database(settings: Settings, service: str):
    """(database, schema) of a service that owns tables, bound to its settings URL."""
    models = importlib.import_module(SERVICE_MODULES[service][1])
    return bind(models.database, settings.database_url(service)), models.SCHEMA


def services_with_tables() -> list[str]:
    return [name for name, (_, models) in SERVICE_MODULES.items() if models]


def sync_all(settings: Settings, out=sys.stdout) -> None:
    for service in services_with_tables():
        db, schema = service_database(settings, service)
        with db.connection_context():
            applied = migrations.sync(db, schema)
        done = ", ".join(f"{major}.{minor}" for major, minor in applied) or "nothing to do"
        print(f"{service}: schema {schema.version[0]}.{schema.version[1]} ({done})", file=out)


# -- commands -------------------------------------------------------------------

def cmd_dbsync(args, settings: Settings) -> int:
    sync_all(settings)
    return 0


def cmd_dbchk(args, settings: Settings) -> int:
    status = 0
    for service in services_with_tables():
        db, schema = service_database(settings, service)
        with db.connection_context():
            ok, message = migrations.check(db, schema, equal=args.equal)
        print(message)
        status = status or (0 if ok else 1)
    return status


def cmd_serve(args, settings: Settings) -> int:
    from common.web import serve
    if args.port:
        settings = settings.with_overrides({args.service: {"port": args.port}})
    if args.host:
        settings = settings.with_overrides({args.service: {"host": args.host}})
    app_module = importlib.import_module(SERVICE_MODULES[args.service][0])
    try:
        application = app_module.build_app(settings)
    except LabvaultError as exc:
        raise CommandError(f"{args.service}: {exc.message}", 2) from None
    serve(application, settings, args.service)
    return 0


def cmd_worker(args, settings: Settings) -> int:
    app = make_celery(settings)
    argv = ["worker", "--queues", args.queues, "--concurrency", str(args.concurrency or settings.getint("celery", "concurrency")),
            "--loglevel", settings.get("log", "level", "INFO"), "--hostname", f"labvault-{os.getpid()}@%h"]
    if broker_folder(settings):
        # The filesystem broker has no fanout for worker-to-worker chatter.
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
        app.conf.worker_enable_remote_control = False
    if args.beat:
        settings.path("celery", "beat_schedule_file").parent.mkdir(parents=True, exist_ok=True)
        argv += ["--beat"]
    app.worker_main(argv)
    return 0


def cmd_beat(args, settings: Settings) -> int:
    app = make_celery(settings)
    settings.path("celery", "beat_schedule_file").parent.mkdir(parents=True, exist_ok=True)
    return app.start(["beat", "--loglevel", settings.get("log", "level", "INFO")]) or 0


def cmd_reap(args, settings: Settings) -> int:
    from ingest_service import pipeline, reaper
    db, _ = service_database(settings, "ingest")
    app = make_celery(settings)
    try:
        context = pipeline.IngestContext.from_settings(settings)
        with db.connection_context():
            reaped = reaper.reap(context, lambda job_id: enqueue(app, "ingest.process_job", job_id))
    except LabvaultError as exc:
        raise CommandError(f"reap: {exc.as_exception_text()}") from None
    finally:
        app.close()
    for entry in reaped:
        print(entry)
    requeued = sum(entry.action == reaper.REQUEUED for entry in reaped)
    print(f"reap: {requeued} re-enqueued, {len(reaped) - requeued} failed" if reaped else "reap: nothing to do")
    return 0


def cmd_job(args, settings: Settings) -> int:
    from ingest_service import jobs
    db, _ = service_database(settings, "ingest")
    with db.connection_context():
        try:
            jobs.get(args.job_id)
            jobs.set_state(args.job_id, args.state, args.task, args.task_percent, args.exception)
        except LabvaultError as exc:
            raise CommandError(exc.message) from None
        print(json.dumps(jobs.state_json(jobs.get(args.job_id))))
    return 0


def cmd_seed(args, settings: Settings) -> int:
    from metadata_service.seed import load_seed
    path = Path(args.path)
    if not path.exists():
        raise CommandError(f"{path} does not exist")
    db, schema = service_database(settings, "metadata")
    with db.connection_context():
        migrations.sync(db, schema)
        try:
            counts = load_seed(path)
        except LabvaultError as exc:
            raise CommandError(f"seed: {exc.as_exception_text()}") from None
    for table, count in counts.items():
        print(f"{table}: {count}")
    return 0


def cmd_bundle(args, settings: Settings) -> int:
    root = Path(args.directory)
    if not root.is_dir():
        raise CommandError(f"{root} is not a directory")
    keys = {}
    for pair in args.key or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--key takes KEY=VALUE, not {pair!r}")
        keys[key] = value
    files = bundles.describe_tree(root, args.hashtype)
    document = bundles.build_metadata(_id_value(args.submitter), args.project, _id_value(args.instrument),
                                      [entry for _, entry in files], keys)
    out = Path(args.output)
    bundles.write_bundle(out, files, document)
    total = sum(entry["size"] for _, entry in files)
    print(f"{out}: {len(files)} file(s), {total} bytes of data, {args.hashtype} hashes")
    return 0


def _id_value(value: str):
    return int(value) if value.isdigit() else value


def cmd_ingest(args, settings: Settings) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise CommandError(f"{path} is not a file")
    client = IngestClient(settings, base_url=args.url, token=args.token or os.environ.get("LABVAULT_TOKEN"))
    size = path.stat().st_size
    bar = ProgressBar(size, sys.stderr)

    def open_body():
        from common.hashing import HashingReader
        return HashingReader(open(path, "rb"), length=size, on_read=bar.advance)

    try:
        state = client.upload(open_body)
    except LabvaultError as exc:
        bar.close()
        raise CommandError(f"upload failed: {exc.as_exception_text()}") from None
    bar.close()
    if not args.wait:
        print(json.dumps(state))
        return 0
    return _follow(client, int(state["job_id"]), args.timeout)


def _follow(client: IngestClient, job_id: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        state = client.get_state(job_id)
        shown = (state["state"], state["task"], state["task_percent"])
        if shown != last:
            print(f"job {job_id}: {state['state']} {state['task']} {state['task_percent']}%", file=sys.stderr)
            last = shown
        if state["complete"]:
            print(json.dumps(state))
            return 0 if state["state"] == "OK" else 1
        if time.monotonic() > deadline:
            print(json.dumps(state))
            raise CommandError(f"job {job_id} did not finish within {timeout:.0f}s")
        time.sleep(0.5)


class ProgressBar:
    """A one-line upload progress bar on a terminal; silent elsewhere."""

    def __init__(self, total: int, stream):
        self.total, self.done, self.stream = max(total, 1), 0, stream
        self.enabled = stream.isatty()
        self._last = -1

    def advance(self, count: int) -> None:
        self.done += count
        percent = int(100 * self.done / self.total)
        if self.enabled and percent != self._last:
            self._last = percent
            filled = percent * 30 // 100
            self.stream.write(f"\rupload [{'#' * filled}{'.' * (30 - filled)}] {percent:3d}% "
                              f"{self.done / 1048576:.1f}/{self.total / 1048576:.1f} MiB")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def cmd_token(args, settings: Settings) -> int:
    from common.clients import MetadataClient
    from ingest_service import identity
    db, _ = service_database(settings, "ingest")
    with db.connection_context():
        if args.action == "create":
            if args.user is None:
                raise CommandError("token create needs --user")
            try:
                known = MetadataClient(settings).first("users", _id=args.user)
            except LabvaultError as exc:
                raise CommandError(f"cannot check user {args.user}: {exc.as_exception_text()}") from None
            if known is None:
                raise CommandError(f"no user {args.user} in the metadata service")
            token = identity.create_token(args.user, args.label)
            print(token)
            print(f"token for user {args.user} created; it is shown only this once", file=sys.stderr)
        elif args.action == "list":
            for row in identity.token_rows(args.user):
                state = f"revoked {row.revoked:%Y-%m-%d %H:%M}" if row.revoked else "live"
                print(f"{row.digest[:12]}  user {row.user}  created {row.created:%Y-%m-%d %H:%M}  {state}  {row.label}")
        else:
            if not args.token_id:
                raise CommandError("token revoke needs the token's id, as 'token list' shows it")
            try:
                row = identity.revoke_token(args.token_id)
            except LabvaultError as exc:
                raise CommandError(exc.message) from None
            print(f"revoked {row.digest[:12]} (user {row.user})")
    return 0


def cmd_fixity(args, settings: Settings) -> int:
    return importlib.import_module("archive_service.commands").cmd_fixity(args, settings)


def cmd_import_bucket(args, settings: Settings) -> int:
    return importlib.import_module("archive_service.commands").cmd_import_bucket(args, settings)


def cmd_up(args, settings: Settings) -> int:
    from common.supervisor import Supervisor
    return Supervisor(settings, sys.stdout).run()


# -- parser ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="settings INI file (default: LABVAULT_CONFIG or the built-in defaults)")
    common.add_argument("--data-dir", help="the deployment's data directory (default: ./var, or [data] dir)")

    parser = argparse.ArgumentParser(prog="labvault", description="labvault: ingest and archive suite.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        command.set_defaults(func=func)
        return command

    add("up", cmd_up, "Run all five services and a Celery worker on this machine until Ctrl-C.")
    serve = add("serve", cmd_serve, "Run one service on CherryPy's own server.")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    worker = add("worker", cmd_worker, "Run a Celery worker.")
    worker.add_argument("--queues", default="ingest,archive,stats", help="comma-separated queues (default: all)")
    worker.add_argument("--concurrency", type=int, help="worker processes (default: [celery] concurrency)")
    worker.add_argument("--beat", action="store_true",
                        help="also send the periodic tasks (the reaper), as 'labvault beat' does; one per deployment")
    add("beat", cmd_beat, "Run Celery beat: sends the periodic tasks (the reaper). Run exactly one per deployment.")
    add("dbsync", cmd_dbsync, "Create or upgrade every service's database schema.")
    dbchk = add("dbchk", cmd_dbchk, "Check every schema against the code; exit 1 on a mismatch.")
    dbchk.add_argument("--equal", action="store_true", help="demand the exact version, not only the same major")
    job = add("job", cmd_job, "Set a job's state by hand (fix a stuck job).")
    job.add_argument("--job-id", type=int, required=True)
    job.add_argument("--state", required=True, choices=["OK", "FAILED"])
    job.add_argument("--task", required=True)
    job.add_argument("--task-percent", type=float, default=0.0)
    job.add_argument("--exception", default="")
    add("reap", cmd_reap, "Re-enqueue unfinished jobs that nobody runs; fail those out of attempts "
                          "or whose upload never finished.")
    seed = add("seed", cmd_seed, "Load users, projects, instruments, groups and relationships from seed files.")
    seed.add_argument("path", help="a directory of Pacifica seed files (users.json, projects.json, ...)")
    bundle = add("bundle", cmd_bundle, "Make a bundle (tar with metadata.txt and data/) from a directory.")
    bundle.add_argument("directory")
    bundle.add_argument("-o", "--output", required=True)
    bundle.add_argument("--submitter", required=True, help="submitting user id")
    bundle.add_argument("--project", required=True, help="project id")
    bundle.add_argument("--instrument", required=True, help="instrument id")
    bundle.add_argument("--key", action="append", metavar="K=V", help="a transaction key/value (repeatable)")
    bundle.add_argument("--hashtype", default=DEFAULT_HASH_TYPE, choices=HASH_TYPES)
    token = add("token", cmd_token, "Create, list or revoke per-user API tokens ([auth] mode = token).")
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("token_id", nargs="?", help="revoke: the token's id, as 'token list' shows it")
    token.add_argument("--user", type=int, help="create: the user the token belongs to; list: only theirs")
    token.add_argument("--label", default="", help="create: a note, e.g. the instrument it is for")
    ingest = add("ingest", cmd_ingest, "Upload a bundle to the ingest service, optionally following the job.")
    ingest.add_argument("path")
    ingest.add_argument("--url", help="ingest service URL (default: from settings)")
    ingest.add_argument("--wait", action="store_true", help="follow the job until it ends; exit 1 if it failed")
    ingest.add_argument("--token", help="API token when the service runs in token mode (default: $LABVAULT_TOKEN)")
    ingest.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits at most")
    archive_commands = importlib.import_module("archive_service.commands")
    fixity = add("fixity", cmd_fixity, "Re-read stored files and record whether their digest still matches.")
    archive_commands.add_fixity_arguments(fixity)
    import_bucket = add("import-bucket", cmd_import_bucket,
                        "Record the objects of an existing bucket as archive files in one transaction.")
    archive_commands.add_import_bucket_arguments(import_bucket)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
        setup_logging(settings)
        return args.func(args, settings)
    except CommandError as exc:
        print(f"labvault {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except SettingsError as exc:
        print(f"labvault {args.command}: settings: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as "python -m common.cli", this file is __main__, a module apart from common.cli;
    # commands elsewhere raise common.cli.CommandError, which only common.cli's main catches.
    from common.cli import main as cli_main
    sys.exit(cli_main())
