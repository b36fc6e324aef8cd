"""The ingest service's ``labvault`` commands: ``jobs``, ``job``, ``reap``, ``token``, ``webhook``."""
from __future__ import annotations

import json
import os
import sys

from common import events
from common.access import Directory
from common.clients import IngestClient, MetadataClient
from common.commands import CommandError, deployed_database, say_deployment
from common.errors import LabvaultError
from common.settings import Settings

STEPS = ["UPLOADING", "open tar", "load metadata", "Policy Validation", "ingest files", "move files",
         "ingest metadata"]


def add_commands(add) -> None:
    listing = add("jobs", cmd_jobs, "List jobs, newest first, as the ingest service shows them to you.")
    listing.add_argument("--state", choices=["OK", "FAILED", "running", "done"], help="only jobs in this state")
    listing.add_argument("--project", help="only jobs whose transaction names this project")
    listing.add_argument("--submitter", type=int, help="only jobs of this submitter")
    listing.add_argument("--limit", type=int, default=20, help="how many jobs")
    listing.add_argument("--json", action="store_true", help="the ingest service's JSON page, for scripts")
    listing.add_argument("--url", help="ingest service URL (default: from settings)")
    listing.add_argument("--token", help="API token in token mode (default: $LABVAULT_TOKEN)")
    job = add("job", cmd_job, "Set a job's state by hand (fix a stuck job).")
    job.add_argument("--job-id", type=int, required=True, help="the job")
    job.add_argument("--state", required=True, choices=["OK", "FAILED"], help="the state to record")
    job.add_argument("--task", required=True, choices=STEPS, help="the step to record")
    job.add_argument("--task-percent", type=float, default=None,
                     help="the percent to record (default: keep the job's current one)")
    job.add_argument("--exception", default="", help="the failure text, 'code: message'")
    job.add_argument("--force", action="store_true",
                     help="allow turning a finished OK job into FAILED (its archived files are removed)")
    add("reap", cmd_reap, "Re-enqueue unfinished jobs that nobody runs; fail those out of attempts "
                          "or whose upload never finished.")
    token = add("token", cmd_token, "Create, list or revoke per-user API tokens ([auth] mode = token).")
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("token_id", nargs="?", help="revoke: the token's id, as 'token list' shows it")
    token.add_argument("--user", type=int, help="create: the user the token belongs to; list: only theirs")
    token.add_argument("--label", default="", help="create: a note, e.g. the instrument it is for")
    hook = add("webhook", cmd_webhook, "Add, list, remove, enable or disable webhook subscriptions (signed "
                                       "CloudEvents POSTed when jobs end and stats or computed files are built), "
                                       "or show a subscription's deliveries.")
    hook.add_argument("action", choices=["add", "list", "remove", "enable", "disable", "deliveries"])
    hook.add_argument("target", nargs="?", help="add: the URL (http or https); remove, enable, disable, "
                                                "deliveries: the subscription's id, as 'webhook list' shows it")
    hook.add_argument("--events", help="add: comma-separated event types: " + ", ".join(events.TYPES))
    hook.add_argument("--project", help="add: only events of this project")
    hook.add_argument("--user", type=int, help="add: the user the subscription acts for: it hears only of "
                                                 "projects the user may see (default: an operator's subscription, "
                                                 "which sees every project)")
    hook.add_argument("--secret", help="add: the HMAC secret (default: a new one, printed once)")
    hook.add_argument("--limit", type=int, default=20, help="deliveries: how many, newest first")
    hook.add_argument("--json", action="store_true", help="list, deliveries: JSON, for scripts")


