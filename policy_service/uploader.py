"""The Pacifica upload-client query: ``{"user", "from", "columns", "where"}`` → rows.

Upload clients use it to offer a user the projects and instruments they may upload
with. Answers only ever show what the requesting user may see: their projects, the
instruments linked to them, their fellow members (everything, for an admin).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from common.clients import MetadataClient
from common.errors import BadRequest, PreconditionFailed
from common.access import Directory, as_int
from policy_service.policy import kind_of

logger = logging.getLogger(__name__)

# "proposals" is what Pacifica called projects; its upload clients still send it.
TABLES = {"users": "users", "projects": "projects", "proposals": "projects", "instruments": "instruments"}
WHERE_ALIASES = {"proposal_id": "project_id"}
# A filter a table does not understand is refused rather than ignored: ignoring it
# would answer a wider question than the client asked.
WHERE_KEYS = {
    "users": {"_id", "network_id", "project_id"},
    "projects": {"_id", "project_id", "instrument_id"},
    "instruments": {"_id", "project_id", "instrument_id"},
}
# Filters that contradict each other (or an id that cannot exist) select nothing.
NO_MATCH = object()


@dataclass(frozen=True)
class UploaderQuery:
    """A validated query: ``table`` is canonical, ``where`` keys are canonical (no aliases)."""

    user: int | str
    table: str
    columns: tuple[str, ...] = ()
    where: dict[str, int | str] = field(default_factory=dict)


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_query")


def parse_query(body: Any) -> UploaderQuery:
    """Validate an uploader query body; 400 ``invalid_query`` naming what is wrong."""
    if not isinstance(body, dict):
        raise _invalid(f"the query must be a JSON object, not {kind_of(body)}")
    user = body.get("user")
    if isinstance(user, str):
        user = user.strip()
    if user is None or user == "":
        raise _invalid("the query has no 'user'")
    if isinstance(user, bool) or not isinstance(user, (int, str)):
        raise _invalid(f"'user' must be a user id or a network id, not {kind_of(user)}")
    source = body.get("from")
    if source is None:
        raise _invalid("the query has no 'from'")
    table = TABLES.get(source) if isinstance(source, str) else None
    if table is None:
        raise _invalid(f"cannot query from {source!r}; use one of users, projects, instruments")
    return UploaderQuery(user=user, table=table, columns=_columns(body.get("columns")),
                         where=_where(body.get("where"), table))


def _columns(columns: Any) -> tuple[str, ...]:
    if columns is None:
        return ()
    if not isinstance(columns, list) or not all(isinstance(name, str) for name in columns):
        raise _invalid("'columns' must be a list of column names")
    return tuple(columns)


def _where(where: Any, table: str) -> dict[str, int | str]:
    if where is None:
        return {}
    if not isinstance(where, dict):
        raise _invalid(f"'where' must be an object, not {kind_of(where)}")
    clean: dict[str, int | str] = {}
    for key, value in where.items():
        name = WHERE_ALIASES.get(key, key)
        if name not in WHERE_KEYS[table]:
            raise _invalid(f"cannot filter {table} by {key!r}; use {', '.join(sorted(WHERE_KEYS[table]))}")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _invalid(f"where {key!r} must be a number or a string, not {kind_of(value)}")
        value = str(value) if name in ("project_id", "network_id") else value
        if name in clean and clean[name] != value:
            raise _invalid(f"where gives two different {name} values")
        clean[name] = value
    return clean


def select_columns(row: dict, columns: Iterable[str]) -> dict:
    """``row`` reduced to ``columns`` (all of it when none are named); absent columns are left out."""
    columns = tuple(columns)
    if not columns:
        return dict(row)
    return {name: row[name] for name in columns if name in row}


class UploaderQueries:
    """Answers upload-client queries from the metadata service, as the requesting user sees it."""

    def __init__(self, metadata: MetadataClient):
        self.directory = Directory(metadata)

    def answer(self, body: Any) -> list[dict]:
        """The rows the query asks for, reduced to its columns.

        400 ``invalid_query`` for a malformed query; 412 ``unknown_user`` when the
        requesting user does not exist; ``[]`` for what the user may not see.
        """
        query = parse_query(body)
        if query.table == "users" and {"_id", "network_id"} & set(query.where) and "project_id" not in query.where:
            # A directory lookup, answered for anyone: Pacifica upload clients resolve
            # their own network id to a user id this way, asking as user -1.
            user = None
        else:
            user = self.requester(query.user)
        handler: Callable[[dict, dict], list[dict]] = {
            "users": self._users, "projects": self._projects, "instruments": self._instruments,
        }[query.table]
        return [select_columns(row, query.columns) for row in handler(user, query.where)]

    def requester(self, user: int | str) -> dict:
        """The requesting user's row, by ``_id`` if int-like, else by network id; 412 ``unknown_user``."""
        row = self.directory.user(user) if as_int(user) is not None else None
        if row is None and isinstance(user, str):
            # A network id may be all digits; only after the id lookup failed is that the reading.
            row = self.directory.user_by_network_id(user)
        if row is None:
            logger.info("uploader query by unknown user %r", user)
            raise PreconditionFailed(f"unknown user {user!r}", code="unknown_user")
        return row

    # -- one handler per table ---------------------------------------------------

    def _users(self, user: dict | None, where: dict) -> list[dict]:
        directory = self.directory
        found: list[dict] | None = None
        if "_id" in where:
            found = _present([directory.user(where["_id"])])
        if "network_id" in where:
            found = _intersect(found, _present([directory.user_by_network_id(str(where["network_id"]))]))
        if "project_id" in where:
            project_id = str(where["project_id"])
            if not self._sees_project(user, project_id):
                return []
            member_ids = _unique(link["user"] for link in directory.rows("project_user", project=project_id))
            found = _intersect(found, directory.by_ids("users", member_ids))
        # No filter asks "who am I": the uploader's own row.
        return [user] if found is None else found

    def _projects(self, user: dict, where: dict) -> list[dict]:
        directory = self.directory
        wanted = _same_or_none(where, "_id", "project_id", str)
        if wanted is NO_MATCH:
            return []
        admin = directory.is_admin(user["_id"])
        if wanted is None and "instrument_id" not in where and admin:
            return directory.rows("projects")

        candidates: list[str] | None = None if wanted is None else [wanted]
        if "instrument_id" in where:
            instrument_id = as_int(where["instrument_id"])
            linked = [] if instrument_id is None else _unique(
                str(link["project"]) for link in directory.rows("project_instrument", instrument=instrument_id))
            candidates = linked if candidates is None else [p for p in candidates if p in linked]
        if not admin:
            mine = self._member_projects(user)
            candidates = mine if candidates is None else [p for p in candidates if p in mine]
        return directory.by_ids("projects", candidates)

    def _instruments(self, user: dict, where: dict) -> list[dict]:
        directory = self.directory
        wanted = _same_or_none(where, "_id", "instrument_id", as_int)
        if wanted is NO_MATCH:
            return []
        admin = directory.is_admin(user["_id"])

        candidates: list[int] | None
        if "project_id" in where:
            project_id = str(where["project_id"])
            if not admin and not directory.is_member(user["_id"], project_id):
                return []
            candidates = self._linked_instruments([project_id])
        elif admin:
            candidates = None
        else:
            candidates = self._linked_instruments(self._member_projects(user))

        if wanted is not None:
            candidates = [wanted] if candidates is None or wanted in candidates else []
        if candidates is None:
            return directory.rows("instruments")
        return directory.by_ids("instruments", candidates)

    # -- helpers ------------------------------------------------------------------

    def _member_projects(self, user: dict) -> list[str]:
        return _unique(str(link["project"]) for link in self.directory.rows("project_user", user=user["_id"]))

    def _linked_instruments(self, project_ids: Iterable[str]) -> list[int]:
        return _unique(link["instrument"] for project_id in project_ids
                       for link in self.directory.rows("project_instrument", project=project_id))

    def _sees_project(self, user: dict, project_id: str) -> bool:
        return self.directory.is_member(user["_id"], project_id) or self.directory.is_admin(user["_id"])


def _same_or_none(where: dict, first: str, second: str, convert: Callable[[Any], Any]):
    """The one id ``where`` asks for under either name; None if neither; NO_MATCH if no row can match."""
    values = {convert(where[name]) for name in (first, second) if name in where}
    if not values:
        return None
    if len(values) > 1 or None in values:
        return NO_MATCH
    return values.pop()


def _unique(values: Iterable) -> list:
    """``values`` without repeats, in first-seen order."""
    return list(dict.fromkeys(values))


def _present(rows: Iterable[dict | None]) -> list[dict]:
    return [row for row in rows if row is not None]


def _intersect(found: list[dict] | None, rows: list[dict]) -> list[dict]:
    if found is None:
        return rows
    ids = {row["_id"] for row in rows}
    return [row for row in found if row["_id"] in ids]
