"""Hostile and broken bundles, end to end in both worlds: each ends FAILED at the step DESIGN.md
names, with its own code, and leaves nothing behind (no metadata row, no archive file, no
staged bundle).

Every bundle is uploaded first and the jobs are awaited together (they fail in well under
a second each, but one after the other they would add up).
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import socket
import tarfile
import unicodedata

import pytest
import requests

from tests.helpers import REPO, make_tar, payload_bundle

GOOD = b"good bytes\n"
OTHER = b"other bytes\n"


def files_entry(name: str, raw: bytes, subdir: str = "run", **overrides) -> dict:
    entry = {"destinationTable": "Files", "name": name, "subdir": subdir, "size": len(raw), "hashtype": "sha1",
             "hashsum": hashlib.sha1(raw).hexdigest(), "mimetype": "application/octet-stream"}
    entry.update(overrides)
    return entry


def document(*files: dict) -> bytes:
    parties = [{"destinationTable": "Transactions.submitter", "value": 10},
               {"destinationTable": "Transactions.project", "value": "1234a"},
               {"destinationTable": "Transactions.instrument", "value": 54}]
    return json.dumps(parties + list(files)).encode()


METADATA = document(files_entry("a.txt", GOOD))
GOOD_BUNDLE = make_tar([("metadata.txt", METADATA), ("data/run/a.txt", GOOD)])


def with_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", raw: bytes = b"") -> bytes:
    """The good bundle plus one more member of ``kind``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member_name, content in (("metadata.txt", METADATA), ("data/run/a.txt", GOOD)):
            info = tarfile.TarInfo(member_name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.size = len(raw) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(raw) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def members_of(raw: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmembers()


def cut_after_member(raw: bytes, name: str) -> bytes:
    """``raw`` cut right after the data of member ``name``: whole members, no end-of-archive marker."""
    member = next(m for m in members_of(raw) if m.name == name)
    return raw[:member.offset_data + -(-member.size // 512) * 512]


NFC = unicodedata.normalize("NFC", "data/run/é.txt")
NFD = unicodedata.normalize("NFD", NFC)
TWO_FILES = make_tar([("metadata.txt", document(files_entry("a.txt", GOOD), files_entry("b.txt", OTHER))),
                      ("data/run/a.txt", GOOD), ("data/run/b.txt", OTHER)])

# case id -> (bundle or a function making it, step, code)
CASES = {
    "not-a-tar": (b"this is no tar, only text\n" * 200, "open tar", "bad_tar"),
    "empty-body": (b"", "open tar", "bad_tar"),
    "truncated-in-data": (TWO_FILES[:members_of(TWO_FILES)[2].offset_data + 5], "open tar", "bad_tar"),
    "truncated-between-members": (cut_after_member(TWO_FILES, "data/run/a.txt"), "open tar", "bad_tar"),
    "garbage-after-members": (cut_after_member(TWO_FILES, "data/run/b.txt") + b"\x7fELF" * 256,
                              "open tar", "bad_tar"),
    "gzip": (gzip.compress(GOOD_BUNDLE), "open tar", "bad_tar"),
    "bzip2": (bz2.compress(GOOD_BUNDLE), "open tar", "bad_tar"),
    "xz": (lzma.compress(GOOD_BUNDLE), "open tar", "bad_tar"),
    "missing-metadata": (make_tar([("data/run/a.txt", GOOD)]), "load metadata", "missing_metadata"),
    "duplicate-metadata": (make_tar([("metadata.txt", METADATA), ("data/run/a.txt", GOOD), ("metadata.txt", METADATA)]),
                           "load metadata", "duplicate_metadata"),
    "metadata-not-a-list": (make_tar([("metadata.txt", b'{"destinationTable": "Files"}'), ("data/run/a.txt", GOOD)]),
                            "load metadata", "invalid_metadata"),
    "metadata-not-json": (make_tar([("metadata.txt", b"[{,]"), ("data/run/a.txt", GOOD)]),
                          "load metadata", "invalid_metadata"),
    # One byte over the default [ingest] max_metadata_bytes (16 MiB): refused before it is read.
    # (Built when uploaded, not at import.)
    "metadata-too-large": (lambda: make_tar([("metadata.txt", METADATA[:-1] + b" " * (16 * 1024 * 1024 + 1 - len(METADATA))
                                              + b"]"), ("data/run/a.txt", GOOD)]),
                           "load metadata", "metadata_too_large"),
    "absolute-path": (with_member("/data/run/x", raw=b"x"), "load metadata", "unsafe_member"),
    "dot-dot": (with_member("data/../../etc/x", raw=b"x"), "load metadata", "unsafe_member"),
    "backslash": (with_member("data\\run\\x", raw=b"x"), "load metadata", "unsafe_member"),
    "control-character": (with_member("data/run/x\x1b[2J", raw=b"x"), "load metadata", "unsafe_member"),
    "symlink": (with_member("data/run/link", tarfile.SYMTYPE, "/etc/passwd"), "load metadata", "unsafe_member"),
    "hardlink": (with_member("data/run/hard", tarfile.LNKTYPE, "metadata.txt"), "load metadata", "unsafe_member"),
    "char-device": (with_member("data/run/tty", tarfile.CHRTYPE), "load metadata", "unsafe_member"),
    "block-device": (with_member("data/run/disk", tarfile.BLKTYPE), "load metadata", "unsafe_member"),
    "fifo": (with_member("data/run/pipe", tarfile.FIFOTYPE), "load metadata", "unsafe_member"),
    "duplicate-member": (with_member("data/run/a.txt", raw=OTHER), "load metadata", "duplicate_member"),
    "duplicate-member-spelling": (with_member("data//run/./a.txt", raw=OTHER), "load metadata", "duplicate_member"),
    "duplicate-member-nfc-nfd": (make_tar([("metadata.txt", document(files_entry("é.txt", GOOD))), (NFC, GOOD),
                                           (NFD, OTHER)]), "load metadata", "duplicate_member"),
    "outside-data": (with_member("elsewhere/x", raw=b"x"), "load metadata", "member_outside_data"),
    "top-level-file": (with_member("notes.txt", raw=b"x"), "load metadata", "member_outside_data"),
    "unsupported-hashtype": (make_tar([("metadata.txt", document(files_entry("a.txt", GOOD, hashtype="crc32"))),
                                       ("data/run/a.txt", GOOD)]), "load metadata", "unsupported_hashtype"),
    "non-hex-hashsum": (make_tar([("metadata.txt", document(files_entry("a.txt", GOOD, hashsum="zz" * 20))),
                                  ("data/run/a.txt", GOOD)]), "load metadata", "invalid_hashsum"),
    "declared-file-missing": (make_tar([("metadata.txt", document(files_entry("a.txt", GOOD),
                                                                  files_entry("ghost.txt", OTHER))),
                                        ("data/run/a.txt", GOOD)]), "ingest files", "file_missing"),
    "declared-size-differs": (make_tar([("metadata.txt", document(files_entry("a.txt", GOOD),
                                                                  files_entry("b.txt", OTHER, size=len(OTHER) + 1))),
                                        ("data/run/a.txt", GOOD), ("data/run/b.txt", OTHER)]),
                              "ingest files", "size_mismatch"),
    "hash-differs": (make_tar([("metadata.txt", document(files_entry("a.txt", GOOD), files_entry("b.txt", OTHER))),
                               ("data/run/a.txt", GOOD), ("data/run/b.txt", OTHER.upper())]),
                     "ingest files", "hash_mismatch"),
}


def archive_files(stack) -> set[str]:
    root = stack.settings.path("archive", "root")
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def staged(stack, job_id: int) -> list[str]:
    folder = stack.settings.path("ingest", "staging_dir")
    return sorted(p.name for p in folder.glob(f"{job_id}.*")) if folder.exists() else []


def metadata_rows(stack, table: str, **filters) -> list[dict]:
    response = requests.get(f"{stack.url('metadata')}/{table}", params=filters, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def assert_clean_text(text: str, stack) -> None:
    """One line, no traceback, no server path."""
    assert "\n" not in text and "Traceback" not in text and 'File "' not in text, text
    for path in (str(stack.data_dir), str(REPO), "site-packages"):
        assert path not in text, text


@pytest.fixture(scope="module")
def hostile_jobs(stack):
    """Upload every case, then wait for all; the archive listing before and after."""
    before = archive_files(stack)
    job_ids = {case: stack.post(raw() if callable(raw) else raw)["job_id"] for case, (raw, _, _) in CASES.items()}
    finals = {case: stack.wait_job(job_id, timeout=120) for case, job_id in job_ids.items()}
    return finals, before, archive_files(stack)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_bundle_fails_at_its_step_with_its_code_and_leaves_nothing(stack, hostile_jobs, case):
    finals, before, after = hostile_jobs
    _, step, code = CASES[case]
    final = finals[case]
    assert (final["state"], final["task"], final["complete"]) == ("FAILED", step, True), final
    assert final["exception"].startswith(f"{code}: "), final
    assert_clean_text(final["exception"], stack)
    job_id = final["job_id"]
    assert metadata_rows(stack, "transactions", _id=job_id) == []
    assert metadata_rows(stack, "files", transaction=job_id) == []
    assert staged(stack, job_id) == []
    # Together, every hostile job added no archive file (and none is half written).
    assert after == before


def test_undeclared_members_are_ignored_by_default(stack):
    raw = make_tar([("metadata.txt", METADATA), ("data/run/a.txt", GOOD), ("data/run/extra.bin", OTHER)])
    final = stack.ingest(raw)
    assert (final["state"], final["task"], final["task_percent"]) == ("OK", "ingest metadata", "100"), final
    rows = metadata_rows(stack, "files", transaction=final["job_id"])
    assert [row["name"] for row in rows] == ["a.txt"]
    assert requests.get(f"{stack.url('archive')}/{rows[0]['_id']}", timeout=10).content == GOOD


def test_declared_length_over_the_limit_is_413_before_the_body_is_read(stack):
    """Through the suite's own servers (CherryPy; uWSGI in production): only the headers are sent."""
    host, port = stack.url("ingest").removeprefix("http://").split(":")
    limit = stack.settings.getint("ingest", "max_bundle_bytes")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {limit + 1}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"413", answer
    assert json.loads(body)["code"] == "payload_too_large"
    # The service is still there for the next client.
    assert stack.ingest(payload_bundle({"after-413/ok.txt": b"ok\n"}))["state"] == "OK"