def cmd_jobs(args, settings: Settings) -> int:
    """Read ``GET /jobs`` of the ingest service: the same identity rules as the dashboard's."""
    client = IngestClient(settings, base_url=args.url, token=args.token or os.environ.get("LABVAULT_TOKEN"))
    try:
        page = client.jobs(state=args.state, project=args.project, submitter=args.submitter, limit=args.limit)
    except LabvaultError as exc:
        raise CommandError(f"{client.base_url}: {exc.as_exception_text()}") from None
    if args.json:
        print(json.dumps(page))
        return 0
    rows = [("JOB", "STATE", "STEP", "%", "CREATED", "SUBMITTER", "PROJECT", "EXCEPTION")]
    rows += [(str(job["job_id"]), job["state"], job["task"], job["task_percent"], job["created"][:19],
              "" if job["submitter"] is None else str(job["submitter"]),
              "" if job["project"] is None else str(job["project"]), job["exception"][:60]) for job in page["jobs"]]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{len(page['jobs'])} of {page['total']} job(s)", file=sys.stderr)
    return 0


def cmd_job(args, settings: Settings) -> int:
    from ingest_service import jobs, notices
    say_deployment(args, settings)
    db, _ = deployed_database(settings, "ingest")
    with db.connection_context():
        try:
            job = jobs.get(args.job_id)
            percent = job.task_percent if args.task_percent is None else args.task_percent
            if args.state == jobs.FAILED:
                _fail_by_hand(args, settings, job, percent)
            else:
                was_complete = jobs.is_complete(job)
                jobs.set_state(args.job_id, args.state, args.task, percent, args.exception)
                if not was_complete:
                    notices.job_ended(settings, args.job_id)  # only if this made it end
        except LabvaultError as exc:
            raise CommandError(exc.message) from None
        print(json.dumps(jobs.state_json(jobs.get(args.job_id))))
    return 0


def _fail_by_hand(args, settings: Settings, job, percent) -> None:
    """FAILED by hand cleans up as any failure does (``pipeline.fail_job``); a finished OK job is
    failed only with ``--force``: its files and metadata are already in use."""
    from ingest_service import jobs, pipeline, tasks
    if job.state == jobs.OK and jobs.is_complete(job) and not args.force:
        raise CommandError(f"job {args.job_id} finished OK; failing it removes its archived files: "
                           "add --force if that is what you want")
    jobs.check_percent(percent)
    exception = args.exception or "failed_by_admin: set FAILED with 'labvault job'"
    pipeline.fail_job(tasks.context_for(settings), args.job_id, args.task, _AsError(exception))
    jobs.update(args.job_id, task_percent=percent)


class _AsError(LabvaultError):
    """The admin's own text for the job's ``exception``, recorded as it is."""

    code = "failed_by_admin"

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def as_exception_text(self) -> str:
        return self.text


def cmd_reap(args, settings: Settings) -> int:
    from ingest_service import reaper, tasks
    say_deployment(args, settings)
    deployed_database(settings, "ingest")
    try:
        reaped = tasks.reap_once(settings)
    except LabvaultError as exc:
        raise CommandError(f"reap: {exc.as_exception_text()}") from None
    for entry in reaped:
        print(entry)
    requeued = sum(entry.action == reaper.REQUEUED for entry in reaped)
    print(f"reap: {requeued} re-enqueued, {len(reaped) - requeued} failed" if reaped else "reap: nothing to do")
    return 0


def cmd_token(args, settings: Settings) -> int:
    from ingest_service import identity
    say_deployment(args, settings)
    db, _ = deployed_database(settings, "ingest")
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


def cmd_webhook(args, settings: Settings) -> int:
    from ingest_service import webhooks
    say_deployment(args, settings)
    db, _ = deployed_database(settings, "ingest")
    with db.connection_context():
        try:
            if args.action == "add":
                return _add_webhook(args, settings, webhooks)
            if args.action == "list":
                return _list_webhooks(args, webhooks)
            if not (args.target or "").isdigit():
                raise CommandError(f"webhook {args.action} needs the subscription's id, as 'webhook list' shows it")
            subscription_id = int(args.target)
            if args.action == "remove":
                webhooks.remove(subscription_id)
                print(f"webhook {subscription_id} removed")
            elif args.action == "deliveries":
                webhooks.get(subscription_id)
                _show_deliveries(args, webhooks.deliveries(subscription_id, max(1, args.limit)))
            else:
                row = webhooks.set_enabled(subscription_id, args.action == "enable")
                print(f"webhook {row.id} {'enabled (failure count reset)' if row.enabled else 'disabled'}")
        except LabvaultError as exc:
            raise CommandError(exc.message) from None
    return 0


