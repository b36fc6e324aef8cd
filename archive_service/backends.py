"""The choice of storage backend: ``[archive] backend`` names one, ``make_storage`` builds it.

Apart from ``storage`` (the interface and the POSIX backend) so that backend modules
import the interface and nothing imports them back; boto3 comes in only with ``s3``.
"""
from __future__ import annotations

from archive_service.storage import PosixStorage, Storage
from common.settings import Settings, SettingsError

BACKENDS = ("posix", "s3")


def make_storage(settings: Settings) -> Storage:
    """The backend named by ``[archive] backend``; ``SettingsError`` for an unknown one.

    Connects to nothing: ``Storage.prepare`` checks the backend before a service serves.
    """
    backend = settings.get("archive", "backend", "posix").strip().lower()
    if backend == "posix":
        return PosixStorage(settings.path("archive", "root"))
    if backend == "s3":
        # boto3 is imported here, never at service start of a POSIX archive.
        from archive_service.s3 import S3Storage
        return S3Storage.from_settings(settings)
    raise SettingsError(f"[archive] backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
