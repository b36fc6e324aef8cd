"""Computed files: deterministic zip packages of a project's (or a sample's) files.

A package holds the data files laid out ``<sample>/<subdir>/<name>``, a ``metadata.tsv``
with one row per file, a ``README.md`` and a ``MANIFEST.sha256`` that ``sha256sum -c``
checks. Identical inputs give a byte-identical zip, so its digest can serve as a cache
validator. Data members stream from their source (an archive response is fine) and are
hashed on the way through, so a 10 GiB member never sits in memory. Pure domain code: no
HTTP, no Celery, no database.
"""
from __future__ import annotations

import hashlib
import re
import string
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from common.errors import Conflict

# Part of the cache key of a computed file: bump it whenever the README text changes.
TEMPLATE_VERSION = "2"

MANIFEST_NAME = "MANIFEST.sha256"
CHUNK_SIZE = 1024 * 1024
# Members larger than this get ZIP64 headers up front: the size is known before the bytes
# stream, and ``zipfile`` cannot widen a header it has already written.
ZIP64_THRESHOLD = 2 ** 31
# Fixed header fields: nothing about the machine or the moment of the build enters the zip.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
FIXED_EXTERNAL_ATTR = 0o644 << 16
FIXED_CREATE_SYSTEM = 3  # Unix, whatever the building host, so permissions read the same.
DEFLATE_LEVEL = 6

# Error codes (on PackageError).
INPUT_CORRUPT = "input_corrupt"
UNSAFE_MEMBER = "unsafe_member"
DUPLICATE_MEMBER = "duplicate_member"

FIXED_COLUMNS = ("project", "sample", "transaction", "submitter", "instrument", "path", "size",
                 "hashtype", "hashsum", "sha256", "mimetype")
NA = "NA"

# Kinds of package the README describes.
KIND_PROJECT, KIND_SAMPLE, KIND_METADATA, KIND_MERGED = "project", "sample", "metadata", "merged"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class PackageError(Conflict):
    """A package cannot be built from its inputs: a corrupt source or an unsafe member name.

    The message names the member path inside the package, never a server path."""

    code = INPUT_CORRUPT


@dataclass(frozen=True)
class Member:
    """A data member: ``open()`` gives its bytes (a non-seekable stream is fine); when ``sha256``
    is given the bytes must hash to it."""

    name: str
    size: int
    open: Callable[[], BinaryIO]
    sha256: str | None = None


def safe_member_name(name: str) -> str:
    """``name`` as a zip member path (``//`` and ``./`` collapsed), or PackageError ``unsafe_member``
    for an absolute path, a ``..`` part, a backslash, a control character or an empty name."""
    text = str(name)
    shown = _CONTROL.sub("?", text)[:200]
    if (not text or text.startswith("/") or "\\" in text or _CONTROL.search(text)
            or re.match(r"^[A-Za-z]:", text)):
        raise PackageError(f"unsafe member name {shown!r}", code=UNSAFE_MEMBER)
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise PackageError(f"unsafe member name {shown!r}", code=UNSAFE_MEMBER)
    return "/".join(parts)


def write_zip(target: Path, members: Iterable[Member], extra: dict[str, bytes]) -> list[tuple[str, int, str]]:
    """Write the package to ``target``: byte-identical for identical inputs, ``MANIFEST.sha256`` last.

    Returns ``(name, size, sha256)`` of every member but the manifest. On any error the
    partial ``target`` is removed and the error raised (PackageError for bad inputs)."""
    entries: dict[str, Member | bytes] = {}
    for item in [*members, *extra.items()]:
        name, source = (item.name, item) if isinstance(item, Member) else (item[0], bytes(item[1]))
        safe = safe_member_name(name)
        if safe in entries or safe == MANIFEST_NAME:
            raise PackageError(f"two members are named {_CONTROL.sub('?', safe)[:200]!r}", code=DUPLICATE_MEMBER)
        entries[safe] = source
    target = Path(target)
    written: list[tuple[str, int, str]] = []
    try:
        with zipfile.ZipFile(target, "w", allowZip64=True) as archive:
            for name in sorted(entries):
                source = entries[name]
                if isinstance(source, Member):
                    written.append(_write_member(archive, name, source))
                else:
                    written.append(_write_text(archive, name, source))
            manifest = "".join(f"{digest}  {name}\n" for name, _, digest in written)
            _write_text(archive, MANIFEST_NAME, manifest.encode("utf-8"))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return written


