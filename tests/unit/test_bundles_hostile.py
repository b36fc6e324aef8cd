"""Hostile tars that tarfile reads without complaint: cut between two members, garbage where
the end-of-archive marker belongs, special members; and reasons that name no server path."""
from __future__ import annotations

import io
import tarfile

import pytest

from common import bundles
from common.bundles import BundleError
from tests.helpers import make_tar

RAW = make_tar([("metadata.txt", b"[]"), ("data/x", b"x" * 1000), ("data/y", b"y" * 1000)])


def offsets(raw: bytes) -> dict[str, tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name: (m.offset, m.offset_data + -(-m.size // 512) * 512) for m in tar}


def read(tmp_path, raw: bytes):
    path = tmp_path / "b.tar"
    path.write_bytes(raw)
    tar, members = bundles.read_index(path)
    tar.close()
    return [m.name for m in members]


@pytest.mark.parametrize("cut", ["after-x", "inside-y-header", "after-y"])
def test_a_tar_cut_at_or_near_a_member_boundary_is_bad_tar(tmp_path, cut):
    where = offsets(RAW)
    end = {"after-x": where["data/x"][1], "inside-y-header": where["data/y"][0] + 100,
           "after-y": where["data/y"][1]}[cut]
    with pytest.raises(BundleError) as caught:
        read(tmp_path, RAW[:end])
    assert caught.value.code == "bad_tar" and "truncated" in caught.value.message


def test_garbage_instead_of_the_end_marker_is_bad_tar(tmp_path):
    with pytest.raises(BundleError) as caught:
        read(tmp_path, RAW[:offsets(RAW)["data/y"][1]] + b"\x7fELF" * 300)
    assert caught.value.code == "bad_tar"


def test_one_zero_block_is_enough_of_an_end(tmp_path):
    end = offsets(RAW)["data/y"][1]
    assert read(tmp_path, RAW[:end + 512]) == ["metadata.txt", "data/x", "data/y"]
    assert read(tmp_path, RAW) == ["metadata.txt", "data/x", "data/y"]


def test_too_many_members(tmp_path):
    path = tmp_path / "many.tar"
    path.write_bytes(make_tar([("metadata.txt", b"[]")] + [(f"data/{n}", b"") for n in range(6)]))
    with pytest.raises(BundleError) as caught:
        bundles.read_index(path, max_members=5)
    assert caught.value.code == "too_many_members"


def test_block_devices_are_unsafe():
    device = tarfile.TarInfo("data/disk")
    device.type = tarfile.BLKTYPE
    with pytest.raises(BundleError) as caught:
        bundles.classify([tarfile.TarInfo("metadata.txt"), device])
    assert caught.value.code == "unsafe_member"


def test_an_unreadable_file_is_bad_tar_without_its_path(tmp_path):
    folder = tmp_path / "secret-server-dir"
    folder.mkdir()
    with pytest.raises(BundleError) as caught:
        bundles.read_index(folder)
    assert caught.value.code == "bad_tar"
    assert str(tmp_path) not in caught.value.message
