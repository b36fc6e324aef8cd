"""Transaction ingest: the Pacifica document in, rows out, and nothing left behind on any failure."""
from __future__ import annotations

import copy
import datetime

import pytest

from common import db
from common.errors import LabvaultError
from metadata_service import ingest, models, objects
from metadata_service.models import (
    FileKeyValue,
    Files,
    Keys,
    Transactions,
    TransKeyValue,
    Values,
)
from tests.helpers import FIXTURES, load_json
from tests.unit.processes import database_url, run_processes

TRANSACTION_ID = 1234
XLS_NAME = ("\u30d1\u30bd\u30b3\u30f3\u8cc7\u7523\u7ba1\u7406\u53f0\u5e33"
            "\uff08S&T HK\uff09_\u73fe\u5730\u8abf\u9054PC.xls")


def good_document(transaction_id=TRANSACTION_ID, first_file_id=100):
    """good-md.json as the ingest service sends it: with the transaction and file ids."""
    document = load_json(FIXTURES / "metadata-files" / "good-md.json")
    document.insert(0, {"destinationTable": "Transactions._id", "value": transaction_id})
    for n, entry in enumerate(e for e in document if e["destinationTable"] == "Files"):
        entry["_id"] = first_file_id + n
    return document


def entries(document, table):
    return [entry for entry in document if entry.get("destinationTable") == table]


def counts():
    return {table: model.select().count() for table, model in objects.TABLES.items()}


def test_good_document(metadata_seeded):
    assert ingest.ingest_document(good_document()) == {"status": "success"}
    transaction = objects.query("transactions", {"_id": str(TRANSACTION_ID)})[0]
    assert (transaction["submitter"], transaction["project"], transaction["instrument"]) == (10, "1234a", 54)
    files = objects.query("files", {"transaction": str(TRANSACTION_ID)})
    assert [(f["_id"], f["subdir"], f["name"]) for f in files] == [
        (100, "a/b", "foo.txt"), (101, "a/b", "bar.txt"),
        (102, "a/c", XLS_NAME)]
    foo = files[0]
    assert (foo["size"], foo["mimetype"], foo["hashtype"]) == (4, "text/plain", "sha1")
    assert foo["hashsum"] == "f1d2d2f924e986ac86fdf7b36c94bcdf32beec15"
    # "Tue Nov 29 14:09:05 PST 2016" stored as UTC.
    assert foo["mtime"] == foo["ctime"] == datetime.datetime(2016, 11, 29, 22, 9, 5)
    pairs = {(Keys.get_by_id(kv["key"]).key, Values.get_by_id(kv["value"]).value)
             for kv in objects.query("trans_key_value", {"transaction": str(TRANSACTION_ID)})}
    assert pairs == {("Temp C", "27"), ("Temp F", "27"), ("Tag", "foo")}
    assert Values.select().count() == 2  # "27" is one value row


def test_keys_and_values_are_shared_between_transactions(metadata_seeded):
    ingest.ingest_document(good_document())
    keys, values = Keys.select().count(), Values.select().count()
    ingest.ingest_document(good_document(TRANSACTION_ID + 1, 200))
    assert (Keys.select().count(), Values.select().count()) == (keys, values)
    assert TransKeyValue.select().count() == 6


def test_file_key_values_by_id_and_by_path(metadata_seeded):
    document = good_document()
    document += [
        {"destinationTable": "FileKeyValue", "file": 100, "key": "quality", "value": "good"},
        {"destinationTable": "FileKeyValue", "file_id": "101", "key": "quality", "value": "poor"},
        {"destinationTable": "FileKeyValue", "name": "foo.txt", "subdir": "data/a/b/", "key": "lane", "value": 3},
        # The same fact twice is recorded once.
        {"destinationTable": "FileKeyValue", "name": "foo.txt", "subdir": "a/b", "key": "lane", "value": "3"},
    ]
    ingest.ingest_document(document)
    rows = {(kv.file_id, kv.key.key, kv.value.value) for kv in FileKeyValue.select()}
    assert rows == {(100, "quality", "good"), (101, "quality", "poor"), (100, "lane", "3")}


