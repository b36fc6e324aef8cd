"""The archive's S3 backend (boto3, the ``s3`` extra): one object per file id under a prefix.

Writes are multipart uploads fed from a bounded buffer (``part_size`` bytes, at most
``upload_concurrency`` parts in flight), so a file never sits whole in memory. Nothing
is visible under the final key until ``commit``, which publishes with a conditional
write (``If-None-Match: *`` on PutObject or CompleteMultipartUpload): of two racing
writers exactly one wins, the other gets ``AlreadyExists``. Any failure aborts the
multipart upload; ``sweep_uploads`` aborts the ones a crashed process left open.

boto3 is imported only by this module, which ``make_storage`` imports only for
``[archive] backend = s3``.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import io
import logging
import threading
from typing import BinaryIO

import boto3
import botocore.exceptions
from botocore.config import Config

from archive_service.storage import AlreadyExists, Storage, StorageUnavailable, StoredStat, Upload, check_id
from common.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
# S3's smallest part (but the last); larger parts mean fewer requests and more memory.
MIN_PART_SIZE = 5 * MIB
ADDRESSING_STYLES = ("auto", "path", "virtual")
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_PRECONDITION = {"412", "PreconditionFailed", "ConditionalRequestConflict", "409"}
_TRANSPORT_ERRORS = (botocore.exceptions.BotoCoreError,)


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_missing(exc: BaseException) -> bool:
    return isinstance(exc, botocore.exceptions.ClientError) and (_code(exc) in _MISSING or _status(exc) == 404)


def _lost_race(exc: BaseException) -> bool:
    return isinstance(exc, botocore.exceptions.ClientError) and (
        _code(exc) in _PRECONDITION or _status(exc) in (409, 412))


def unavailable(what: str, exc: BaseException) -> StorageUnavailable:
    """The archive's error for an S3 failure; the details (endpoint, request ids) go to the log only."""
    if isinstance(exc, botocore.exceptions.ClientError):
        detail = f"{_code(exc) or _status(exc)}"
    else:
        detail = type(exc).__name__
    logger.warning("S3 %s failed: %s", what, exc)
    return StorageUnavailable(f"the archive's object store failed to {what} ({detail}); try again later")


