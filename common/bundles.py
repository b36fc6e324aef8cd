"""Bundles: an uncompressed tar with ``metadata.txt`` at the top and the payload under ``data/``.

Nothing here extracts to disk. ``read_index`` lists the members (the ``open tar``
step), ``classify`` checks every member and finds ``metadata.txt``,
``read_metadata``/``parse_manifest`` turn it into the files the client declared
(the ``load metadata`` step), and ``match_payload`` pairs each declared file with
its member before any byte moves (the ``ingest files`` step). ``write_bundle``
makes bundles for the command line and the tests.
"""
from __future__ import annotations

import datetime
import io
import json
import mimetypes
import os
import tarfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from common.errors import LabvaultError
from common.hashing import (
    DEFAULT_HASH_TYPE,
    hash_file,
    normalise_hashsum,
    normalise_hashtype,
)

METADATA_NAME = "metadata.txt"
DATA_DIR = "data"
DEFAULT_MAX_MEMBERS = 1_000_000


class BundleError(LabvaultError):
    """A bundle that cannot be ingested; ``code`` says why."""

    status = 400
    code = "invalid_bundle"


# -- names ------------------------------------------------------------------

def payload_key(path: str) -> str:
    """The key a payload path is matched by: ``data//a/b``, ``data/a/b/``, ``./data/a/b``, ``a/b`` -> ``a/b``.

    Empty and ``.`` parts and one leading ``data`` part are dropped; the result is
    Unicode NFC so a name written by a decomposing file system still matches.
    """
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if parts and parts[0] == DATA_DIR:
        parts = parts[1:]
    return unicodedata.normalize("NFC", "/".join(parts))


def declared_key(subdir: str, name: str) -> str:
    return payload_key(f"{subdir}/{name}")


def _unsafe_reason(name: str) -> str | None:
    if not name:
        return "has an empty name"
    if name.startswith("/"):
        return "has an absolute path"
    if "\\" in name:
        return "has a backslash in its name"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "has a control character in its name"
    if ".." in name.split("/"):
        return "has a '..' path component"
    return None


def _show(name: str) -> str:
    """A member name made safe for a one-line message."""
    return repr(name[:200])


# -- open tar ---------------------------------------------------------------

def read_index(path: str | os.PathLike, max_members: int = DEFAULT_MAX_MEMBERS) -> tuple[tarfile.TarFile, list[tarfile.TarInfo]]:
    """Open ``path`` as an uncompressed tar and read every member header (code ``bad_tar``).

    The caller owns (and closes) the returned TarFile.
    """
    size = os.path.getsize(path)
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise BundleError(f"not a readable uncompressed tar ({_tar_reason(exc)})", code="bad_tar") from None
    try:
        members = []
        for info in tar:
            members.append(info)
            if len(members) > max_members:
                raise BundleError(f"more than {max_members} members", code="too_many_members")
            if info.isreg() and info.offset_data + info.size > size:
                raise BundleError(f"truncated tar: member {_show(info.name)} runs past the end", code="bad_tar")
        _check_end(tar, path, members)
    except BundleError:
        tar.close()
        raise
    except (tarfile.TarError, OSError, ValueError, UnicodeError) as exc:
        tar.close()
        raise BundleError(f"not a readable uncompressed tar ({_tar_reason(exc)})", code="bad_tar") from None
    return tar, members


def _check_end(tar: tarfile.TarFile, path: str | os.PathLike, members: list[tarfile.TarInfo]) -> None:
    """The member list must end at the end-of-archive marker (a zero block).

    tarfile stops quietly at a header cut short or at garbage after the first member,
    so without this a bundle truncated between two members would look whole.
    """
    with open(path, "rb") as handle:
        handle.seek(tar.offset)
        block = handle.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(tarfile.NUL):
        return
    after = f" after member {_show(members[-1].name)}" if members else ""
    if len(block) < tarfile.BLOCKSIZE:
        raise BundleError(f"truncated tar: the archive ends{after} without its end-of-archive marker",
                          code="bad_tar")
    raise BundleError(f"not a readable uncompressed tar (an unreadable header{after})", code="bad_tar")


# The first bytes of the compressed forms people send instead of a plain tar.
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"(\xb5/\xfd": "zstd"}