def _info(name: str, compress_type: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE_TIME)
    info.external_attr = FIXED_EXTERNAL_ATTR
    info.create_system = FIXED_CREATE_SYSTEM
    info.compress_type = compress_type
    return info


def _write_text(archive: zipfile.ZipFile, name: str, data: bytes) -> tuple[str, int, str]:
    archive.writestr(_info(name, zipfile.ZIP_DEFLATED), data, compresslevel=DEFLATE_LEVEL)
    return name, len(data), hashlib.sha256(data).hexdigest()


def _write_member(archive: zipfile.ZipFile, name: str, member: Member) -> tuple[str, int, str]:
    # Stored, not deflated: data files are mostly compressed already, and a stored member
    # streams with no compressor state to vary between zlib builds.
    info = _info(name, zipfile.ZIP_STORED)
    info.file_size = member.size
    digest = hashlib.sha256()
    count = 0
    stream = member.open()
    try:
        with archive.open(info, "w", force_zip64=member.size > ZIP64_THRESHOLD) as out:
            while True:
                chunk = stream.read(CHUNK_SIZE)
                if not chunk:
                    break
                count += len(chunk)
                # Stop at the first byte too many: the zip64 decision was taken on the size.
                if count > member.size:
                    raise PackageError(f"{name}: more bytes than its recorded size {member.size}")
                digest.update(chunk)
                out.write(chunk)
    finally:
        close = getattr(stream, "close", None)
        if callable(close):
            close()
    if count != member.size:
        raise PackageError(f"{name}: {count} bytes, its recorded size is {member.size}")
    if member.sha256 is not None and digest.hexdigest() != member.sha256.strip().lower():
        raise PackageError(f"{name}: its bytes do not match its recorded sha256")
    return name, count, digest.hexdigest()


def _cell(value: object) -> str:
    if value is None:
        return NA
    if isinstance(value, (list, tuple)):
        value = ";".join(_cell(item) for item in value if item is not None and str(item) != "")
    # A tab or line break inside a value would shift every column after it.
    text = re.sub(r"[\t\r\n]", " ", str(value))
    return text if text != "" else NA


def _transaction_order(text: str) -> tuple[int, int, str]:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def metadata_tsv(rows: Iterable[dict]) -> bytes:
    """One tab-separated row per file: the fixed columns, then each ``keys`` key (sorted); ``NA``
    for a missing value, lists joined with ``;``; rows by sample, path, transaction."""
    rows = list(rows)
    key_names = sorted({_cell(key) for row in rows for key in (row.get("keys") or {})})
    # A key named like a fixed column would give two columns one name; keep both apart.
    key_columns = [(key, f"key_{key}" if key in FIXED_COLUMNS else key) for key in key_names]
    table = []
    for row in rows:
        keys = {_cell(key): value for key, value in (row.get("keys") or {}).items()}
        cells = [_cell(row.get(column)) for column in FIXED_COLUMNS]
        cells += [_cell(keys.get(key)) for key, _ in key_columns]
        table.append(cells)
    sample, path, transaction = (FIXED_COLUMNS.index(column) for column in ("sample", "path", "transaction"))
    table.sort(key=lambda cells: (cells[sample], cells[path], _transaction_order(cells[transaction]), cells))
    header = [*FIXED_COLUMNS, *(column for _, column in key_columns)]
    return "".join("\t".join(cells) + "\n" for cells in [header, *table]).encode("utf-8")


def sample_layout(sample: str | None, subdir: str, name: str) -> str:
    """``<sample>/<subdir>/<name>`` with empty parts dropped and each part safe; no sample: ``NA``."""
    # A sample name is one directory, whatever it contains.
    sample_part = _safe_part(str(sample or "").replace("/", "_").replace("\\", "_")) or NA
    parts = [sample_part]
    for piece in (subdir, name):
        parts += [_safe_part(part) for part in str(piece or "").replace("\\", "/").split("/")]
    return "/".join(part for part in parts if part)


