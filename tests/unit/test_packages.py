"""Computed-file packages: deterministic zips, a checkable manifest, metadata.tsv and the README."""
from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from stats_service import packages
from stats_service.packages import Member, PackageError, metadata_tsv, readme, sample_layout, write_zip


class OnlyRead:
    """A non-seekable stream, as an HTTP response's raw body: ``read`` and nothing else."""

    def __init__(self, data: bytes):
        self._buffer = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        # Short reads, as a socket gives them.
        return self._buffer.read(min(size, 1000) if size and size > 0 else size)


def member(name: str, data: bytes, sha256: str | None = "auto", size: int | None = None) -> Member:
    digest = hashlib.sha256(data).hexdigest() if sha256 == "auto" else sha256
    return Member(name=name, size=len(data) if size is None else size, open=lambda: OnlyRead(data), sha256=digest)


def sample_members() -> list[Member]:
    return [member("S2/counts/b.h5ad", b"\x89HDF" + bytes(range(256)) * 50),
            member("S1/tables/a.csv", b"gene,count\nA,1\n"),
            member("S1/empty.txt", b"")]


EXTRA = {"metadata.tsv": b"project\tsample\nP1\tS1\n", "README.md": b"# P1\n"}


def test_two_builds_of_the_same_members_are_byte_identical(tmp_path):
    first, second = tmp_path / "one.zip", tmp_path / "two.zip"
    listed = write_zip(first, sample_members(), EXTRA)
    # Given in another order: the zip does not depend on it.
    write_zip(second, list(reversed(sample_members())), dict(reversed(list(EXTRA.items()))))
    assert first.read_bytes() == second.read_bytes()
    names = [name for name, _, _ in listed]
    assert names == sorted(names)
    assert {name for name in names} == {"S2/counts/b.h5ad", "S1/tables/a.csv", "S1/empty.txt",
                                        "metadata.tsv", "README.md"}
    with zipfile.ZipFile(first) as archive:
        infos = archive.infolist()
        assert archive.testzip() is None
    assert [info.filename for info in infos] == names + ["MANIFEST.sha256"]
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.external_attr == 0o644 << 16
        assert info.create_system == 3
        data_member = info.filename.startswith("S")
        assert info.compress_type == (zipfile.ZIP_STORED if data_member else zipfile.ZIP_DEFLATED)


def test_sha256sum_checks_the_unzipped_manifest(tmp_path):
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum on this machine")
    target = tmp_path / "package.zip"
    listed = write_zip(target, sample_members(), EXTRA)
    out = tmp_path / "unzipped"
    with zipfile.ZipFile(target) as archive:
        archive.extractall(out)
        manifest = archive.read("MANIFEST.sha256").decode()
    assert manifest == "".join(f"{digest}  {name}\n" for name, _, digest in listed)
    for name, size, digest in listed:
        assert (out / name).stat().st_size == size
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    done = subprocess.run(["sha256sum", "-c", "MANIFEST.sha256"], cwd=out, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": OK") == len(listed)


@pytest.mark.parametrize("bad", ["digest", "short", "long"])
def test_a_member_that_does_not_match_its_digest_or_size_abandons_the_zip(tmp_path, bad):
    data = b"expected bytes" * 100
    broken = {"digest": member("S1/x.bin", data, sha256="0" * 64),
              "short": member("S1/x.bin", data, size=len(data) + 1),
              "long": member("S1/x.bin", data, size=len(data) - 1)}[bad]
    target = tmp_path / "package.zip"
    with pytest.raises(PackageError) as caught:
        write_zip(target, [*sample_members(), broken], EXTRA)
    assert caught.value.code == "input_corrupt"
    assert caught.value.status == 409
    assert "S1/x.bin" in caught.value.message
    assert str(tmp_path) not in caught.value.message
    assert not target.exists()


def test_a_member_without_a_digest_is_hashed_while_it_streams(tmp_path):
    data = b"no digest given" * 10
    listed = write_zip(tmp_path / "p.zip", [member("S1/x", data, sha256=None)], {})
    assert listed == [("S1/x", len(data), hashlib.sha256(data).hexdigest())]


