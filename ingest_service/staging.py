"""The staging volume: where uploaded bundles (and /move documents) wait for their job."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from common.errors import LabvaultError, PayloadTooLarge

CHUNK = 1024 * 1024


class Staging:
    def __init__(self, root: Path):
        self.root = Path(root)

    def bundle_path(self, job_id: int) -> Path:
        return self.root / f"{int(job_id)}.tar"

    def document_path(self, job_id: int) -> Path:
        return self.root / f"{int(job_id)}.json"

    def receive(self, job_id: int, read: Callable[[int], bytes], limit: int,
                suffix: str = ".tar", expected: int | None = None) -> int:
        """Stream ``read`` into ``<job_id><suffix>`` in chunks; returns the byte count.

        The bytes land under a ``.part`` name and are renamed once complete, so a
        staged bundle is always whole. Over ``limit`` bytes raises 413 and removes
        what was written; so does any error while reading, or a body that ends
        before its declared ``expected`` length (the client went away).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{int(job_id)}{suffix}"
        part = final.with_name(final.name + ".part")
        total = 0
        try:
            with open(part, "wb") as handle:
                while True:
                    chunk = read(CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > limit:
                        raise PayloadTooLarge(f"bundle larger than the limit of {limit} bytes")
                    handle.write(chunk)
                if expected is not None and total != expected:
                    raise UploadInterrupted(f"the upload stopped after {total} of {expected} bytes")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return total

    def discard(self, job_id: int) -> None:
        """Remove everything staged for ``job_id`` (no error when nothing is there)."""
        for path in (self.bundle_path(job_id), self.document_path(job_id)):
            for candidate in (path, path.with_name(path.name + ".part")):
                candidate.unlink(missing_ok=True)


class UploadInterrupted(LabvaultError):
    status, code = 400, "upload_interrupted"