class S3Storage(Storage):
    """Files as objects ``<prefix><file id>`` in one bucket."""

    media = "s3"

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, addressing_style: str = "auto", part_size: int = 8 * MIB,
                 upload_concurrency: int = 4, client=None, public_endpoint_url: str | None = None):
        if len(bucket) < 3:
            raise SettingsError(f"[archive] bucket must name a bucket (3 characters or more), not {bucket!r}")
        if part_size < MIN_PART_SIZE:
            raise SettingsError(f"[archive] part_size must be at least {MIN_PART_SIZE} bytes")
        if addressing_style not in ADDRESSING_STYLES:
            raise SettingsError(f"[archive] addressing_style must be one of {', '.join(ADDRESSING_STYLES)}")
        self.bucket = bucket
        prefix = prefix.strip().strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.part_size = part_size
        self.upload_concurrency = max(1, upload_concurrency)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        # Credentials come from boto3's usual chain (environment, profile, instance role),
        # never from the INI file.
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None,
            config=Config(s3={"addressing_style": addressing_style},
                          retries={"max_attempts": 5, "mode": "standard"},
                          connect_timeout=10, read_timeout=120,
                          max_pool_connections=max(10, 2 * self.upload_concurrency + 4)))
        # Presigned URLs name the endpoint downloaders reach, which a deployment behind a private
        # network gives separately (the signature covers the host), and are signed with SigV4:
        # boto3 would presign with the deprecated SigV2 that AWS refuses in newer regions.
        self.presign_client = boto3.client(
            "s3", endpoint_url=public_endpoint_url or endpoint_url or None, region_name=region or None,
            config=Config(s3={"addressing_style": addressing_style}, signature_version="s3v4"))

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        bucket = settings.get("archive", "bucket", "").strip()
        if not bucket:
            raise SettingsError("[archive] backend = s3 needs [archive] bucket")
        return cls(bucket, settings.get("archive", "prefix", ""),
                   endpoint_url=settings.get("archive", "endpoint_url", "").strip() or None,
                   region=settings.get("archive", "region", "").strip() or None,
                   addressing_style=settings.get("archive", "addressing_style", "auto").strip().lower() or "auto",
                   part_size=settings.getint("archive", "part_size", 8 * MIB),
                   upload_concurrency=settings.getint("archive", "upload_concurrency", 4),
                   public_endpoint_url=settings.get("archive", "public_endpoint_url", "").strip() or None)

    def key_for(self, file_id: int) -> str:
        return f"{self.prefix}{check_id(file_id)}"

    def shutdown(self) -> None:
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The part uploaders every upload of this storage shares. Long-lived threads keep the
        allocator's per-thread arenas few; each upload still bounds its own parts in flight."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4 * self.upload_concurrency, thread_name_prefix="s3-part")
            return self._executor

    # -- the interface ------------------------------------------------------------

    def prepare(self, create: bool = False) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError as exc:
            if not is_missing(exc):
                if _status(exc) == 403:
                    raise StorageUnavailable(f"access to S3 bucket {self.bucket!r} is denied "
                                             "(check the credentials in the environment)") from None
                raise unavailable(f"reach bucket {self.bucket!r}", exc) from None
        except _TRANSPORT_ERRORS as exc:
            raise StorageUnavailable(f"cannot reach the S3 endpoint for bucket {self.bucket!r} "
                                     f"({type(exc).__name__})") from None
        if not create:
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} does not exist; create it or set "
                                     "[archive] create_bucket = true")
        try:
            self.client.create_bucket(Bucket=self.bucket)
            logger.info("created S3 bucket %s", self.bucket)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise unavailable(f"create bucket {self.bucket!r}", exc) from None
        except _TRANSPORT_ERRORS as exc:
            raise unavailable(f"create bucket {self.bucket!r}", exc) from None

    def begin_write(self, file_id: int) -> Upload:
        return S3Upload(self, check_id(file_id))

    def open_read(self, file_id: int, start: int = 0, end: int | None = None) -> BinaryIO:
        key = self.key_for(file_id)
        arguments = {"Bucket": self.bucket, "Key": key}
        if start or end is not None:
            if end is not None and end < start:
                return io.BytesIO(b"")
            arguments["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            answer = self.client.get_object(**arguments)
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                raise FileNotFoundError(f"no object for file {file_id}") from None
            if _status(exc) == 416:
                return io.BytesIO(b"")  # a range starting at the end of the object
            raise unavailable(f"read file {file_id}", exc) from None
        except _TRANSPORT_ERRORS as exc:
            raise unavailable(f"read file {file_id}", exc) from None
        return S3Reader(answer["Body"], file_id)

    def stat(self, file_id: int) -> StoredStat | None:
        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=self.key_for(file_id))
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                return None
            raise unavailable(f"look at file {file_id}", exc) from None
        except _TRANSPORT_ERRORS as exc:
            raise unavailable(f"look at file {file_id}", exc) from None
        return StoredStat(int(answer["ContentLength"]), answer["LastModified"].timestamp())

    def delete(self, file_id: int) -> bool:
        # DeleteObject succeeds whether or not the key existed: look first to answer the question.
        if self.stat(file_id) is None:
            return False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key_for(file_id))
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                return False
            raise unavailable(f"delete file {file_id}", exc) from None
        except _TRANSPORT_ERRORS as exc:
            raise unavailable(f"delete file {file_id}", exc) from None
        return True

    def copy_in(self, file_id: int, bucket: str, key: str) -> None:
        """Server-side copy of ``bucket``/``key`` (on this endpoint) to ``file_id``, write-once.

        Up to 5 GiB (S3's CopyObject limit). ``FileNotFoundError`` when the source is gone,
        ``AlreadyExists`` when the id is taken. The caller verifies the copy before recording it.
        """
        try:
            self.client.copy_object(Bucket=self.bucket, Key=self.key_for(file_id),
                                    CopySource={"Bucket": bucket, "Key": key}, IfNoneMatch="*",
                                    MetadataDirective="REPLACE", ContentType="application/octet-stream")
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                raise FileNotFoundError(f"no object {key!r} in bucket {bucket!r}") from None
            if _lost_race(exc):
                raise AlreadyExists(file_id) from None
            raise unavailable(f"copy {key!r} into file {file_id}", exc) from None
        except _TRANSPORT_ERRORS as exc:
            raise unavailable(f"copy {key!r} into file {file_id}", exc) from None

    def presigned_url(self, file_id: int, expires_seconds: int, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self.key_for(file_id),
                  # Never let a browser sniff stored bytes into something executable.
                  "ResponseContentType": "application/octet-stream"}
        if filename:
            safe = "".join(ch for ch in str(filename) if ch.isprintable() and ch not in '"\\/;')[:200]
            params["ResponseContentDisposition"] = f'attachment; filename="{safe or "download"}"'
        return self.presign_client.generate_presigned_url("get_object", Params=params,
                                                          ExpiresIn=int(expires_seconds))

    def sweep_uploads(self, older_than_seconds: float) -> int:
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=older_than_seconds)
        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for upload in page.get("Uploads") or []:
                    if upload["Initiated"] < cutoff:
                        self._abort(upload["Key"], upload["UploadId"])
                        aborted += 1
        except botocore.exceptions.ClientError as exc:
            raise unavailable("list unfinished uploads", exc) from None
        except _TRANSPORT_ERRORS as exc:
            raise unavailable("list unfinished uploads", exc) from None
        return aborted

    def open_uploads(self) -> list[dict]:
        """The multipart uploads open under the prefix (for checks and tests)."""
        answer = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        return list(answer.get("Uploads") or [])

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except botocore.exceptions.ClientError as exc:
            if not is_missing(exc) and _code(exc) != "NoSuchUpload":
                logger.warning("aborting upload %s of %s failed: %s", upload_id, key, exc)
        except _TRANSPORT_ERRORS as exc:
            # The sweep aborts it later.
            logger.warning("aborting upload %s of %s failed: %s", upload_id, key, exc)


