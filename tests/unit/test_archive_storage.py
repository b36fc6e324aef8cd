"""PosixStorage's own layout and the backend choice; the behaviour every backend shares is in
tests/integration/test_storage_contract.py."""
from __future__ import annotations

import sys

import pytest

from archive_service.backends import make_storage
from archive_service.storage import PosixStorage, StoredStat
from common.settings import SettingsError
from tests.helpers import REPO, make_settings


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def storage(tmp_path):
    return PosixStorage(tmp_path / "archive")


def store(storage, file_id, data):
    with storage.begin_write(file_id) as upload:
        upload.write(data)
        upload.commit()


def test_commit_publishes_under_a_sharded_path(storage):
    with storage.begin_write(257) as upload:
        upload.write(b"hello ")
        upload.write(b"world")
        assert upload.bytes_written == 11
        assert storage.stat(257) is None  # nothing visible before commit
        upload.commit()
    assert (storage.root / "01" / "257").read_bytes() == b"hello world"
    assert files_under(storage.root) == ["01/257"]  # temp file gone
    stat = storage.stat(257)
    assert isinstance(stat, StoredStat) and stat.size == 11 and stat.mtime > 0


def test_ranged_read_of_a_posix_file_stops_at_the_end_of_the_range(storage):
    store(storage, 5, b"0123456789")
    with storage.open_read(5, 4, 6) as handle:
        assert handle.read() == b"456"
        assert handle.read(10) == b""


def test_make_storage(tmp_path):
    storage = make_storage(make_settings(tmp_path, archive={"backend": "POSIX", "root": str(tmp_path / "r")}))
    assert isinstance(storage, PosixStorage) and storage.root == tmp_path / "r"
    default = make_storage(make_settings(tmp_path))
    assert default.root == tmp_path / "archive"
    with pytest.raises(SettingsError):
        make_storage(make_settings(tmp_path, archive={"backend": "tape"}))


def test_s3_backend_is_chosen_by_settings_and_connects_to_nothing(tmp_path):
    pytest.importorskip("boto3")
    from archive_service.s3 import S3Storage
    settings = make_settings(tmp_path, archive={"backend": "s3", "bucket": "labvault-files", "prefix": "/lv/",
                                                "endpoint_url": "http://127.0.0.1:1", "region": "eu-west-1",
                                                "addressing_style": "path"})
    storage = make_storage(settings)
    assert isinstance(storage, S3Storage) and storage.media == "s3"
    assert storage.key_for(12) == "lv/12"
    for bad in ({"bucket": ""}, {"bucket": "ab"}, {"bucket": "abc", "addressing_style": "sideways"},
                {"bucket": "abc", "part_size": "1024"}):
        with pytest.raises(SettingsError):
            make_storage(make_settings(tmp_path, archive={"backend": "s3", **bad}))


def test_boto3_stays_off_a_posix_start(tmp_path):
    import subprocess
    code = ("import sys; from archive_service.backends import make_storage; from tests.helpers import make_settings; "
            f"make_storage(make_settings(__import__('pathlib').Path({str(tmp_path)!r}))); "
            "import archive_service.app; print('boto3' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.stdout.strip() == "False", result.stderr