def test_unknown_tables_and_keys_are_ignored_and_ids_may_be_text(metadata_seeded):
    document = good_document()
    document.append({"destinationTable": "Transactions.color", "value": "blue"})
    document.append({"destinationTable": "SomethingNew", "anything": [1, 2]})
    document.append({"anything": "without a table"})
    entries(document, "Files")[0]["source"] = "/tmp/ignored"
    entries(document, "Transactions.submitter")[0]["value"] = "10"
    entries(document, "Files")[1]["_id"] = "101"
    ingest.ingest_document(document)
    assert Files.select().count() == 3


def test_integer_project_ids_are_strings(metadata_seeded):
    document = good_document()
    entries(document, "Transactions.project")[0]["value"] = 1235
    ingest.ingest_document(document)
    assert Transactions.get_by_id(TRANSACTION_ID).project_id == "1235"


def test_optional_file_fields(metadata_seeded):
    document = good_document()
    for field in ("hashsum", "hashtype", "mimetype", "mtime", "ctime", "subdir"):
        del entries(document, "Files")[0][field]
    entries(document, "Files")[0]["name"] = "top.txt"
    entries(document, "Files")[1]["hashtype"] = "SHA256"
    entries(document, "Files")[1]["hashsum"] = "sha256:" + "A" * 64
    entries(document, "Files")[2]["mtime"] = 1480457345
    ingest.ingest_document(document)
    top, bar, other = Files.select().order_by(Files.id)
    assert (top.subdir, top.mimetype, top.hashtype, top.hashsum, top.mtime) == (
        "", "application/octet-stream", None, None, None)
    assert (bar.hashtype, bar.hashsum) == ("sha256", "a" * 64)
    assert other.mtime == datetime.datetime(2016, 11, 29, 22, 9, 5)


def mutate(change):
    def build():
        document = good_document()
        change(document)
        return document
    return build


def set_file(index, **values):
    def change(document):
        entries(document, "Files")[index].update(values)
    return change


def drop_table(table):
    def change(document):
        document[:] = [entry for entry in document if entry.get("destinationTable") != table]
    return change


def drop_file_field(field):
    def change(document):
        del entries(document, "Files")[1][field]
    return change


def set_value(table, value):
    def change(document):
        entries(document, table)[0]["value"] = value
    return change


def seed_transaction(_id):
    objects.insert("transactions", {"_id": _id, "submitter": 10, "project": "1234a", "instrument": 54})


