"""Policy rules and uploader answers over the Pacifica seed, without sockets.

``SeedMetadata`` stands in for ``MetadataClient`` with the generic REST's filter
semantics (every filter an equality; a list means any of); tests/integration/test_policy_http.py runs
the same questions against the real metadata service.
"""
import copy

import pytest

from common.errors import BadRequest, PreconditionFailed, ServiceUnavailable
from common.access import Directory
from policy_service.policy import IngestPolicy
from policy_service.uploader import UploaderQueries
from tests.helpers import FIXTURES, load_json

TABLES = ("users", "projects", "instruments", "groups", "user_group", "relationships",
          "project_user", "project_instrument", "instrument_user")


class SeedMetadata:
    def __init__(self):
        self.tables = {name: load_json(FIXTURES / "metadata-seed" / f"{name}.json") for name in TABLES}

    def query(self, objects, **filters):
        def matches(row, key, value):
            wanted = value if isinstance(value, list) else [value]
            return str(row.get(key)) in {str(item) for item in wanted}
        return [dict(row) for row in self.tables[objects]
                if all(matches(row, key, value) for key, value in filters.items())]

    def first(self, objects, **filters):
        rows = self.query(objects, **filters)
        return rows[0] if rows else None


@pytest.fixture
def metadata():
    return SeedMetadata()


def document(submitter=10, project="1234a", instrument=54):
    good = load_json(FIXTURES / "metadata-files" / "good-md.json")
    values = {"Transactions.submitter": submitter, "Transactions.project": project,
              "Transactions.instrument": instrument}
    result = []
    for entry in copy.deepcopy(good):
        table = entry.get("destinationTable")
        if table in values:
            if values[table] is None:
                continue
            entry["value"] = values[table]
        result.append(entry)
    return result


def denied(metadata, doc):
    with pytest.raises(PreconditionFailed) as caught:
        IngestPolicy(metadata).check(doc)
    assert caught.value.code == "policy_denied"
    assert caught.value.status == 412
    assert "\n" not in caught.value.message
    return caught.value.message


# -- ingest policy ------------------------------------------------------------------------

def test_good_document_passes(metadata):
    IngestPolicy(metadata).check(document())


def test_policy_query_fixture_passes(metadata):
    # Submitter 10 is a member of the closed project 1236é and instrument 54 is linked
    # to it; the contract checks existence and links, not project dates.
    IngestPolicy(metadata).check(load_json(FIXTURES / "policy-ingest-query.json"))


def test_bad_project_is_named(metadata):
    message = denied(metadata, load_json(FIXTURES / "metadata-files" / "bad-project-md.json"))
    assert "unknown project '12'" in message


def test_every_failure_is_named_at_once(metadata):
    message = denied(metadata, document(submitter=999, project="nope", instrument=1))
    assert "unknown submitter 999" in message
    assert "unknown project 'nope'" in message
    assert "unknown instrument 1" in message


def test_missing_parties_are_named(metadata):
    message = denied(metadata, document(submitter=None, instrument=None))
    assert "missing Transactions.submitter" in message
    assert "missing Transactions.instrument" in message
    assert "Transactions.project" not in message


def test_non_member_without_admin_is_denied(metadata):
    message = denied(metadata, document(submitter=11))
    assert message.endswith("submitter 11 is not a member of project '1234a'")


def test_admin_bypasses_membership(metadata):
    metadata.tables["project_user"] = []
    IngestPolicy(metadata).check(document(submitter=10))


def test_unlinked_instrument_is_denied(metadata):
    message = denied(metadata, document(instrument=104))
    assert "instrument 104 is not linked to project '1234a'" in message


def test_non_numeric_submitter_is_unknown(metadata):
    assert "unknown submitter 'dmlb2001'" in denied(metadata, document(submitter="dmlb2001"))


# -- uploader queries ---------------------------------------------------------------------

def ask(metadata, **body):
    return UploaderQueries(metadata).answer(body)


def ids(rows):
    return [row["_id"] for row in rows]


def test_user_by_network_id_with_columns(metadata):
    rows = ask(metadata, user="dmlb2001", **{"from": "users"}, columns=["last_name", "first_name"],
               where={"network_id": "dmlb2001"})
    assert rows == [{"last_name": "Brown\u00e9 Jr", "first_name": "David\u00e9"}]


def test_directory_lookup_is_answered_for_user_minus_one(metadata):
    # Pacifica's PolicyQuery.set_user() resolves a network id this way before it knows its id.
    rows = ask(metadata, user=-1, **{"from": "users"}, columns=["_id"], where={"network_id": "dmlb2001"})
    assert rows == [{"_id": 10}]


def test_users_without_where_is_the_requester(metadata):
    assert ids(ask(metadata, user=11, **{"from": "users"})) == [11]
    assert ids(ask(metadata, user="11", **{"from": "users"}, where={})) == [11]


