"""``labvault``: one command line for the whole suite."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from common import bundles, migrations, registry
from common.celery_app import broker_folder, make_celery
from common.clients import IngestClient
from common.commands import CommandError, id_value, say_deployment, sync_all
from common.errors import LabvaultError
from common.hashing import DEFAULT_HASH_TYPE, HASH_TYPES
from common.logs import setup_logging
from common.settings import Settings, SettingsError

logger = logging.getLogger("labvault")

# -- shared helpers -----------------------------------------------------------

def load_settings(args: argparse.Namespace) -> Settings:
    settings = Settings.load(args.config)
    if args.data_dir:
        settings = settings.with_overrides({"data": {"dir": str(Path(args.data_dir).resolve())}})
    return settings


# -- commands -------------------------------------------------------------------

def cmd_dbsync(args, settings: Settings) -> int:
    sync_all(settings)
    return 0


def cmd_dbchk(args, settings: Settings) -> int:
    say_deployment(args, settings)
    status = 0
    for service in registry.with_tables():
        db, schema = service.database(settings)
        with db.connection_context():
            ok, message = migrations.check(db, schema, equal=args.equal)
        print(message)
        status = status or (0 if ok else 1)
    return status


def cmd_serve(args, settings: Settings) -> int:
    from common.web import serve
    service = registry.get(args.service)
    if args.port:
        settings = settings.with_overrides({args.service: {"port": args.port}})
    if args.host:
        settings = settings.with_overrides({args.service: {"host": args.host}})
    try:
        application = service.build_app(settings)
    except LabvaultError as exc:
        raise CommandError(f"{args.service}: {exc.message}", 2) from None
    host, port = service.bind_address(settings)
    serve(application, settings, args.service, host, port)
    return 0


def cmd_worker(args, settings: Settings) -> int:
    app = make_celery(settings)
    argv = ["worker", "--queues", args.queues or ",".join(registry.queues()), "--concurrency", str(args.concurrency or settings.getint("celery", "concurrency")),
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


def cmd_bundle(args, settings: Settings) -> int:
    root = Path(args.directory)
    if not root.is_dir():
        raise CommandError(f"{root} is not a directory")
    keys = _keys(args.key)
    files = bundles.describe_tree(root, args.hashtype)
    document = bundles.build_metadata(id_value(args.submitter), args.project, id_value(args.instrument),
                                      [entry for _, entry in files], keys)
    out = Path(args.output)
    bundles.write_bundle(out, files, document)
    total = sum(entry["size"] for _, entry in files)
    print(f"{out}: {len(files)} file(s), {total} bytes of data, {args.hashtype} hashes")
    return 0


def cmd_ingest(args, settings: Settings) -> int:
    path = Path(args.path)
    if path.is_dir():
        import tempfile
        with tempfile.TemporaryDirectory(prefix="labvault-ingest-") as folder:
            return _upload(args, settings, _bundle_directory(args, path, Path(folder) / "bundle.tar"))
    if not path.is_file():
        raise CommandError(f"{path} is not a file or a directory")
    return _upload(args, settings, path)


def _bundle_directory(args, root: Path, out: Path) -> Path:
    """Bundle ``root`` (as ``labvault bundle`` does) into ``out``, a temporary file."""
    missing = [option for option in ("submitter", "project", "instrument") if not getattr(args, option)]
    if missing:
        raise CommandError("ingesting a directory needs " + ", ".join(f"--{option}" for option in missing))
    files = bundles.describe_tree(root, args.hashtype)
    document = bundles.build_metadata(id_value(args.submitter), args.project, id_value(args.instrument),
                                      [entry for _, entry in files], _keys(args.key))
    bundles.write_bundle(out, files, document)
    print(f"labvault ingest: bundled {len(files)} file(s) of {root}", file=sys.stderr)
    return out


def _keys(pairs) -> dict[str, str]:
    keys = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--key takes KEY=VALUE, not {pair!r}")
        keys[key] = value
    return keys


def _upload(args, settings: Settings, path: Path) -> int:
    compression = bundles.compression_of(path)
    if compression:
        raise CommandError(f"{path} is {compression}-compressed; labvault takes an uncompressed tar "
                           f"(decompress it first, or make it with 'labvault bundle')")
    if args.url and "://" not in args.url:
        raise CommandError(f"--url {args.url} has no scheme; give it as http://{args.url}")
    if args.resumable and (args.idempotency_key is not None or args.dedupe):
        raise CommandError("--resumable and --idempotency-key/--dedupe do not go together: an idempotent "
                           "upload is one request (retried whole); a resumable one resumes by its URL")
    token = args.token or os.environ.get("LABVAULT_TOKEN")
    client = IngestClient(settings, base_url=args.url, token=token)
    print(f"labvault ingest: to {client.base_url}", file=sys.stderr)
    size = path.stat().st_size
    bar = ProgressBar(size, sys.stderr, "upload")

    def open_body():
        from common.hashing import HashingReader
        bar.show(0)  # a retry starts from the first byte again
        return HashingReader(open(path, "rb"), length=size, on_read=bar.advance)

    try:
        idempotent = args.idempotency_key is not None or args.dedupe
        if not idempotent and (args.resumable or size > settings.getint("ingest", "resumable_above")):
            state = _resumable_upload(args, settings, client, path, bar)
        else:
            state = client.upload(open_body, idempotency_key=args.idempotency_key, dedupe=args.dedupe)
    except LabvaultError as exc:
        bar.close()
        raise CommandError(f"upload failed: {exc.as_exception_text()}{_advice(exc, token)}") from None
    bar.close()
    if not args.wait:
        print(json.dumps(state))
        return 0
    return _follow(client, int(state["job_id"]), args.timeout)


def _resumable_upload(args, settings: Settings, client: IngestClient, path: Path, bar: "ProgressBar") -> dict:
    """Send ``path`` as a resumable (tus) upload, resuming by itself after breaks; the job's state."""
    from common.tus import ResumableUpload, default_state_dir

    def say(text: str) -> None:
        if bar.enabled:
            bar.stream.write("\n")
        print(f"labvault ingest: {text}", file=sys.stderr, flush=True)

    upload = ResumableUpload(client.base_url, path, session=client.session, headers=client.headers,
                             timeout=client.timeout, state_dir=default_state_dir(),
                             chunk_size=args.chunk_size or settings.getint("ingest", "upload_chunk_bytes"),
                             on_offset=bar.show, on_sent=bar.advance, say=say)
    print(f"labvault ingest: resumable upload of {upload.size} bytes", file=sys.stderr)
    job_id = upload.run()
    return client.get_state(job_id)