def _add_webhook(args, settings: Settings, webhooks) -> int:
    if not args.target:
        raise CommandError("webhook add needs the URL")
    if not args.events:
        raise CommandError("webhook add needs --events, e.g. --events job.ok,job.failed")
    try:
        types = events.parse_types(args.events)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    _check_visibility(settings, args.user, args.project)
    row = webhooks.add(args.target, types, project=args.project, owner=args.user, secret=args.secret)
    print(f"webhook {row.id} added: {row.url} for {row.events}"
          + (f" of project {row.project}" if row.project else " of every project it may see"))
    if not args.secret:
        print(f"secret: {row.secret}")
        print("the secret is shown only this once; deliveries carry X-Labvault-Signature: sha256=<HMAC of the body>",
              file=sys.stderr)
    return 0


def _check_visibility(settings: Settings, user: int | None, project: str | None) -> None:
    """A subscription hears only of what its user may see: a project they may see (a member, or an
    admin), and every project only for an admin. An operator's subscription (no ``--user``; the
    command runs with the deployment's database, as ``labvault job`` does) sees everything."""
    directory = Directory(MetadataClient(settings))
    try:
        if project is not None and directory.project(project) is None:
            raise CommandError(f"no project {project!r} in the metadata service")
        if user is None:
            return
        if directory.user(user) is None:
            raise CommandError(f"no user {user} in the metadata service")
        if project is None and not directory.is_admin(user):
            raise CommandError(f"user {user} is not an admin: a subscription of theirs needs --project, "
                               "a project they may see")
        if project is not None and not directory.may_see_project(user, project):
            raise CommandError(f"user {user} may not see project {project!r} (neither a member nor an admin)")
    except LabvaultError as exc:
        raise CommandError(f"cannot check who may see what: {exc.as_exception_text()}") from None


def _list_webhooks(args, webhooks) -> int:
    rows = webhooks.listing()
    described = [{"id": row.id, "url": row.url, "events": row.events.split(","), "project": row.project,
                  "user": row.owner, "enabled": bool(row.enabled), "failures": row.failures,
                  "last_error": row.last_error,
                  "last_delivery": None if row.last_delivery is None else f"{row.last_delivery:%Y-%m-%d %H:%M:%S}",
                  "disabled_at": None if row.disabled_at is None else f"{row.disabled_at:%Y-%m-%d %H:%M:%S}"}
                 for row in rows]
    if args.json:
        print(json.dumps(described))
        return 0
    for entry in described:
        state = "enabled" if entry["enabled"] else f"DISABLED since {entry['disabled_at']}"
        scope = f"project {entry['project']}" if entry["project"] else "all projects"
        who = f"user {entry['user']}" if entry["user"] is not None else "operator"
        print(f"{entry['id']}  {state}  {entry['url']}  {','.join(entry['events'])}  {scope}  {who}  "
              f"failures {entry['failures']}" + (f"  last error: {entry['last_error']}" if entry["last_error"] else ""))
    print(f"{len(described)} webhook subscription(s)", file=sys.stderr)
    return 0


def _show_deliveries(args, rows) -> None:
    described = [{"event_id": row.event_id, "type": row.event_type, "attempt": row.attempt, "status": row.status,
                  "error": row.error, "duration_ms": row.duration_ms, "at": f"{row.at:%Y-%m-%d %H:%M:%S}"}
                 for row in rows]
    if args.json:
        print(json.dumps(described))
        return
    for entry in described:
        answer = f"HTTP {entry['status']}" if entry["status"] is not None else "no answer"
        print(f"{entry['at']}  {entry['type']}  {entry['event_id']}  attempt {entry['attempt']}  {answer}  "
              f"{entry['duration_ms']} ms" + (f"  {entry['error']}" if entry["error"] and entry["status"] is None else ""))
