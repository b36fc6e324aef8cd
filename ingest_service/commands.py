"""The ingest service's ``labvault`` commands: ``job``, ``reap``, ``token``."""
from __future__ import annotations

import json
import sys

from common.clients import MetadataClient
from common.commands import CommandError, service_database
from common.errors import LabvaultError
from common.settings import Settings


def add_commands(add) -> None:
    job = add("job", cmd_job, "Set a job's state by hand (fix a stuck job).")
    job.add_argument("--job-id", type=int, required=True)
    job.add_argument("--state", required=True, choices=["OK", "FAILED"])
    job.add_argument("--task", required=True)
    job.add_argument("--task-percent", type=float, default=0.0)
    job.add_argument("--exception", default="")
    add("reap", cmd_reap, "Re-enqueue unfinished jobs that nobody runs; fail those out of attempts "
                          "or whose upload never finished.")
    token = add("token", cmd_token, "Create, list or revoke per-user API tokens ([auth] mode = token).")
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("token_id", nargs="?", help="revoke: the token's id, as 'token list' shows it")
    token.add_argument("--user", type=int, help="create: the user the token belongs to; list: only theirs")
    token.add_argument("--label", default="", help="create: a note, e.g. the instrument it is for")


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


def cmd_reap(args, settings: Settings) -> int:
    from ingest_service import reaper, tasks
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
