"""Ingest policy: may this submitter put this project's data from this instrument?

The policy service owns no tables; every fact comes from the metadata service over
HTTP (``common.clients.MetadataClient``). This module imports neither CherryPy nor
Celery so it can be tested as plain Python.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from common.access import Directory, as_int
from common.clients import MetadataClient
from common.errors import BadRequest, PreconditionFailed

logger = logging.getLogger(__name__)

SUBMITTER = "Transactions.submitter"
PROJECT = "Transactions.project"
INSTRUMENT = "Transactions.instrument"
_FIELDS = {SUBMITTER: "submitter", PROJECT: "project", INSTRUMENT: "instrument"}


@dataclass(frozen=True)
class TransactionParties:
    """The three values of a metadata document the policy decides on (None when absent)."""

    submitter: int | str | None = None
    project: str | None = None
    instrument: int | str | None = None

    def missing(self) -> list[str]:
        return [table for table, field in _FIELDS.items() if getattr(self, field) is None]


def parse_document(document: Any) -> TransactionParties:
    """The submitter/project/instrument of a metadata list; 400 ``invalid_metadata`` if it is not a list of objects.

    Two entries for one of these keys with different values are ambiguous and rejected too.
    """
    if not isinstance(document, list):
        raise BadRequest(f"metadata must be a JSON list of objects, not {kind_of(document)}",
                         code="invalid_metadata")
    found: dict[str, int | str] = {}
    for index, entry in enumerate(document):
        if not isinstance(entry, dict):
            raise BadRequest(f"metadata entry {index} is {kind_of(entry)}, not an object",
                             code="invalid_metadata")
        table = entry.get("destinationTable")
        if not isinstance(table, str) or table not in _FIELDS:
            # Files, TransactionKeyValue, Transactions._id ... are not the policy's business.
            continue
        value = _party_value(entry.get("value"), table, index)
        if value is None:
            continue
        if table in found and found[table] != value:
            raise BadRequest(f"metadata names two different {table} values: {found[table]!r} and {value!r}",
                             code="invalid_metadata")
        found[table] = value
    return TransactionParties(submitter=found.get(SUBMITTER), project=found.get(PROJECT),
                              instrument=found.get(INSTRUMENT))


def kind_of(value: Any) -> str:
    """A JSON value's kind for error messages ("a list", "null", ...)."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (dict, "an object"), (list, "a list"),
                       (str, "a string"), (int, "a number"), (float, "a number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


class IngestPolicy:
    """Decides whether a metadata document may be ingested, asking the metadata service."""

    def __init__(self, metadata: MetadataClient):
        self.directory = Directory(metadata)

    def check(self, document: list, uploader: int | None = None) -> None:
        """Return if the upload is allowed; else 412 ``policy_denied`` naming every failure.

        ``uploader`` is the authenticated user who sent the bundle (None when the ingest
        service runs without authentication): the submitter must be that user unless
        the uploader is an admin. 400 ``invalid_metadata`` for a document that is not a
        list of objects; the client's ``metadata_unavailable`` (503) propagates when the
        metadata service is down.
        """
        parties = parse_document(document)
        failures = [f"missing {table}" for table in parties.missing()]
        directory = self.directory

        user = project = instrument = None
        if parties.submitter is not None:
            user = directory.user(parties.submitter)
            if user is None:
                failures.append(f"unknown submitter {parties.submitter!r}")
        if parties.project is not None:
            project = directory.project(parties.project)
            if project is None:
                failures.append(f"unknown project {parties.project!r}")
        if parties.instrument is not None:
            instrument = directory.instrument(parties.instrument)
            if instrument is None:
                failures.append(f"unknown instrument {parties.instrument!r}")

        if uploader is not None and user is not None and user["_id"] != uploader \
                and not directory.is_admin(uploader):
            failures.append(f"submitter {user['_id']!r} is not the authenticated uploader {uploader!r}")

        # Relationships are only worth asking about between rows that exist.
        if user is not None and project is not None:
            user_id, project_id = user["_id"], project["_id"]
            if not directory.is_member(user_id, project_id) and not directory.is_admin(user_id):
                failures.append(f"submitter {user_id!r} is not a member of project {project_id!r}")
        if instrument is not None and project is not None and \
                not directory.is_linked(instrument["_id"], project["_id"]):
            failures.append(f"instrument {instrument['_id']!r} is not linked to project {project['_id']!r}")

        if failures:
            logger.info("ingest denied: %s", "; ".join(failures))
            raise PreconditionFailed("upload not allowed: " + "; ".join(failures), code="policy_denied")


def _party_value(value: Any, table: str, index: int) -> int | str | None:
    if isinstance(value, str):
        value = value.strip() or None
    if value is None:
        return None
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        if table == PROJECT:
            return str(value)
        # "10" and 10 name the same user; normalising keeps duplicates comparable.
        number = as_int(value)
        return value if number is None else number
    raise BadRequest(f"metadata entry {index} ({table}) has {kind_of(value)} value; "
                     f"expected an integer or a string", code="invalid_metadata")
