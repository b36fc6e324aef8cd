"""What people look at: job listings with their submitters, one job with its files, the
archive's fixity summary (for the dashboard, ``labvault jobs`` and scripts).

The job table knows the *owner* of a job (the authenticated uploader; nobody in open mode);
the *submitter* and *project* are in the job's metadata transaction (its id is the job id),
which exists once the job reached ``ingest metadata``. So a listing is one query of the job
table, and the submitters and projects of the jobs on the page are looked up from the
metadata service; a ``submitter`` filter matches jobs owned by that user or whose
transaction names them, a ``project`` filter jobs whose transaction names the project.
"""
from __future__ import annotations

import logging

from common.access import Directory
from common.auth import Identity
from common.errors import BadRequest, LabvaultError, NotFound
from ingest_service import jobs

logger = logging.getLogger(__name__)

MAX_LIMIT = 500


def check_paging(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_LIMIT or not 0 <= offset <= 2 ** 31:
        raise BadRequest(f"limit is 1 to {MAX_LIMIT}, offset 0 or more", code="invalid_paging")


class JobViews:
    """Listings and details of jobs as ``identity`` may see them (``Identity.may_see``)."""

    def __init__(self, metadata, archive=None):
        self.directory = Directory(metadata)
        self.metadata = metadata
        self.archive = archive

    def listing(self, identity: Identity, state: str | None = None, submitter: int | None = None,
                project: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        """``{"total", "limit", "offset", "jobs": [state JSON + owner, submitter, project]}``, newest first."""
        check_paging(limit, offset)
        owners = None if identity.anonymous or identity.admin else [identity.user]
        job_ids = None
        if project:
            job_ids = [int(row["_id"]) for row in self.directory.rows("transactions", project=project)]
        either = None
        if submitter is not None:
            submitted = [int(row["_id"]) for row in self.directory.rows("transactions", submitter=submitter)]
            either = (submitter, submitted)
        total, page = jobs.listing(state or None, owners, job_ids, either, limit, offset)
        transactions = self._transactions([job.job_id for job in page])
        return {"total": total, "limit": limit, "offset": offset,
                "jobs": [self._entry(job, transactions.get(int(job.job_id))) for job in page]}

    def details(self, identity: Identity, job_id: int) -> dict:
        """One job: its state, owner, submitter, project, and the files its transaction recorded."""
        job = jobs.get(job_id)
        if not identity.may_see(job.owner):
            raise NotFound(f"no job {job_id}", code="job_not_found")
        document = self._entry(job, self._transactions([job_id]).get(job_id))
        files = self.directory.rows("files", transaction=job_id)
        document["files"] = [{key: row.get(key) for key in ("_id", "name", "subdir", "size", "hashtype",
                                                            "hashsum", "mimetype")} for row in files]
        return document

    def fixity(self) -> dict:
        """The archive's fixity summary; 404 ``fixity_not_available`` while the archive has none."""
        try:
            return self.archive.fixity_summary()
        except LabvaultError as exc:
            if exc.status == 404:
                raise NotFound("the archive has no fixity summary", code="fixity_not_available") from None
            raise

    def _transactions(self, job_ids: list[int]) -> dict[int, dict]:
        if not job_ids:
            return {}
        try:
            return {int(row["_id"]): row for row in self.directory.by_ids("transactions", job_ids)}
        except LabvaultError as exc:
            # The listing still answers from the job table alone; the submitters are a courtesy.
            logger.warning("job listing without submitters: %s", exc.as_exception_text())
            return {}

    @staticmethod
    def _entry(job, transaction: dict | None) -> dict:
        document = jobs.state_json(job)
        document.update({"kind": job.kind, "owner": job.owner,
                         "submitter": (transaction or {}).get("submitter"),
                         "project": (transaction or {}).get("project")})
        return document