def _advice(error: LabvaultError, token: str | None) -> str:
    """What to do about an upload the service refused or could not take."""
    if error.status == 401:
        return ("; the service runs in token mode: pass --token (or set LABVAULT_TOKEN)" if not token
                else "; the token was refused: check it with 'labvault token list' on the server")
    if error.status == 503:
        return "; is the service running (labvault up), and is --url right?"
    return ""


def _follow(client: IngestClient, job_id: int, timeout: float) -> int:
    """Follow a job to its end: on a terminal a bar per step (rate, time left); elsewhere one
    line per step."""
    deadline = time.monotonic() + timeout
    step, bar = None, None
    while True:
        state = client.get_state(job_id)
        if (state["state"], state["task"]) != step:
            if bar is not None:
                bar.close()
            step = (state["state"], state["task"])
            bar = ProgressBar(100, sys.stderr, f"job {job_id} {state['task']}", unit="%")
            if not bar.enabled:
                print(f"job {job_id}: {state['state']} {state['task']} {state['task_percent']}%", file=sys.stderr)
        bar.show(float(state["task_percent"]))
        if state["complete"]:
            bar.close()
            if state["exception"]:
                print(f"job {job_id}: {state['exception']}", file=sys.stderr)
            print(json.dumps(state))
            return 0 if state["state"] == "OK" else 1
        if time.monotonic() > deadline:
            bar.close()
            print(json.dumps(state))
            raise CommandError(f"job {job_id} did not finish within {timeout:.0f}s")
        time.sleep(0.25)


class ProgressBar:
    """A one-line progress bar with rate and time left on a terminal; silent elsewhere."""

    WIDTH = 30

    def __init__(self, total: float, stream, label: str = "upload", unit: str = "MiB"):
        self.total, self.done, self.stream, self.label, self.unit = max(total, 1), 0.0, stream, label, unit
        self.enabled = stream.isatty()
        self.started = time.monotonic()
        self._last = -1

    def advance(self, count: int) -> None:
        self.show(self.done + count)

    def show(self, done: float) -> None:
        self.done = done
        percent = int(100 * self.done / self.total)
        if not self.enabled or percent == self._last:
            return
        self._last = percent
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{left:4.0f}s left" if left != float("inf") else "   ?s left"
        filled = min(percent, 100) * self.WIDTH // 100
        amount = (f"{self.done / 1048576:.1f}/{self.total / 1048576:.1f} MiB {rate / 1048576:.1f} MiB/s"
                  if self.unit == "MiB" else f"{rate:.1f} %/s")
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {percent:3d}% "
                          f"{amount} {eta}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def cmd_status(args, settings: Settings) -> int:
    from common.status import report
    found = report(settings)
    if args.json:
        print(json.dumps(found))
        return 0 if found["ok"] else 1
    for entry in found["services"]:
        print(f"{entry['name']:<10} {'up' if entry['up'] else 'DOWN':<5} {entry['url']}")
    broker = found["broker"]
    print(f"{'broker':<10} {'up' if broker['up'] else 'DOWN':<5} {broker['url']}")
    for queue, count in broker["queues"].items():
        print(f"{'queue':<10} {queue:<10} {'?' if count is None else count} waiting")
    workers = broker["workers"]
    print(f"{'workers':<10} {workers if isinstance(workers, str) else (', '.join(workers) or 'none')}")
    print(f"{'auth':<10} {found['auth_mode']}")
    return 0 if found["ok"] else 1


