"""The ingest service's ``labvault`` commands: ``jobs``, ``job``, ``reap``, ``token``."""
from __future__ import annotations

import json
import os
import sys

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
    from ingest_service import jobs
    say_deployment(args, settings)
    db, _ = deployed_database(settings, "ingest")
    with db.connection_context():
        try:
            job = jobs.get(args.job_id)
            percent = job.task_percent if args.task_percent is None else args.task_percent
            if args.state == jobs.FAILED:
                _fail_by_hand(args, settings, job, percent)
            else:
                jobs.set_state(args.job_id, args.state, args.task, percent, args.exception)
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