FAILURES = {
    "not a list": (lambda: {"destinationTable": "Files"}, 400, "invalid_metadata"),
    "entry not an object": (mutate(lambda d: d.append("Files")), 400, "invalid_metadata"),
    "no transaction id": (mutate(drop_table("Transactions._id")), 400, "invalid_metadata"),
    "no submitter": (mutate(drop_table("Transactions.submitter")), 400, "invalid_metadata"),
    "no project": (mutate(drop_table("Transactions.project")), 400, "invalid_metadata"),
    "no instrument": (mutate(drop_table("Transactions.instrument")), 400, "invalid_metadata"),
    "submitter twice": (mutate(lambda d: d.append({"destinationTable": "Transactions.submitter", "value": 11})),
                        400, "invalid_metadata"),
    "transaction id not a number": (mutate(set_value("Transactions._id", "abc")), 400, "invalid_metadata"),
    "file without _id": (mutate(drop_file_field("_id")), 400, "invalid_metadata"),
    "file without name": (mutate(drop_file_field("name")), 400, "invalid_metadata"),
    "file without size": (mutate(drop_file_field("size")), 400, "invalid_metadata"),
    "negative size": (mutate(set_file(1, size=-4)), 400, "invalid_metadata"),
    "size not a number": (mutate(set_file(1, size="four")), 400, "invalid_metadata"),
    "name with a slash": (mutate(set_file(1, name="x/bar.txt")), 400, "invalid_metadata"),
    "subdir climbing out": (mutate(set_file(1, subdir="data/../../etc")), 400, "invalid_metadata"),
    "same path twice": (mutate(set_file(1, name="foo.txt", subdir="a/b")), 400, "invalid_metadata"),
    "key without value": (mutate(lambda d: d.append({"destinationTable": "TransactionKeyValue", "key": "k"})),
                          400, "invalid_metadata"),
    "file key value for no file": (
        mutate(lambda d: d.append({"destinationTable": "FileKeyValue", "key": "k", "value": "v", "file": 5})),
        400, "invalid_metadata"),
    "file key value for no path": (
        mutate(lambda d: d.append({"destinationTable": "FileKeyValue", "key": "k", "value": "v",
                                   "name": "nope.txt", "subdir": "a/b"})),
        400, "invalid_metadata"),
    "bad mimetype": (mutate(set_file(2, mimetype="lame-mime-type")), 400, "invalid_mimetype"),
    "bad hash type": (mutate(set_file(2, hashtype="crc32")), 400, "unsupported_hashtype"),
    "non-hex hash": (mutate(set_file(2, hashsum="not-hex")), 400, "invalid_hashsum"),
    "short sha1": (mutate(set_file(2, hashsum="deadbeef")), 400, "invalid_hashsum"),
    "bad mtime": (mutate(set_file(2, mtime="the other day")), 400, "invalid_date"),
    "bad ctime zone": (mutate(set_file(2, ctime="Tue Nov 29 14:09:05 QQQ 2016")), 400, "invalid_date"),
    "unknown submitter": (mutate(set_value("Transactions.submitter", 999)), 400, "unknown_submitter"),
    "unknown project": (mutate(set_value("Transactions.project", "12")), 400, "unknown_project"),
    "unknown instrument": (mutate(set_value("Transactions.instrument", 999)), 400, "unknown_instrument"),
    "two files, one _id": (mutate(set_file(2, _id=100)), 409, "duplicate_id"),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_failures_leave_no_row(metadata_seeded, name):
    build, status, code = FAILURES[name]
    ingest.ingest_document(good_document(99, 1))  # rows of an earlier transaction must stay as they are
    before = counts()
    with pytest.raises(LabvaultError) as caught:
        ingest.ingest_document(build())
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.message
    assert "\n" not in caught.value.message
    assert counts() == before


def test_existing_ids_are_409_and_leave_no_row(metadata_seeded):
    seed_transaction(TRANSACTION_ID)
    before = counts()
    with pytest.raises(LabvaultError) as caught:
        ingest.ingest_document(good_document())
    assert (caught.value.status, caught.value.code) == (409, "duplicate_id")
    assert counts() == before

    seed_transaction(1)
    objects.insert("files", {"_id": 101, "name": "old", "size": 1, "transaction": 1})
    before = counts()
    with pytest.raises(LabvaultError) as caught:
        ingest.ingest_document(good_document(TRANSACTION_ID + 1))
    assert (caught.value.status, caught.value.code) == (409, "duplicate_id")
    assert "101" in caught.value.message and "bar.txt" in caught.value.message
    assert counts() == before


def test_a_failure_while_writing_rolls_back_what_was_written(metadata_seeded, monkeypatch):
    """The checks can lose a race with another writer; the database refusal still undoes everything."""
    seed_transaction(1)
    objects.insert("files", {"_id": 102, "name": "old", "size": 1, "transaction": 1})
    monkeypatch.setattr(ingest, "_check_database", lambda doc: None)
    before = counts()
    with pytest.raises(LabvaultError) as caught:
        ingest.ingest_document(good_document())
    assert (caught.value.status, caught.value.code) == (409, "duplicate_id")
    assert counts() == before


def ingest_in_child(url, document):
    """In a child process: one ingest over a database connection of its own; "success" or the error code."""
    database = db.bind(models.database, url)
    try:
        return ingest.ingest_document(document)["status"]
    except LabvaultError as exc:
        return exc.code
    finally:
        database.close()


def test_one_document_from_several_processes_at_once_goes_in_once(metadata_seeded):
    url = database_url(metadata_seeded)
    for transaction_id in (1, 2, 3):  # a few rounds: the processes meet at different points
        document = good_document(transaction_id, first_file_id=100 * transaction_id)
        outcomes = run_processes(ingest_in_child, [(url, document)] * 3, databases=[metadata_seeded])
        assert sorted(outcomes) == ["duplicate_id", "duplicate_id", "success"]
    assert counts()["transactions"] == 3 and counts()["files"] == 9 and counts()["trans_key_value"] == 9


def test_two_transactions_claiming_one_file_id_at_once(metadata_seeded):
    url = database_url(metadata_seeded)
    documents = [good_document(10, first_file_id=500), good_document(11, first_file_id=502)]  # both claim 502
    outcomes = run_processes(ingest_in_child, [(url, document) for document in documents],
                             databases=[metadata_seeded])
    assert sorted(outcomes) == ["duplicate_id", "success"]
    winner = 10 if outcomes[0] == "success" else 11
    # The loser left nothing: not its transaction, not one of its files or key/values.
    assert [row["_id"] for row in objects.query("transactions", {})] == [winner]
    assert {row["transaction"] for row in objects.query("files", {})} == {winner}
    assert counts()["files"] == 3 and counts()["trans_key_value"] == 3


@pytest.mark.parametrize("field", ["name", "subdir", "key", "value", "project"])
@pytest.mark.parametrize("bad", ["a\0b", "a\ud800b"])
def test_text_no_database_can_store_is_a_client_error(metadata_seeded, field, bad):
    """PostgreSQL refuses NUL in text and no driver encodes a lone surrogate: 400, never a crash."""
    document = good_document()
    if field == "project":
        entries(document, "Transactions.project")[0]["value"] = bad
    elif field in ("key", "value"):
        entries(document, "TransactionKeyValue")[0][field] = bad
    else:
        entries(document, "Files")[0][field] = bad
    before = counts()
    with pytest.raises(LabvaultError) as caught:
        ingest.ingest_document(document)
    assert (caught.value.status, caught.value.code) == (400, "invalid_metadata")
    assert counts() == before


def test_long_and_unicode_text_round_trips(metadata_seeded):
    document = good_document()
    name = "\u00e9" * 300 + "\U0001F600.txt"  # longer than any varchar(255), multi-byte
    entries(document, "Files")[0]["name"] = name
    entries(document, "TransactionKeyValue")[0]["value"] = "\u30d1" * 682  # 2046 bytes: under the limit
    ingest.ingest_document(document)
    assert objects.query("files", {"_id": "100"})[0]["name"] == name
    assert Values.select().where(Values.value == "\u30d1" * 682).count() == 1


def test_messages_name_the_entry(metadata_seeded):
    document = good_document()
    entries(document, "Files")[2]["mimetype"] = "lame-mime-type"
    with pytest.raises(LabvaultError) as caught:
        ingest.ingest_document(document)
    assert "metadata[9]" in caught.value.message and "lame-mime-type" in caught.value.message


@pytest.mark.parametrize("fixture, code", [("bad-mimetype-md.json", "invalid_mimetype"),
                                           ("bad-project-md.json", "unknown_project"),
                                           ("bad-hashsum-md.json", "invalid_hashsum")])
def test_pacifica_bad_fixtures(metadata_seeded, fixture, code):
    document = load_json(FIXTURES / "metadata-files" / fixture)
    document.append({"destinationTable": "Transactions._id", "value": 5})
    for n, entry in enumerate(entries(document, "Files")):
        entry["_id"] = n + 1
    before = counts()
    with pytest.raises(LabvaultError) as caught:
        ingest.ingest_document(copy.deepcopy(document))
    assert caught.value.code == code
    assert counts() == before


@pytest.mark.parametrize("odd", [None, True, 1.5, 2 ** 70, float("inf"), [], [1], {}, {"a": 1}, "/", "data/.."])
@pytest.mark.parametrize("field", ["destinationTable", "value", "key", "_id", "name", "size", "subdir",
                                   "mimetype", "hashtype", "hashsum", "mtime", "file"])
def test_odd_values_are_client_errors_or_ignored(metadata_seeded, field, odd):
    """Whatever shape a client sends, the answer is success or a 4xx domain error, never a crash."""
    document = good_document()
    document.append({"destinationTable": "FileKeyValue", "key": "k", "value": "v", "file": 100})
    for entry in (document[1], document[4], entries(document, "Files")[0], document[-1]):
        entry[field] = odd
    try:
        ingest.ingest_document(document)
    except LabvaultError as exc:
        assert 400 <= exc.status < 500