def unique_names(files: Iterable[tuple[str, int, int]]) -> dict[int, str]:
    """Member names for files given as ``(laid-out name, transaction, file id)``, by file id.

    A name several files share (the same path uploaded again, or sample names that read the
    same once made safe) stays with the newest of them (highest transaction, then file id);
    each other one gets ``.file-<id>`` before its extension (``run1/a.file-7.txt``). The same
    inputs give the same names."""
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, transaction, file_id in files:
        by_name.setdefault(name, []).append((int(transaction), int(file_id)))
    names: dict[int, str] = {}
    renamed: list[tuple[int, str]] = []
    for name, owners in by_name.items():
        owners.sort()
        names[owners[-1][1]] = name
        renamed += [(file_id, name) for _, file_id in owners[:-1]]
    taken = set(by_name)
    for file_id, name in sorted(renamed):
        candidate, attempt = _with_suffix(name, f".file-{file_id}"), 1
        while candidate in taken:  # a file of that very name exists too
            attempt += 1
            candidate = _with_suffix(name, f".file-{file_id}-{attempt}")
        names[file_id] = candidate
        taken.add(candidate)
    return names


def _with_suffix(name: str, suffix: str) -> str:
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".") if not base.startswith(".") else (base, "", "")
    renamed = f"{stem}{suffix}{dot}{extension}"
    return f"{folder}/{renamed}" if folder else renamed


def _safe_part(part: str) -> str:
    part = _CONTROL.sub("_", part).strip()
    if part == ".":
        return ""
    if set(part) == {"."}:  # "..", "...": never a step up
        return "_" * len(part)
    return part


def human_size(size: int) -> str:
    """``size`` bytes as a short text (``1.5 GiB``)."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_KIND_TEXT = {
    KIND_PROJECT: "every data file of the project",
    KIND_SAMPLE: "the data files of sample $sample",
    KIND_METADATA: "the metadata of every file of the project (no data files)",
    KIND_MERGED: "one merged AnnData file of the project's .h5ad files (cells of all samples)",
}


def citation(context: dict) -> str:
    """The citation line of a package: project title, id and the build date from ``context``."""
    title = _one_line(context.get("project_title")) or _one_line(context.get("project_id"))
    return (f"{title} (labvault project {_one_line(context.get('project_id'))}), "
            f"computed file built {_one_line(context.get('build_date'))}.")


def readme(context: dict) -> bytes:
    """The package's README.md from the template; deterministic: the build date comes from
    ``context`` (keys: project_id, project_title, project_abstract, kind, sample, file_count,
    total_size, build_date)."""
    kind = str(context.get("kind") or KIND_PROJECT)
    sample = _one_line(context.get("sample")) or NA
    values = {
        "project_id": _one_line(context.get("project_id")),
        "project_title": _one_line(context.get("project_title")) or _one_line(context.get("project_id")),
        "project_abstract": str(context.get("project_abstract") or "No abstract was given.").strip(),
        "kind": kind if kind != KIND_SAMPLE else f"sample {sample}",
        "kind_text": string.Template(_KIND_TEXT.get(kind, kind)).safe_substitute(sample=sample),
        "sample": sample,
        "file_count": str(int(context.get("file_count") or 0)),
        "total_size": human_size(int(context.get("total_size") or 0)),
        "build_date": _one_line(context.get("build_date")),
        "citation": citation(context),
        "columns": ", ".join(f"`{column}`" for column in FIXED_COLUMNS),
        "manifest": MANIFEST_NAME,
        "template_version": TEMPLATE_VERSION,
    }
    template = resources.files("stats_service").joinpath("templates/computed_file_README.md")
    text = string.Template(template.read_text(encoding="utf-8")).safe_substitute(values)
    return text.encode("utf-8")


def _one_line(value: object) -> str:
    return " ".join(str(value or "").split())