def test_users_of_a_project_only_for_members_or_admins(metadata):
    assert ids(ask(metadata, user=10, **{"from": "users"}, where={"project_id": "1234a"})) == [10]
    assert ask(metadata, user=11, **{"from": "users"}, where={"proposal_id": "1234a"}) == []


def test_users_filters_intersect(metadata):
    assert ask(metadata, user=10, **{"from": "users"}, where={"_id": 11, "network_id": "dmlb2001"}) == []
    assert ids(ask(metadata, user=10, **{"from": "users"}, where={"_id": "11"})) == [11]


def test_projects_of_an_instrument(metadata):
    rows = ask(metadata, user="dmlb2001", **{"from": "projects"}, where={"instrument_id": 54})
    assert sorted(ids(rows)) == ["1234a", "1236\u00e9"]


def test_projects_for_admin_and_for_members(metadata):
    assert len(ask(metadata, user=10, **{"from": "proposals"})) == 5
    metadata.tables["user_group"] = []
    assert sorted(ids(ask(metadata, user=10, **{"from": "projects"}))) == ["1234a", "1236\u00e9"]
    assert ids(ask(metadata, user=10, **{"from": "projects"}, where={"_id": "1236\u00e9"})) == ["1236\u00e9"]
    assert ask(metadata, user=10, **{"from": "projects"}, where={"project_id": "1235"}) == []
    assert ask(metadata, user=10, **{"from": "projects"}, where={"_id": "1235", "project_id": "1234a"}) == []
    assert ask(metadata, user=11, **{"from": "projects"}) == []


def test_instruments_of_a_project(metadata):
    rows = ask(metadata, user="dmlb2001", **{"from": "instruments"}, columns=["_id", "name_short"],
               where={"project_id": "1234a"})
    assert rows == [{"_id": 54, "name_short": "Nittany Liquid Prob\u00e9s"}]


def test_instruments_for_admin_members_and_strangers(metadata):
    assert sorted(ids(ask(metadata, user=10, **{"from": "instruments"}))) == [54, 104]
    assert ids(ask(metadata, user=10, **{"from": "instruments"}, where={"_id": 104})) == [104]
    metadata.tables["user_group"] = []
    assert ids(ask(metadata, user=10, **{"from": "instruments"})) == [54]
    assert ask(metadata, user=10, **{"from": "instruments"}, where={"_id": 104}) == []
    assert ask(metadata, user=11, **{"from": "instruments"}) == []
    assert ask(metadata, user=11, **{"from": "instruments"}, where={"project_id": "1234a"}) == []


def test_unknown_requester_is_refused(metadata):
    for user in (999, "nobody"):
        with pytest.raises(PreconditionFailed) as caught:
            ask(metadata, user=user, **{"from": "users"})
        assert caught.value.code == "unknown_user"


# -- what the metadata service's answers mean ------------------------------------------------

def test_deleted_rows_grant_nothing(metadata):
    metadata.tables["project_user"][0]["deleted"] = "2024-01-01 00:00:00"
    metadata.tables["user_group"] = []
    assert "not a member" in denied(metadata, document())


def test_a_filter_the_metadata_service_cannot_compare_matches_nothing(metadata):
    class Picky(SeedMetadata):
        def query(self, objects, **filters):
            if filters.get("_id") == 10 ** 12:
                raise BadRequest("filter: id must be an integer", code="invalid_filter")
            return super().query(objects, **filters)

    assert "unknown instrument 1000000000000" in denied(Picky(), document(instrument=10 ** 12))


def test_other_metadata_errors_propagate(metadata):
    class Down(SeedMetadata):
        def query(self, objects, **filters):
            raise ServiceUnavailable("cannot reach the metadata service", code="metadata_unavailable")

    with pytest.raises(ServiceUnavailable) as caught:
        IngestPolicy(Down()).check(document())
    assert caught.value.code == "metadata_unavailable"


def test_rows_by_id_never_asks_for_a_whole_table(metadata):
    asked = []

    class Counting(SeedMetadata):
        def query(self, objects, **filters):
            asked.append((objects, filters))
            return super().query(objects, **filters)

    assert Directory(Counting()).by_ids("projects", []) == []
    assert asked == []
    directory = Directory(Counting())
    directory.BATCH = 2
    assert [row["_id"] for row in directory.by_ids("instruments", [104, 54, 54, 999])] == [54, 104]
    assert [filters for _, filters in asked] == [{"_id": [104, 54]}, {"_id": [999]}]


def test_an_authenticated_uploader_may_submit_only_as_themselves_unless_admin(metadata):
    policy = IngestPolicy(metadata)
    policy.check(document(submitter=10), uploader=10)
    policy.check(document(submitter=10), uploader=None)
    with pytest.raises(PreconditionFailed) as caught:
        policy.check(document(submitter=10), uploader=11)
    assert "not the authenticated uploader 11" in caught.value.message
    # user 10 is an admin: may upload on behalf of others (who must still be members)
    with pytest.raises(PreconditionFailed) as caught:
        policy.check(document(submitter=11), uploader=10)
    assert "authenticated uploader" not in caught.value.message
