"""Pure parsing in the policy service: metadata documents and uploader queries."""
import pytest

from common.errors import BadRequest
from common.access import as_int, is_true
from policy_service.policy import TransactionParties, parse_document
from policy_service.uploader import parse_query, select_columns
from tests.helpers import FIXTURES, load_json


def entry(table, value):
    return {"destinationTable": table, "value": value}


# -- metadata documents ---------------------------------------------------------------

def test_good_fixture_names_all_three_parties():
    parties = parse_document(load_json(FIXTURES / "metadata-files" / "good-md.json"))
    assert parties == TransactionParties(submitter=10, project="1234a", instrument=54)
    assert parties.missing() == []


def test_policy_query_fixture_keeps_unicode_project_and_ignores_other_tables():
    parties = parse_document(load_json(FIXTURES / "policy-ingest-query.json"))
    assert parties == TransactionParties(submitter=10, project="1236\u00e9", instrument=54)


def test_string_ids_are_normalised_and_projects_are_strings():
    parties = parse_document([entry("Transactions.submitter", " 10 "),
                              entry("Transactions.project", 1235),
                              entry("Transactions.instrument", "54")])
    assert parties == TransactionParties(submitter=10, project="1235", instrument=54)


def test_non_numeric_submitter_is_kept_for_the_policy_to_refuse():
    assert parse_document([entry("Transactions.submitter", "dmlb2001")]).submitter == "dmlb2001"


def test_missing_parties_are_listed_in_document_order_of_the_contract():
    parties = parse_document([entry("Transactions.project", "1234a"), entry("Transactions.instrument", None),
                              entry("Transactions.submitter", "  ")])
    assert parties.missing() == ["Transactions.submitter", "Transactions.instrument"]


def test_odd_destination_tables_are_ignored_like_unknown_ones():
    parties = parse_document([{"destinationTable": ["Transactions.submitter"], "value": 1},
                              {"destinationTable": None}, {"value": 3}, entry("Transactions.submitter", 10)])
    assert parties.submitter == 10


def test_identical_duplicates_are_fine_conflicting_ones_are_not():
    assert parse_document([entry("Transactions.submitter", 10), entry("Transactions.submitter", "10")]).submitter == 10
    with pytest.raises(BadRequest) as caught:
        parse_document([entry("Transactions.project", "1234a"), entry("Transactions.project", "1235")])
    assert caught.value.code == "invalid_metadata"


@pytest.mark.parametrize("document", [{}, "[]", None, 3, [1], [["a"]], [{"destinationTable": "Files"}, "x"]])
def test_a_document_that_is_not_a_list_of_objects_is_invalid_metadata(document):
    with pytest.raises(BadRequest) as caught:
        parse_document(document)
    assert caught.value.code == "invalid_metadata"
    assert caught.value.status == 400


@pytest.mark.parametrize("value", [True, 1.5, [10], {"id": 10}])
def test_party_values_must_be_integers_or_strings(value):
    with pytest.raises(BadRequest) as caught:
        parse_document([entry("Transactions.submitter", value)])
    assert caught.value.code == "invalid_metadata"
    assert "Transactions.submitter" in caught.value.message


def test_as_int_and_is_true():
    assert [as_int(v) for v in (10, "10", " 7 ", "-1", "1a", "", True, None, 1.0, "\u0661")] == \
        [10, 10, 7, -1, None, None, None, None, None, None]
    assert [is_true(v) for v in (True, 1, "true", "True", "1", False, 0, "false", "", None)] == \
        [True] * 5 + [False] * 5


# -- uploader queries -------------------------------------------------------------------

def test_pacifica_style_query_parses():
    query = parse_query({"user": "dmlb2001", "from": "users", "columns": ["last_name", "first_name"],
                         "where": {"network_id": "dmlb2001"}})
    assert (query.user, query.table, query.columns, query.where) == \
        ("dmlb2001", "users", ("last_name", "first_name"), {"network_id": "dmlb2001"})


def test_proposals_and_proposal_id_are_aliases():
    query = parse_query({"user": 10, "from": "proposals", "where": {"proposal_id": 1234}})
    assert (query.table, query.columns, query.where) == ("projects", (), {"project_id": "1234"})


@pytest.mark.parametrize("body", [
    [], "x", {"from": "users"}, {"user": "", "from": "users"}, {"user": True, "from": "users"},
    {"user": 10}, {"user": 10, "from": "files"}, {"user": 10, "from": ["users"]},
    {"user": 10, "from": "users", "columns": "last_name"}, {"user": 10, "from": "users", "columns": [1]},
    {"user": 10, "from": "users", "where": []}, {"user": 10, "from": "users", "where": {"instrument_id": 54}},
    {"user": 10, "from": "projects", "where": {"network_id": "x"}},
    {"user": 10, "from": "projects", "where": {"_id": None}},
    {"user": 10, "from": "projects", "where": {"project_id": "a", "proposal_id": "b"}},
])
def test_malformed_queries_are_invalid_query(body):
    with pytest.raises(BadRequest) as caught:
        parse_query(body)
    assert caught.value.code == "invalid_query"
    assert caught.value.status == 400


def test_select_columns():
    row = {"_id": 10, "first_name": "a", "last_name": "b"}
    assert select_columns(row, []) == row
    assert select_columns(row, ["last_name", "_id", "nope"]) == {"last_name": "b", "_id": 10}