def compression_of(path: str | os.PathLike) -> str | None:
    """The compression a file's first bytes show (``gzip``, ``bzip2``, ``xz``, ``zstd``), or None."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    return next((name for magic, name in COMPRESSION_MAGIC.items() if head.startswith(magic)), None)


def _tar_reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        # str() of an OSError names the file: a server path never goes into a message.
        return exc.strerror or type(exc).__name__
    return str(exc).splitlines()[0][:120] or type(exc).__name__


# -- load metadata ----------------------------------------------------------

@dataclass
class BundleIndex:
    """The checked member index: ``metadata.txt`` and the payload by key."""

    metadata: tarfile.TarInfo
    payload: dict[str, tarfile.TarInfo] = field(default_factory=dict)


def classify(members: Iterable[tarfile.TarInfo]) -> BundleIndex:
    """Check every member; find ``metadata.txt``; index payload files by key (built once)."""
    metadata = None
    payload: dict[str, tarfile.TarInfo] = {}
    for info in members:
        name = info.name
        reason = _unsafe_reason(name)
        if reason:
            raise BundleError(f"member {_show(name)} {reason}", code="unsafe_member")
        if info.isdir():
            continue
        if info.issym() or info.islnk():
            raise BundleError(f"member {_show(name)} is a link", code="unsafe_member")
        if not info.isreg() or info.issparse():
            raise BundleError(f"member {_show(name)} is not a regular file", code="unsafe_member")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if parts == [METADATA_NAME]:
            if metadata is not None:
                raise BundleError(f"more than one {METADATA_NAME}", code="duplicate_metadata")
            metadata = info
            continue
        if len(parts) < 2 or parts[0] != DATA_DIR:
            raise BundleError(f"member {_show(name)} is outside {DATA_DIR}/", code="member_outside_data")
        key = payload_key(name)
        if key in payload:
            raise BundleError(f"member {_show(name)} appears more than once", code="duplicate_member")
        payload[key] = info
    if metadata is None:
        raise BundleError(f"no {METADATA_NAME} at the top of the bundle", code="missing_metadata")
    return BundleIndex(metadata, payload)


def read_metadata(tar: tarfile.TarFile, member: tarfile.TarInfo, max_bytes: int) -> list[dict]:
    """Read and decode ``metadata.txt`` (a JSON list of objects) without extracting it."""
    if member.size > max_bytes:
        raise BundleError(f"{METADATA_NAME} is {member.size} bytes, more than the limit of {max_bytes}",
                          code="metadata_too_large")
    handle = tar.extractfile(member)
    raw = handle.read() if handle else b""
    return decode_metadata(raw)


def decode_metadata(raw: bytes) -> list[dict]:
    try:
        document = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise BundleError(f"{METADATA_NAME} is not UTF-8", code="invalid_metadata") from None
    except ValueError as exc:
        raise BundleError(f"{METADATA_NAME} is not valid JSON: {exc}", code="invalid_metadata") from None
    return check_document(document)


def check_document(document) -> list[dict]:
    if not isinstance(document, list) or not all(isinstance(entry, dict) for entry in document):
        raise BundleError(f"{METADATA_NAME} must be a JSON list of objects", code="invalid_metadata")
    return document


@dataclass
class DeclaredFile:
    """One ``Files`` entry of the metadata, checked."""

    position: int          # index of the entry in the metadata list
    key: str               # payload key (see payload_key)
    size: int
    hashtype: str
    hashsum: str
    source: str | None = None  # server-local path, for /move


@dataclass
class Manifest:
    document: list[dict]
    files: list[DeclaredFile]

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.files)


def parse_manifest(document: list[dict], with_source: bool = False) -> Manifest:
    """Check every ``Files`` entry (name, size, hash type and sum); other tables pass through."""
    files: list[DeclaredFile] = []
    seen: dict[str, int] = {}
    for position, entry in enumerate(document):
        if entry.get("destinationTable") != "Files":
            continue
        label = f"Files entry {len(files) + 1}"
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip("/ "):
            raise BundleError(f"{label} has no name", code="invalid_metadata")
        subdir = entry.get("subdir") or ""
        if not isinstance(subdir, str):
            raise BundleError(f"{label} ({name[:80]}) has a subdir that is not a string", code="invalid_metadata")
        path = f"{subdir}/{name}"
        reason = _unsafe_reason(path.lstrip("/"))
        if reason and reason != "has an absolute path":
            raise BundleError(f"{label} ({name[:80]}) {reason}", code="invalid_metadata")
        key = declared_key(subdir, name)
        if key in seen:
            raise BundleError(f"{label} ({key[:120]}) is declared twice", code="duplicate_file")
        seen[key] = position
        size = entry.get("size")
        if isinstance(size, str) and size.strip().isdigit():
            size = int(size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BundleError(f"{label} ({key[:120]}) has no valid size", code="invalid_metadata")
        try:
            hashtype = normalise_hashtype(entry.get("hashtype") or DEFAULT_HASH_TYPE)
            hashsum = normalise_hashsum(entry.get("hashsum"), hashtype)
        except LabvaultError as exc:
            raise BundleError(f"{label} ({key[:120]}): {exc.message}", code=exc.code) from None
        source = None
        if with_source:
            source = entry.get("source")
            if not isinstance(source, str) or not source:
                raise BundleError(f"{label} ({key[:120]}) has no source path", code="invalid_metadata")
        files.append(DeclaredFile(position, key, size, hashtype, hashsum, source))
    return Manifest(document, files)


# -- ingest files -----------------------------------------------------------

def match_payload(manifest: Manifest, index: BundleIndex,
                  reject_undeclared: bool = False) -> list[tuple[DeclaredFile, tarfile.TarInfo]]:
    """Pair each declared file with its member; every missing file or wrong size fails first."""
    pairs = []
    for declared in manifest.files:
        member = index.payload.get(declared.key)
        if member is None:
            raise BundleError(f"declared file data/{declared.key[:200]} is not in the bundle", code="file_missing")
        if member.size != declared.size:
            raise BundleError(f"data/{declared.key[:200]} is {member.size} bytes, metadata says {declared.size}",
                              code="size_mismatch")
        pairs.append((declared, member))
    if reject_undeclared:
        declared_keys = {item.key for item in manifest.files}
        extra = sorted(set(index.payload) - declared_keys)
        if extra:
            raise BundleError(f"{len(extra)} member(s) not declared in {METADATA_NAME}, first data/{extra[0][:200]}",
                              code="undeclared_member")
    return pairs


# -- making bundles ---------------------------------------------------------

def build_metadata(submitter, project, instrument, files: list[dict],
                   keys: dict[str, str] | None = None) -> list[dict]:
    """A metadata list in the Pacifica shape for ``files`` (dicts with name, subdir, size, ...)."""
    document: list[dict] = [
        {"destinationTable": "Transactions.submitter", "value": submitter},
        {"destinationTable": "Transactions.project", "value": str(project)},
        {"destinationTable": "Transactions.instrument", "value": instrument},
    ]
    for key, value in (keys or {}).items():
        document.append({"destinationTable": "TransactionKeyValue", "key": key, "value": value})
    document.extend({"destinationTable": "Files", **item} for item in files)
    return document


def describe_tree(root: Path, hashtype: str = DEFAULT_HASH_TYPE) -> list[tuple[Path, dict]]:
    """Every regular file under ``root`` with its Files entry (hash computed by streaming)."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root)
        stat = path.stat()
        entries.append((path, {
            "name": rel.name,
            "subdir": "/".join(rel.parts[:-1]),
            "size": stat.st_size,
            "hashtype": hashtype,
            "hashsum": hash_file(path, hashtype),
            "mimetype": mimetypes.guess_type(rel.name)[0] or "application/octet-stream",
            "mtime": _iso(stat.st_mtime),
            "ctime": _iso(stat.st_ctime),
        }))
    return entries


def write_bundle(out: Path, files: list[tuple[Path, dict]], document: list[dict]) -> None:
    """Write a PAX tar: ``metadata.txt`` first, then each file under ``data/<subdir>/<name>``."""
    tmp = out.with_name(out.name + ".part")
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            raw = json.dumps(document, indent=2, ensure_ascii=False).encode("utf-8")
            info = tarfile.TarInfo(METADATA_NAME)
            info.size = len(raw)
            info.mtime = int(os.path.getmtime(files[0][0])) if files else 0
            tar.addfile(info, io.BytesIO(raw))
            for path, entry in files:
                arcname = "/".join(p for p in (DATA_DIR, entry["subdir"], entry["name"]) if p)
                tar.add(str(path), arcname=arcname, recursive=False)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat()
