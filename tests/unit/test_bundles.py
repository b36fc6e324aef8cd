"""Bundle reading and validation: every rule, on tars built in memory and the Pacifica fixtures."""
import gzip
import io
import json
import tarfile
import unicodedata

import pytest

from common import bundles
from common.bundles import BundleError
from tests.helpers import FIXTURES, fixture_bundle, load_json, make_tar

GOOD = load_json(FIXTURES / "metadata-files" / "good-md.json")


def write(tmp_path, raw: bytes, name="b.tar"):
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def load(tmp_path, raw: bytes):
    tar, members = bundles.read_index(write(tmp_path, raw))
    try:
        index = bundles.classify(members)
        document = bundles.read_metadata(tar, index.metadata, 1 << 20)
        return index, bundles.parse_manifest(document)
    finally:
        tar.close()


def code_of(excinfo) -> str:
    return excinfo.value.code


@pytest.mark.parametrize("path,key", [
    ("data//a/b/foo.txt", "a/b/foo.txt"), ("data/a/b/", "a/b"), ("a/b", "a/b"),
    ("./data/a/b", "a/b"), ("/data/a", "a"), ("data", ""),
])
def test_payload_key_normalises(path, key):
    assert bundles.payload_key(path) == key


def test_declared_key_matches_member_names():
    assert bundles.declared_key("data//a/b", "bar.txt") == bundles.payload_key("data/a/b/bar.txt")
    nfd = unicodedata.normalize("NFD", "é.txt")
    assert bundles.payload_key(f"data/{nfd}") == bundles.declared_key("", "é.txt")


@pytest.mark.parametrize("metadata_last", [False, True])
def test_good_fixture_bundle_matches_every_file(tmp_path, metadata_last):
    index, manifest = load(tmp_path, fixture_bundle("good-md.json", metadata_last))
    assert [f.key for f in manifest.files] == ["a/b/foo.txt", "a/b/bar.txt",
                                                "a/c/パソコン資産管理台帳（S&T HK）_現地調達PC.xls"]
    pairs = bundles.match_payload(manifest, index)
    assert [member.size for _, member in pairs] == [4, 4, 4]
    assert manifest.total_bytes == 12