def test_large_chunks_stream_through_a_non_seekable_source(tmp_path):
    data = bytes(range(256)) * (packages.CHUNK_SIZE // 256 * 2 + 3)  # over two chunks
    target = tmp_path / "p.zip"
    write_zip(target, [member("S1/big.bin", data)], {})
    with zipfile.ZipFile(target) as archive:
        assert archive.read("S1/big.bin") == data


def test_the_zip64_path_gives_a_valid_zip(tmp_path, monkeypatch):
    # A real member over 2 GiB is too slow for a unit test; lower the threshold instead.
    monkeypatch.setattr(packages, "ZIP64_THRESHOLD", 10)
    target = tmp_path / "p.zip"
    write_zip(target, sample_members(), EXTRA)
    with zipfile.ZipFile(target) as archive:
        assert archive.testzip() is None
        assert archive.read("S1/tables/a.csv") == b"gene,count\nA,1\n"
        big = archive.getinfo("S2/counts/b.h5ad")
        # The ZIP64 extra field (header id 0x0001) is in the local header of a forced member.
        assert big.extract_version >= zipfile.ZIP64_VERSION
    monkeypatch.setattr(packages, "ZIP64_THRESHOLD", 2 ** 31)
    plain = tmp_path / "plain.zip"
    write_zip(plain, sample_members(), EXTRA)
    assert plain.read_bytes() != target.read_bytes()


@pytest.mark.parametrize("name", ["/etc/passwd", "S1/../../x", "..", "S1\\x", "C:/x", "", "a/\x00b", "./"])
def test_unsafe_member_names_are_refused(tmp_path, name):
    target = tmp_path / "p.zip"
    with pytest.raises(PackageError) as caught:
        write_zip(target, [member(name, b"x")], {})
    assert caught.value.code == "unsafe_member"
    assert not target.exists()


def test_double_slashes_are_normalised_and_duplicates_refused(tmp_path):
    listed = write_zip(tmp_path / "p.zip", [member("S1//a/./b.txt", b"x")], {})
    assert listed[0][0] == "S1/a/b.txt"
    with pytest.raises(PackageError):
        write_zip(tmp_path / "q.zip", [member("S1/a", b"x"), member("S1//a", b"y")], {})
    with pytest.raises(PackageError):
        write_zip(tmp_path / "r.zip", [member("README.md", b"x")], {"README.md": b"y"})
    with pytest.raises(PackageError):
        write_zip(tmp_path / "s.zip", [], {"MANIFEST.sha256": b"y"})
    assert not (tmp_path / "q.zip").exists()


def test_metadata_tsv_columns_na_lists_and_order():
    rows = [
        {"project": "P1", "sample": "S2", "transaction": 10, "path": "a.csv", "size": 5,
         "hashtype": "sha1", "hashsum": "ab", "sha256": "cd", "mimetype": "text/csv",
         "keys": {"tissue": ["liver", "lung"], "Age": "5"}},
        {"project": "P1", "sample": "S1", "transaction": 9, "path": "b.h5ad", "size": 7,
         "submitter": "ann", "instrument": "seq\tA\nB", "keys": {"tissue": "blood", "size": "L"}},
        {"project": "P1", "sample": "S1", "transaction": 12, "path": "a.csv", "size": 1},
        {"project": "P1", "sample": "S1", "transaction": 2, "path": "a.csv", "size": 1},
    ]
    lines = metadata_tsv(rows).decode("utf-8").split("\n")
    assert lines[-1] == ""  # ends with a newline
    header = lines[0].split("\t")
    assert header == ["project", "sample", "transaction", "submitter", "instrument", "path", "size",
                      "hashtype", "hashsum", "sha256", "mimetype", "Age", "key_size", "tissue"]
    body = [dict(zip(header, line.split("\t"))) for line in lines[1:-1]]
    assert all(len(line.split("\t")) == len(header) for line in lines[1:-1])
    assert [(row["sample"], row["path"], row["transaction"]) for row in body] == [
        ("S1", "a.csv", "2"), ("S1", "a.csv", "12"), ("S1", "b.h5ad", "9"), ("S2", "a.csv", "10")]
    assert body[3]["tissue"] == "liver;lung"
    assert body[3]["Age"] == "5"
    assert body[3]["submitter"] == "NA"
    assert body[0]["tissue"] == "NA"
    assert body[2]["instrument"] == "seq A B"
    assert body[2]["key_size"] == "L"
    assert body[2]["size"] == "7"
    assert metadata_tsv([]) == ("\t".join(packages.FIXED_COLUMNS) + "\n").encode()


def test_readme_names_the_project_the_citation_and_the_kind():
    context = {"project_id": "P7", "project_title": "Tumour atlas", "project_abstract": "Cells of tumours.",
               "kind": "sample", "sample": "S3", "file_count": 4, "total_size": 3 * 1024 ** 3,
               "build_date": "2024-05-06"}
    text = readme(context).decode("utf-8")
    assert "# Tumour atlas" in text
    assert "Cells of tumours." in text
    assert "Tumour atlas (labvault project P7), computed file built 2024-05-06." in text
    assert "sample S3" in text
    assert "4 (3.0 GiB)" in text
    assert "sha256sum -c MANIFEST.sha256" in text
    assert "anndata.read_h5ad" in text
    assert "$" not in text.replace("$project", "")  # every placeholder filled
    assert readme(context) == readme(dict(context))  # deterministic
    merged = readme({**context, "kind": "merged"}).decode()
    assert "merged AnnData" in merged
    assert "metadata of every file" in readme({**context, "kind": "metadata"}).decode()
    assert packages.TEMPLATE_VERSION == "2"


def test_the_template_ships_as_package_data():
    setup = (Path(packages.__file__).parents[1] / "setup.cfg").read_text()
    assert "stats_service = templates/*.md" in setup


@pytest.mark.parametrize("sample, subdir, name, expected", [
    ("S1", "counts", "a.h5ad", "S1/counts/a.h5ad"),
    ("S1", "", "a.h5ad", "S1/a.h5ad"),
    (None, "x/y", "a", "NA/x/y/a"),
    ("", "", "a", "NA/a"),
    ("a/b\\c", "d", "e", "a_b_c/d/e"),
    ("..", "../x", "..", "__/__/x/__"),
    ("S\n1", "sub\x00dir", "f\tg", "S_1/sub_dir/f_g"),
    ("S1", "a//b/./", "c", "S1/a/b/c"),
])
def test_sample_layout(sample, subdir, name, expected):
    layout = sample_layout(sample, subdir, name)
    assert layout == expected
    assert packages.safe_member_name(layout) == layout


def test_files_sharing_a_path_keep_distinct_names_and_the_newest_keeps_the_plain_one():
    names = packages.unique_names([("s1/run1/a.txt", 1, 3), ("s1/run1/a.txt", 2, 7), ("s1/run1/b", 1, 4),
                                   ("s1/run1/b", 1, 5), ("s1/.hidden", 1, 8), ("s1/.hidden", 2, 9),
                                   ("s1/run1/a.file-3.txt", 1, 10)])
    assert names[7] == "s1/run1/a.txt"            # the newer transaction keeps the name
    assert names[3] == "s1/run1/a.file-3-2.txt"   # its first new name was taken by a real file
    assert names[10] == "s1/run1/a.file-3.txt"    # a real file of that name keeps it
    assert (names[5], names[4]) == ("s1/run1/b", "s1/run1/b.file-4")
    assert (names[9], names[8]) == ("s1/.hidden", "s1/.hidden.file-8")
    assert len(set(names.values())) == len(names)
    assert packages.unique_names(reversed([("x/a", 1, 1), ("x/a", 1, 2)])) == {2: "x/a", 1: "x/a.file-1"}


def test_two_members_of_one_name_are_a_package_error(tmp_path):
    with pytest.raises(packages.PackageError) as caught:
        packages.write_zip(tmp_path / "p.zip", [], {"a": b"1", "./a": b"2"})
    assert caught.value.code == packages.DUPLICATE_MEMBER and not (tmp_path / "p.zip").exists()
