"""Loading Pacifica seed data (users, groups, projects, instruments and their links).

A seed is a directory of Pacifica's per-table JSON files, or one JSON file mapping
table names to rows. Loading is an upsert, so loading the same seed twice leaves
the same rows; everything goes in one transaction.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import peewee

from common.errors import BadRequest, LabvaultError
from metadata_service.models import BaseModel, write_transaction
from metadata_service.objects import (TABLES, check_references, check_required, integrity_error, row_values,
                                      sync_sequence)

logger = logging.getLogger(__name__)

# Foreign-key order: a table comes after every table it references.
SEED_TABLES = ("users", "groups", "user_group", "projects", "instruments", "relationships",
               "project_user", "project_instrument", "instrument_user")


def _invalid(source: str, message: str) -> BadRequest:
    return BadRequest(f"seed {source}: {message}", code="invalid_seed")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _invalid(path.name, f"cannot read JSON ({exc})") from None


def read_seed(path: Path) -> list[tuple[str, str, Any]]:
    """``(table, source name, rows)`` in load order, from a seed directory or file."""
    path = Path(path)
    if path.is_dir():
        return [(table, f"{table}.json", _read_json(path / f"{table}.json"))
                for table in SEED_TABLES if (path / f"{table}.json").is_file()]
    if not path.is_file():
        raise _invalid(str(path), "no such file or directory")
    content = _read_json(path)
    if isinstance(content, list) and path.stem in SEED_TABLES:
        # One of Pacifica's per-table files given on its own.
        return [(path.stem, path.name, content)]
    if not isinstance(content, dict):
        raise _invalid(path.name, "must map table names to lists of rows")
    return [(table, f"{path.name}[{table}]", content[table]) for table in SEED_TABLES if table in content]


def load_seed(path: Path) -> dict[str, int]:
    """Upsert the seed at ``path``; returns rows loaded per table. BadRequest ``invalid_seed`` if malformed."""
    tables = read_seed(path)
    counts: dict[str, int] = {}
    with write_transaction():
        for table, source, rows in tables:
            if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
                raise _invalid(source, "must be a list of objects")
            model = TABLES[table]
            for index, data in enumerate(rows):
                try:
                    _upsert(model, data, f"{source}[{index}]")
                except LabvaultError as exc:
                    raise _invalid(source, f"{exc.message} ({exc.code})") from None
            sync_sequence(model)
            counts[table] = len(rows)
    logger.info("seed %s loaded: %s", path, counts)
    return counts


def _upsert(model: type[BaseModel], data: dict, what: str) -> None:
    values = row_values(model, data, what)
    check_references(model, values, what)
    key = _natural_key(model, values)
    # By name: a peewee field's == builds an expression, so `field in key` would always hold.
    key_names = {field.name for field in key}
    changes = {field: value for field, value in values.items()
               if not field.primary_key and field.name not in key_names}
    try:
        if key and model.select().where(*[field == values[field] for field in key]).exists():
            if changes:
                model.update(changes).where(*[field == values[field] for field in key]).execute()
            return
        check_required(model, values, what)
        insert = model.insert(values)
        if key:
            # Another loader may insert the row between our look and our insert: on
            # PostgreSQL writers do not queue at BEGIN as on SQLite. Its row then gets
            # our values instead of the load failing on the duplicate key.
            insert = (insert.on_conflict(conflict_target=key, update=changes) if changes
                      else insert.on_conflict(action="NOTHING", conflict_target=key))
        insert.execute()
    except (peewee.IntegrityError, peewee.DataError) as exc:
        raise integrity_error(exc, what, "insert") from None


def _natural_key(model: type[BaseModel], values: dict) -> list[peewee.Field]:
    """The fields naming the row ``values`` describes: its primary key, else a unique index; or none."""
    pk = model._meta.primary_key
    if pk in values:
        return [pk]
    for columns, unique in model._meta.indexes:
        fields = [model._meta.fields[name] for name in columns]
        if unique and all(field in values for field in fields):
            return fields
    for field in model._meta.sorted_fields:
        if field.unique and field in values:
            return [field]
    return []