def cmd_up(args, settings: Settings) -> int:
    from common.supervisor import Supervisor
    return Supervisor(settings, sys.stdout).run()


# -- parser ---------------------------------------------------------------------

class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="settings INI file (default: LABVAULT_CONFIG or the built-in defaults)")
    common.add_argument("--data-dir", help="the deployment's data directory (default: ./var, or [data] dir)")

    parser = argparse.ArgumentParser(prog="labvault", description="labvault: ingest and archive suite.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        # Every option's help says its default.
        command = sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                                 formatter_class=HelpWithDefaults)
        command.set_defaults(func=func)
        return command

    add("up", cmd_up, "Run every service and a Celery worker on this machine until Ctrl-C.")
    serve = add("serve", cmd_serve, "Run one service on CherryPy's own server.")
    serve.add_argument("service", choices=registry.names())
    serve.add_argument("--host", help="address to listen on (default: [SERVICE] host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: [SERVICE] port)")
    worker = add("worker", cmd_worker, "Run a Celery worker.")
    worker.add_argument("--queues", help="comma-separated queues (default: every service's)")
    worker.add_argument("--concurrency", type=int, help="worker processes (default: [celery] concurrency)")
    worker.add_argument("--beat", action="store_true",
                        help="also send the periodic tasks (the reaper), as 'labvault beat' does; one per deployment")
    add("beat", cmd_beat, "Run Celery beat: sends the periodic tasks (the reaper). Run exactly one per deployment.")
    add("dbsync", cmd_dbsync, "Create or upgrade every service's database schema.")
    dbchk = add("dbchk", cmd_dbchk, "Check every schema against the code; exit 1 on a mismatch.")
    dbchk.add_argument("--equal", action="store_true", help="demand the exact version, not only the same major")
    bundle = add("bundle", cmd_bundle, "Make a bundle (tar with metadata.txt and data/) from a directory.")
    bundle.add_argument("directory", help="the payload: every file under it goes under data/")
    bundle.add_argument("-o", "--output", required=True, help="the bundle (tar) to write")
    bundle.add_argument("--submitter", required=True, help="submitting user id")
    bundle.add_argument("--project", required=True, help="project id")
    bundle.add_argument("--instrument", required=True, help="instrument id")
    bundle.add_argument("--key", action="append", metavar="K=V", help="a transaction key/value (repeatable)")
    bundle.add_argument("--hashtype", default=DEFAULT_HASH_TYPE, choices=HASH_TYPES, help="hash of every file")
    ingest = add("ingest", cmd_ingest, "Upload a bundle (or a directory, bundled on the fly) to the ingest "
                                       "service, optionally following the job.")
    ingest.add_argument("path", help="the bundle (an uncompressed tar), or a directory to bundle")
    ingest.add_argument("--submitter", help="a directory's submitting user id")
    ingest.add_argument("--project", help="a directory's project id")
    ingest.add_argument("--instrument", help="a directory's instrument id")
    ingest.add_argument("--key", action="append", metavar="K=V", help="a directory's transaction key/value (repeatable)")
    ingest.add_argument("--hashtype", default=DEFAULT_HASH_TYPE, choices=HASH_TYPES, help="a directory's file hashes")
    ingest.add_argument("--url", help="ingest service URL (default: from settings)")
    ingest.add_argument("--wait", action="store_true", help="follow the job until it ends; exit 1 if it failed")
    ingest.add_argument("--token", help="API token when the service runs in token mode (default: $LABVAULT_TOKEN)")
    ingest.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits at most")
    ingest.add_argument("--idempotency-key", metavar="KEY",
                        help="name this upload (1 to 200 visible ASCII characters): sent again with the same key, "
                             "the bundle answers the job it made; the upload is then retried when the connection "
                             "fails (default: none, sent once)")
    ingest.add_argument("--dedupe", action="store_true",
                        help="the bundle's SHA-256 is its idempotency key: the same bytes sent again answer the "
                             "job they made (and the upload is retried when the connection fails)")
    ingest.add_argument("--resumable", action="store_true",
                        help="send as a resumable upload whatever the size (default: only above "
                             "[ingest] resumable_above bytes)")
    ingest.add_argument("--chunk-size", type=int, help="bytes per PATCH of a resumable upload "
                                                        "(default: [ingest] upload_chunk_bytes)")
    status = add("status", cmd_status, "Each service up or down, the broker, its queues, the workers, the auth mode; "
                                       "exit 0 only when all are up.")
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    # Each service's own commands (``job``, ``seed``, ...), declared by the service.
    for service in registry.services():
        if service.commands:
            registry.load(service.commands)(add)
    return parser


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("labvault")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


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
    sys.exit(main())