def test_dot_slash_members_and_directories_are_fine(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in (".", "./data", "./data/a"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, raw in (("./data/a/x.txt", b"abc"), ("./metadata.txt", json.dumps(
                [{"destinationTable": "Files", "name": "x.txt", "subdir": "a", "size": 3,
                  "hashtype": "sha1", "hashsum": "sha1:A9993E364706816ABA3E25717850C26C9CD0D89D"}]).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    index, manifest = load(tmp_path, buffer.getvalue())
    assert manifest.files[0].hashsum == "a9993e364706816aba3e25717850c26c9cd0d89d"
    assert list(index.payload) == ["a/x.txt"]


@pytest.mark.parametrize("raw", [
    (FIXTURES / "bad-tarfile.tar").read_bytes(),
    gzip.compress(make_tar([("metadata.txt", b"[]")])),
    b"",
    make_tar([("metadata.txt", b"[]"), ("data/x", b"x" * 5000)])[:2048],
], ids=["pacifica-bad-tarfile", "gzip", "empty", "truncated"])
def test_unreadable_tars_fail_with_bad_tar(tmp_path, raw):
    with pytest.raises(BundleError) as excinfo:
        bundles.read_index(write(tmp_path, raw))
    assert code_of(excinfo) == "bad_tar"


def special_member(name, kind, linkname=""):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("metadata.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"[]"))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        tar.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize("raw,code", [
    (make_tar([("metadata.txt", b"[]"), ("/data/x", b"x")]), "unsafe_member"),
    (make_tar([("metadata.txt", b"[]"), ("data/../x", b"x")]), "unsafe_member"),
    (make_tar([("metadata.txt", b"[]"), ("data\\x", b"x")]), "unsafe_member"),
    (make_tar([("metadata.txt", b"[]"), ("data/x\x01", b"x")]), "unsafe_member"),
    (special_member("data/link", tarfile.SYMTYPE, "/etc/passwd"), "unsafe_member"),
    (special_member("data/hard", tarfile.LNKTYPE, "metadata.txt"), "unsafe_member"),
    (special_member("data/dev", tarfile.CHRTYPE), "unsafe_member"),
    (special_member("data/fifo", tarfile.FIFOTYPE), "unsafe_member"),
    (make_tar([("metadata.txt", b"[]"), ("data/x", b"x"), ("data//x", b"y")]), "duplicate_member"),
    (make_tar([("metadata.txt", b"[]"), ("data/é", b"x"), (unicodedata.normalize("NFD", "data/é"), b"y")]),
     "duplicate_member"),
    (make_tar([("metadata.txt", b"[]"), ("metadata.txt", b"[]")]), "duplicate_metadata"),
    (make_tar([("data/x", b"x")]), "missing_metadata"),
    (make_tar([("metadata.txt", b"[]"), ("other/x", b"x")]), "member_outside_data"),
    (make_tar([("metadata.txt", b"[]"), ("x", b"x")]), "member_outside_data"),
])
def test_unsafe_or_misplaced_members_are_rejected(tmp_path, raw, code):
    with pytest.raises(BundleError) as excinfo:
        load(tmp_path, raw)
    assert code_of(excinfo) == code
    assert "\n" not in excinfo.value.message


def files_entry(**overrides):
    entry = {"destinationTable": "Files", "name": "x", "subdir": "", "size": 1, "hashtype": "sha1",
             "hashsum": "f" * 40}
    entry.update(overrides)
    return entry


@pytest.mark.parametrize("document,code", [
    ([files_entry(hashtype="crc32")], "unsupported_hashtype"),
    ([files_entry(hashsum="not-hex!")], "invalid_hashsum"),
    ([files_entry(size=-1)], "invalid_metadata"),
    ([files_entry(size="big")], "invalid_metadata"),
    ([files_entry(name="")], "invalid_metadata"),
    ([files_entry(subdir="../up")], "invalid_metadata"),
    ([files_entry(), files_entry(subdir="data/")], "duplicate_file"),
])
def test_bad_files_entries(document, code):
    with pytest.raises(BundleError) as excinfo:
        bundles.parse_manifest(document)
    assert code_of(excinfo) == code


def test_bad_json_and_wrong_shape(tmp_path):
    raw = (FIXTURES / "metadata-files" / "bad-json-md.notjson").read_bytes()
    with pytest.raises(BundleError) as excinfo:
        load(tmp_path, make_tar([("metadata.txt", raw)]))
    assert code_of(excinfo) == "invalid_metadata"
    for document in (b'{"a": 1}', b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(BundleError) as excinfo:
            bundles.decode_metadata(document)
        assert code_of(excinfo) == "invalid_metadata"


def test_metadata_size_limit(tmp_path):
    tar, members = bundles.read_index(write(tmp_path, make_tar([("metadata.txt", b"[" + b" " * 100 + b"]")])))
    with tar, pytest.raises(BundleError) as excinfo:
        bundles.read_metadata(tar, bundles.classify(members).metadata, 50)
    assert code_of(excinfo) == "metadata_too_large"


def test_unknown_tables_and_keys_pass_through():
    document = [{"destinationTable": "Mystery", "x": 1}, files_entry(extra="kept")]
    manifest = bundles.parse_manifest(document)
    assert manifest.document is document and len(manifest.files) == 1


def test_missing_file_and_wrong_size_fail_before_anything_moves(tmp_path):
    index, manifest = load(tmp_path, fixture_bundle("bad-project-md.json"))
    with pytest.raises(BundleError) as excinfo:
        bundles.match_payload(manifest, index)
    assert code_of(excinfo) == "size_mismatch"
    document = GOOD + [files_entry(name="ghost.txt", subdir="a")]
    index, manifest = load(tmp_path, make_tar([("metadata.txt", json.dumps(document).encode())]))
    with pytest.raises(BundleError) as excinfo:
        bundles.match_payload(manifest, index)
    assert code_of(excinfo) == "file_missing"


def test_undeclared_members_are_ignored_unless_rejected(tmp_path):
    document = [files_entry(name="x", size=1, hashsum="sha1:" + "0" * 40)]
    raw = make_tar([("metadata.txt", json.dumps(document).encode()), ("data/x", b"1"), ("data/extra", b"2")])
    index, manifest = load(tmp_path, raw)
    assert len(bundles.match_payload(manifest, index)) == 1
    with pytest.raises(BundleError) as excinfo:
        bundles.match_payload(manifest, index, reject_undeclared=True)
    assert code_of(excinfo) == "undeclared_member"


def test_write_bundle_round_trips(tmp_path):
    src = tmp_path / "src"
    (src / "sub dir").mkdir(parents=True)
    (src / "sub dir" / "naïve.txt").write_bytes(b"hello")
    (src / "top.bin").write_bytes(b"\x00" * 10)
    files = bundles.describe_tree(src, "sha256")
    document = bundles.build_metadata(10, "1234a", 54, [entry for _, entry in files], {"Tag": "x"})
    out = tmp_path / "b.tar"
    bundles.write_bundle(out, files, document)
    index, manifest = load(tmp_path, out.read_bytes())
    assert sorted(index.payload) == ["sub dir/naïve.txt", "top.bin"]
    assert len(bundles.match_payload(manifest, index)) == 2
    assert not list(tmp_path.glob("*.part"))