class S3Reader(io.RawIOBase):
    """A GetObject body as a plain stream; transport failures become ``OSError`` (the archive's
    word for "the bytes could not be read")."""

    def __init__(self, body, file_id: int):
        self._body = body
        self._file_id = file_id

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._body.read(None if size is None or size < 0 else size)
        except Exception as exc:  # noqa: BLE001 - urllib3 and botocore raise many kinds
            raise OSError(f"reading file {self._file_id} from S3 failed ({type(exc).__name__})") from None

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - closing a dropped connection
                logger.debug("closing an S3 body failed", exc_info=True)
        super().close()


class S3Upload(Upload):
    """A multipart upload fed from part-sized buffers; PutObject when it fits one part.

    At most ``upload_concurrency`` parts are in flight and one is being filled; their
    buffers are reused from part to part, so an upload holds a fixed amount of memory
    and the allocator is not asked for (and does not keep) a fresh 8 MiB per part.
    """

    def __init__(self, storage: S3Storage, file_id: int):
        super().__init__(file_id)
        self._storage = storage
        self._client = storage.client
        self._key = storage.key_for(file_id)
        self._part_size = storage.part_size
        self._current: bytearray | None = None
        self._filled = 0
        self._spare: list[bytearray] = []
        self._upload_id: str | None = None
        self._parts: dict[int, str] = {}
        self._pending: list[concurrent.futures.Future] = []

    def write(self, data: bytes) -> None:
        if self.finished:
            raise ValueError("upload already finished")
        view = memoryview(data)
        self.bytes_written += len(view)
        while view:
            if self._current is None:
                self._current = self._spare.pop() if self._spare else bytearray(self._part_size)
                self._filled = 0
            count = min(self._part_size - self._filled, len(view))
            self._current[self._filled:self._filled + count] = view[:count]
            self._filled += count
            view = view[count:]
            if self._filled == self._part_size:
                part, self._current = self._current, None
                self._send(part)

    def commit(self) -> None:
        if self.finished:
            raise ValueError("upload already finished")
        try:
            if self._upload_id is None:
                # It fits one part: one conditional PutObject, nothing to clean up after.
                self._client.put_object(Bucket=self._storage.bucket, Key=self._key, Body=self._rest(),
                                        IfNoneMatch="*", ContentType="application/octet-stream")
            else:
                if self._current is not None and self._filled:
                    self._send(self._rest())
                self._wait(0)
                parts = [{"PartNumber": number, "ETag": etag} for number, etag in sorted(self._parts.items())]
                self._client.complete_multipart_upload(
                    Bucket=self._storage.bucket, Key=self._key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except botocore.exceptions.ClientError as exc:
            self.abort()
            if _lost_race(exc):
                raise AlreadyExists(self.file_id) from None
            raise unavailable(f"store file {self.file_id}", exc) from None
        except _TRANSPORT_ERRORS as exc:
            self.abort()
            raise unavailable(f"store file {self.file_id}", exc) from None
        except BaseException:
            self.abort()
            raise
        self.finished = True
        self._release()

    def abort(self) -> None:
        self.finished = True
        for future in self._pending:
            future.cancel()
        # Parts already uploading finish first: an abort racing them could leave a part behind.
        concurrent.futures.wait(self._pending)
        self._pending = []
        self._release()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            self._storage._abort(self._key, upload_id)

    # -- parts ------------------------------------------------------------------------

    def _rest(self) -> bytes:
        """The bytes of the part being filled (the last, short one)."""
        if self._current is None:
            return b""
        return bytes(memoryview(self._current)[:self._filled])

    def _release(self) -> None:
        self._current, self._filled, self._spare = None, 0, []

    def _send(self, part: bytearray | bytes) -> None:
        try:
            if self._upload_id is None:
                answer = self._client.create_multipart_upload(Bucket=self._storage.bucket, Key=self._key,
                                                              ContentType="application/octet-stream")
                self._upload_id = answer["UploadId"]
            # Bounded memory: wait for a slot before another part leaves the buffer.
            self._wait(self._storage.upload_concurrency - 1)
        except botocore.exceptions.ClientError as exc:
            self.abort()
            raise unavailable(f"store file {self.file_id}", exc) from None
        except _TRANSPORT_ERRORS as exc:
            self.abort()
            raise unavailable(f"store file {self.file_id}", exc) from None
        number = len(self._parts) + len(self._pending) + 1
        self._pending.append(self._storage.executor().submit(self._upload_part, number, part))

    def _upload_part(self, number: int, part: bytearray | bytes) -> tuple[int, str, bytearray | bytes]:
        answer = self._client.upload_part(Bucket=self._storage.bucket, Key=self._key, UploadId=self._upload_id,
                                          PartNumber=number, Body=part)
        return number, answer["ETag"], part

    def _wait(self, at_most_pending: int) -> None:
        """Collect finished parts until no more than ``at_most_pending`` are in flight; raises a part's error."""
        while len(self._pending) > at_most_pending:
            done, _ = concurrent.futures.wait(self._pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                self._pending.remove(future)
                number, etag, part = future.result()
                self._parts[number] = etag
                if isinstance(part, bytearray) and len(part) == self._part_size:
                    self._spare.append(part)
