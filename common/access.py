"""Who may do what, from the metadata service's rows: one home for the rules.

Membership of a project, admin rights and what a user may see are decided here for
every service (policy decisions, the ingest service's identities, stats, downloads),
so no two services can answer the same question differently. Rows whose ``deleted``
is set are not live and grant nothing.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol

from common.errors import LabvaultError


class MetadataRows(Protocol):
    """What the rules read: rows of the metadata service's tables (``common.clients.MetadataClient``)."""

    def query(self, objects: str, **filters) -> list[dict]: ...


def as_int(value: Any) -> int | None:
    """``value`` as an integer id if it is one (an int, or a string of digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.lstrip("-").isdigit():
            return int(text)
    return None


def is_true(value: Any) -> bool:
    """A boolean column however the metadata service renders it (true, 1, "true")."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "t", "yes")
    return bool(value)


class Directory:
    """Read-only facts about users, projects, instruments and their links, from the metadata service.

    Rows whose ``deleted`` is set are not live and grant nothing, so they are left out.
    """

    # Ids per request when fetching rows by id, to keep query strings short.
    BATCH = 100

    def __init__(self, metadata: MetadataRows):
        self.metadata = metadata

    def rows(self, table: str, **filters) -> list[dict]:
        """Live rows of ``table`` matching every filter (equality; a list value means any of)."""
        try:
            rows = self.metadata.query(table, **filters)
        except LabvaultError as exc:
            # A value the metadata service cannot even compare with the column (an id
            # out of range, a text too long) matches no row; anything else is a real error.
            if exc.code != "invalid_filter":
                raise
            return []
        return [row for row in rows if row.get("deleted") is None]

    def first(self, table: str, **filters) -> dict | None:
        rows = self.rows(table, **filters)
        return rows[0] if rows else None

    def by_ids(self, table: str, ids: Iterable[Any]) -> list[dict]:
        """Live rows of ``table`` whose ``_id`` is one of ``ids``, in the metadata service's order."""
        ids = list(dict.fromkeys(ids))
        found: list[dict] = []
        for start in range(0, len(ids), self.BATCH):
            # Never an empty filter: that would ask for every row of the table.
            found.extend(self.rows(table, _id=ids[start:start + self.BATCH]))
        return found

    def user(self, user_id: Any) -> dict | None:
        number = as_int(user_id)
        # A non-numeric id cannot match an integer key; no need to ask.
        return self.first("users", _id=number) if number is not None else None

    def user_by_network_id(self, network_id: str) -> dict | None:
        return self.first("users", network_id=network_id)

    def project(self, project_id: Any) -> dict | None:
        return self.first("projects", _id=str(project_id))

    def instrument(self, instrument_id: Any) -> dict | None:
        number = as_int(instrument_id)
        return self.first("instruments", _id=number) if number is not None else None

    def is_member(self, user_id: int, project_id: str) -> bool:
        return bool(self.rows("project_user", project=project_id, user=user_id))

    def is_linked(self, instrument_id: int, project_id: str) -> bool:
        return bool(self.rows("project_instrument", project=project_id, instrument=instrument_id))

    def is_admin(self, user_id: int) -> bool:
        """True when one of the user's groups has ``is_admin``."""
        group_ids = [link["group"] for link in self.rows("user_group", user=user_id)]
        return any(is_true(group.get("is_admin")) for group in self.by_ids("groups", group_ids))

    def may_see_project(self, user_id: int | None, project_id: str) -> bool:
        """Open mode (``user_id`` None), a member of the project, or an admin."""
        return user_id is None or self.is_member(user_id, project_id) or self.is_admin(user_id)


def may_see_owned(user_id: int | None, is_admin: bool, owner: int | None) -> bool:
    """Whether a requester sees a thing owned by ``owner`` (a job): open mode (``user_id`` None),
    its owner, or an admin. A thing owned by nobody (made while the deployment ran in open mode)
    is an admin's only: anyone could have made it, for anyone."""
    return user_id is None or is_admin or (owner is not None and owner == user_id)
