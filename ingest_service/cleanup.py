"""Archive files of failed jobs: removed at once, or left for the sweeper when the archive is away.

The failure path (``pipeline.fail_job``, also the reaper's) calls ``remove_archive_files``;
the reaper's periodic run calls ``sweep_pending_deletes``. The pending deletions are kept
on the staging volume (``Staging.defer_deletes``), which every ingest process shares.
"""
from __future__ import annotations

import logging
from typing import Iterable

from common.clients import ArchiveClient
from common.errors import LabvaultError, ServiceUnavailable
from ingest_service.staging import Staging

logger = logging.getLogger(__name__)

def remove_archive_files(archive: ArchiveClient, staging: Staging, job_id: int, file_ids: Iterable[int]) -> list[int]:
    """Delete a failed job's archive files; returns the ids left for the sweeper.

    Absent files are fine (the job may have failed before writing them). Once the
    archive is unavailable (its retries spent) the rest are not tried one by one: they
    are recorded with ``Staging.defer_deletes`` for ``sweep_pending_deletes``.
    """
    ids = [int(file_id) for file_id in file_ids]
    for position, file_id in enumerate(ids):
        try:
            archive.delete(file_id)
        except ServiceUnavailable as exc:
            left = ids[position:]
            logger.error("job %s: archive unavailable while removing its files (%s); %d left for the sweeper",
                         job_id, exc.code, len(left))
            staging.defer_deletes(job_id, left)
            return left
        except LabvaultError as exc:
            logger.error("job %s: could not remove archive file %s: %s", job_id, file_id, exc.as_exception_text())
    return []


def sweep_pending_deletes(staging: Staging, archive: ArchiveClient) -> int:
    """Finish the deletions ``remove_archive_files`` had to leave; returns how many files went.

    Cheap when there is nothing to do (one directory listing), safe to run in several
    processes at once (a second DELETE of a file is a 404, which counts as done), and it
    stops at the first sign that the archive is still down, keeping what is left.
    """
    removed = 0
    for job_id, file_ids in staging.pending_deletes().items():
        for position, file_id in enumerate(file_ids):
            try:
                removed += archive.delete(file_id, retries=0)
            except ServiceUnavailable:
                staging.defer_deletes(job_id, file_ids[position:])
                logger.info("archive still unavailable; %d deletion(s) of job %s kept for later",
                            len(file_ids) - position, job_id)
                return removed
            except LabvaultError as exc:
                logger.error("job %s: could not remove archive file %s: %s", job_id, file_id,
                             exc.as_exception_text())
        staging.defer_deletes(job_id, [])
        logger.info("job %s: pending archive deletions done", job_id)
    return removed
