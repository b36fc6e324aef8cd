"""The ingest benchmark's own pieces: case names, the bundles it writes, the limit it measures."""
import argparse
import hashlib

import pytest

from common import bundles
from tests.bench import ingest as bench


@pytest.mark.parametrize("text, count, size, label", [
    ("1x1G", 1, 1024 ** 3, "1x1G"), ("1000x64K", 1000, 65536, "1000x64K"), ("10_000x4k", 10000, 4096, "10000x4K"),
    ("3x5", 3, 5, "3x5"), ("2X10MiB", 2, 10 * 1024 ** 2, "2x10M")])
def test_cases_are_n_x_size(text, count, size, label):
    case = bench.parse_case(text)
    assert (case.count, case.size, case.label) == (count, size, label)


@pytest.mark.parametrize("text", ["", "x4K", "0x4K", "10x", "10x4T", "ten x 4K"])
def test_a_bad_case_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_case(text)


def test_targets_follow_the_issue():
    assert bench.parse_case("10000x4K").ratio_target() == 0.6
    assert bench.parse_case("1000x64K").ratio_target() == 0.6
    assert bench.parse_case("1x1G").ratio_target() == 0.8
    assert bench.parse_case("10x4K").ratio_target() is None


def test_the_bundle_is_one_the_ingest_accepts_and_the_limit_verifies(tmp_path):
    case = bench.parse_case("30x3000")
    path = bench.write_bundle(case, tmp_path / "b.tar")
    tar, members = bundles.read_index(path)
    with tar:
        index = bundles.classify(members)
        manifest = bundles.parse_manifest(bundles.read_metadata(tar, index.metadata, 1 << 20))
        pairs = bundles.match_payload(manifest, index, reject_undeclared=True)
        assert len(pairs) == 30
        for declared, member in pairs:
            assert hashlib.sha1(tar.extractfile(member).read()).hexdigest() == declared.hashsum
    # Every file differs (nothing downstream can take a shortcut on repeated bytes).
    assert len({declared.hashsum for declared, _ in pairs}) == 30

    result = bench.limit_run(path, tmp_path / "limit", sync_batch=7)
    assert (result["files"], result["bytes"], result["hash_mismatches"]) == (30, 30 * 3000, 0)
    assert len(list((tmp_path / "limit").rglob("*/*"))) == 30


def test_payload_is_generated_in_chunks_of_the_right_size():
    for size in (0, 5, 16, 4096, 5 * bench.MIB + 3):
        assert sum(len(chunk) for chunk in bench.payload_chunks(7, size)) == size
