"""Pacifica-style object REST for every metadata model: query, insert, update, delete.

Client-supplied names are only ever looked up in a model's own field table and
values only reach SQL as bound parameters of peewee expressions. The value rules
(lenient dates, mimetypes, hashes, subdirs) live here too; ingest and seed use them.
"""
from __future__ import annotations

import datetime
import logging
import re
from typing import Any, Callable, Iterable, Mapping

import peewee
from dateutil import parser as date_parser
from dateutil import tz

from common.bundles import payload_key
from common.db import is_postgres
from common.errors import BadRequest, Conflict, LabvaultError, NotFound
from common.hashing import DEFAULT_HASH_TYPE, check_digest_length, normalise_hashsum, normalise_hashtype
from metadata_service import ids
from metadata_service.models import (OBJECT_MODELS, BaseModel, Files, Transactions, database, utcnow,
                                     write_transaction)

logger = logging.getLogger(__name__)

TABLES: dict[str, type[BaseModel]] = {model._meta.table_name: model for model in OBJECT_MODELS}
# Pacifica clients send these to shape nested answers; rows here are always flat.
IGNORED_PARAMS = frozenset({"recursion_depth", "recursion_limit", "recursion_exclude"})
DEFAULT_ITEMS_PER_PAGE = 100
# Rows inserted without an id take one from getid, so they never collide with ids
# already handed to an upload still in flight.
AUTO_ID_MODES = {Transactions: "upload_job", Files: "file"}

# --------------------------------------------------------------------------- values

# Pacifica clients write `date` output, so US zone abbreviations are common; dateutil
# knows none of them by itself.
ZONE_OFFSETS = {"UTC": 0, "UT": 0, "GMT": 0, "Z": 0,
                "EST": -5, "EDT": -4, "CST": -6, "CDT": -5, "MST": -7, "MDT": -6,
                "PST": -8, "PDT": -7, "AKST": -9, "AKDT": -8, "HST": -10, "HDT": -9}
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")
_BASIC_ISO_DATE = re.compile(r"^\d{8}$")
# Missing parts of a partial date default to the start of the period, not to today.
_DATE_DEFAULT = datetime.datetime(1970, 1, 1)

_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MIMETYPE = re.compile(rf"^{_RESTRICTED_NAME}/{_RESTRICTED_NAME}"
                       rf"(\s*;\s*{_TOKEN}=({_TOKEN}|\"([^\"\\]|\\.)*\"))*$")


class _UnknownZone(ValueError):
    pass


def _zone(name: str | None, offset: int | None):
    if name and name.upper() in ZONE_OFFSETS:
        return tz.tzoffset(name, ZONE_OFFSETS[name.upper()] * 3600)
    if offset is not None:
        return tz.tzoffset(name, offset)
    if name:
        # A zone we cannot place would silently shift the time by hours.
        raise _UnknownZone(f"unknown time zone {name!r}")
    return None


def _parse_moment(value: Any, what: str, code: str) -> datetime.datetime | None:
    """The moment as written: aware when the text names a zone or offset, else naive."""
    if value is None or isinstance(value, datetime.datetime):
        return value
    if isinstance(value, datetime.date):
        return datetime.datetime.combine(value, datetime.time())
    try:
        if isinstance(value, bool):
            raise ValueError("not a date")
        if isinstance(value, (int, float)):
            return datetime.datetime.fromtimestamp(value, datetime.UTC)
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            if _NUMBER.match(text) and not _BASIC_ISO_DATE.match(text):
                return datetime.datetime.fromtimestamp(float(text), datetime.UTC)
            return date_parser.parse(text, default=_DATE_DEFAULT, tzinfos=_zone)
    except (ValueError, OverflowError, OSError) as exc:
        raise BadRequest(f"{what}: cannot read {str(value)[:60]!r} as a date ({exc})", code=code) from None
    raise BadRequest(f"{what}: a date must be a string or a number, not {type(value).__name__}", code=code)


def parse_datetime(value: Any, what: str = "date", code: str = "invalid_date") -> datetime.datetime | None:
    """ISO-8601, Pacifica's "Tue Nov 29 14:09:05 PST 2016", or epoch seconds, as naive UTC.

    None and "" give None; anything unreadable raises BadRequest ``code``.
    """
    moment = _parse_moment(value, what, code)
    if moment is None or moment.tzinfo is None:
        return moment
    try:
        return moment.astimezone(datetime.UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise BadRequest(f"{what}: {str(value)[:60]!r} is out of range", code=code) from None


def parse_date(value: Any, what: str = "date", code: str = "invalid_date") -> datetime.date | None:
    """The calendar date as written (no zone shift) of anything ``parse_datetime`` reads."""
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value
    moment = _parse_moment(value, what, code)
    return None if moment is None else moment.date()


def check_mimetype(value: Any, what: str = "mimetype") -> str:
    """An RFC 6838 ``type/subtype`` (parameters allowed), or BadRequest ``invalid_mimetype``."""
    text = value.strip() if isinstance(value, str) else ""
    if not _MIMETYPE.match(text) or len(text) > 255:
        raise BadRequest(f"{what}: {str(value)[:80]!r} is not a type/subtype media type", code="invalid_mimetype")
    return text


def check_hashtype(value: Any, what: str = "hashtype") -> str | None:
    """A supported hash type name, lower-cased, or BadRequest ``unsupported_hashtype``."""
    if value is None:
        return None
    try:
        return normalise_hashtype(value)
    except LabvaultError as exc:
        raise BadRequest(f"{what}: {exc.message}", code=exc.code) from None


def check_hash(hashtype: Any, hashsum: Any, what: str = "hash") -> tuple[str, str]:
    """Normalised ``(hashtype, hashsum)``; ``unsupported_hashtype`` or ``invalid_hashsum``."""
    try:
        kind = normalise_hashtype(hashtype or DEFAULT_HASH_TYPE)
        digest = normalise_hashsum(hashsum, kind)
        check_digest_length(kind, digest)
    except LabvaultError as exc:
        raise BadRequest(f"{what}: {exc.message}", code=exc.code) from None
    return kind, digest


def check_text(value: str, what: str, code: str = "invalid_value") -> str:
    """``value`` if every database can store it, else BadRequest ``code``.

    PostgreSQL text cannot hold NUL, and no database takes a lone surrogate (JSON's
    "\\ud800" decodes to one); SQLite would keep the NUL, so refuse it everywhere alike.
    """
    if "\0" in value:
        raise BadRequest(f"{what}: text may not contain NUL characters", code=code)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what}: text is not valid Unicode (a lone surrogate)", code=code) from None
    return value


def normalise_subdir(value: Any, what: str = "subdir", code: str = "invalid_metadata") -> str:
    """``data//a/b/``, ``data/a/b`` and ``a/b`` all give ``a/b``; ``..`` is refused with ``code``."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{what}: subdir must be a string", code=code)
    check_text(value, f"{what}: subdir", code)
    key = payload_key(value)
    if ".." in key.split("/"):
        raise BadRequest(f"{what}: subdir {value[:80]!r} climbs out with '..'", code=code)
    return key


# --------------------------------------------------------------------------- fields

def json_name(field: peewee.Field) -> str:
    """The name a field has in JSON: its own, except a primary key ``id`` is ``_id``."""
    return "_id" if field.name == "id" else field.name


def model_for(table: str) -> type[BaseModel]:
    """The model behind a REST endpoint name, or NotFound."""
    model = TABLES.get(table)
    if model is None:
        raise NotFound(f"no such object type {table[:60]!r}", code="not_found")
    return model


def _fields_by_name(model: type[BaseModel]) -> dict[str, peewee.Field]:
    fields = {json_name(field): field for field in model._meta.sorted_fields}
    # `_id` always names the primary key, whatever the key is called.
    fields.setdefault("_id", model._meta.primary_key)
    return fields


def _kind(field: peewee.Field) -> str:
    if isinstance(field, peewee.ForeignKeyField):
        return _kind(field.rel_field)
    if isinstance(field, peewee.BooleanField):
        return "bool"
    if isinstance(field, peewee.DateTimeField):
        return "datetime"
    if isinstance(field, peewee.DateField):
        return "date"
    if isinstance(field, peewee.IntegerField):
        big = field.field_type in ("BIGINT", "BIGAUTO")
        return "bigint" if big else "int"
    return "text"


_INT_LIMITS = {"int": 2 ** 31, "bigint": 2 ** 63}
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def coerce(field: peewee.Field, value: Any, what: str, code: str = "invalid_value",
           date_code: str = "invalid_date") -> Any:
    """``value`` (JSON or query text) as the Python value of ``field``.

    A value of the wrong kind raises BadRequest ``code`` (``date_code`` for dates).
    """
    name = json_name(field)
    if value is None:
        if field.null:
            return None
        raise BadRequest(f"{what}: {name} may not be null", code=code)
    kind = _kind(field)
    if kind in _INT_LIMITS:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer() or isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,20}\s*", value):
            number = int(value)
        if number is None or not -_INT_LIMITS[kind] <= number < _INT_LIMITS[kind]:
            raise BadRequest(f"{what}: {name} must be an integer, not {str(value)[:40]!r}", code=code)
        return number
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else ""
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise BadRequest(f"{what}: {name} must be true or false, not {str(value)[:40]!r}", code=code)
    if kind == "datetime":
        return parse_datetime(value, f"{what}: {name}", date_code)
    if kind == "date":
        return parse_date(value, f"{what}: {name}", date_code)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRequest(f"{what}: {name} must be a string, not {type(value).__name__}", code=code)
    check_text(value, f"{what}: {name}", code)
    # PostgreSQL's varchar(n) counts characters, as len() does; SQLite would keep any length.
    max_length = getattr(field, "max_length", None)
    if isinstance(field, peewee.CharField) and max_length and len(value) > max_length:
        raise BadRequest(f"{what}: {name} is longer than {max_length} characters", code=code)
    return value


def _check_size(value, what):
    if value is not None and value < 0:
        raise BadRequest(f"{what}: size must not be negative", code="invalid_value")
    return value


# Extra rules for values of particular fields, on top of their type.
_FIELD_RULES: dict[peewee.Field, Callable[[Any, str], Any]] = {
    Files.mimetype: check_mimetype,
    Files.hashtype: check_hashtype,
    Files.size: _check_size,
    Files.subdir: lambda value, what: normalise_subdir(value, what, "invalid_value"),
}


def row_values(model: type[BaseModel], data: Mapping[str, Any], what: str) -> dict[peewee.Field, Any]:
    """A JSON object's fields as ``{field: value}``, checked; unknown names give ``unknown_field``."""
    fields = _fields_by_name(model)
    values: dict[peewee.Field, Any] = {}
    for name, raw in data.items():
        field = fields.get(name)
        if field is None:
            raise BadRequest(f"{what}: {model._meta.table_name} has no field {str(name)[:60]!r}",
                             code="unknown_field")
        if field.primary_key and raw is None:
            continue  # an absent key: the default or the database assigns one
        value = coerce(field, raw, what)
        rule = _FIELD_RULES.get(field)
        values[field] = rule(value, f"{what}: {name}") if rule else value
    if model is Files and values.get(Files.hashsum) is not None:
        hashtype, hashsum = check_hash(values.get(Files.hashtype), values[Files.hashsum], what)
        values[Files.hashtype], values[Files.hashsum] = hashtype, hashsum
    return values


def output_fields(model: type[BaseModel]) -> list[peewee.Field]:
    """A model's fields in the order rows show them: key, own fields, then the timestamps."""
    stamps = ("created", "updated", "deleted")
    own = [field for field in model._meta.sorted_fields if field.name not in stamps and not field.primary_key]
    return [model._meta.primary_key] + own + [model._meta.fields[name] for name in stamps]


def row_dict(model: type[BaseModel], row: Iterable[Any]) -> dict[str, Any]:
    return dict(zip((json_name(field) for field in output_fields(model)), row))


def check_references(model: type[BaseModel], values: Mapping[peewee.Field, Any], what: str) -> None:
    """Every foreign key in ``values`` names an existing row, or BadRequest ``unknown_reference``."""
    for field in model._meta.refs:
        value = values.get(field)
        if value is not None and not field.rel_model.select().where(field.rel_field == value).exists():
            raise BadRequest(f"{what}: {field.name} {value!r} names no row of {field.rel_model._meta.table_name}",
                             code="unknown_reference")


def integrity_error(exc: peewee.DatabaseError, what: str, action: str) -> LabvaultError:
    """The client error for a constraint the database refused (the checks before lost a race)."""
    original = exc.args[0] if exc.args else exc
    state = str(getattr(original, "pgcode", None) or getattr(original, "sqlstate", None) or "")
    text = str(original).lower()
    if isinstance(exc, peewee.DataError):
        return BadRequest(f"{what}: a value does not fit its column", code="invalid_value")
    if state == "23503" or "foreign key" in text:
        if action == "delete":
            return Conflict(f"{what}: rows are still referenced by other rows", code="in_use")
        return BadRequest(f"{what}: a reference names no existing row", code="unknown_reference")
    if state == "23502" or "not null" in text or "not-null" in text:
        return BadRequest(f"{what}: a required field is missing", code="missing_field")
    return Conflict(f"{what}: a row with the same key already exists", code="duplicate_id")


def _run(statement: peewee.Query, what: str, action: str) -> int:
    try:
        return statement.execute()
    except (peewee.IntegrityError, peewee.DataError) as exc:
        logger.info("%s refused by the database: %s", what, exc)
        raise integrity_error(exc, what, action) from None


# --------------------------------------------------------------------------- REST

def _positive(params: dict, name: str) -> int | None:
    raw = params.pop(name, None)
    if raw is None:
        return None
    try:
        number = int(str(raw).strip())
    except ValueError:
        number = 0
    if number < 1:
        raise BadRequest(f"{name} must be a positive integer, not {str(raw)[:40]!r}", code=f"invalid_{name}")
    return number


def _filter_value(field: peewee.Field, raw: Any) -> Any:
    return coerce(field, raw, "filter", "invalid_filter", "invalid_filter")


def filter_conditions(model: type[BaseModel], params: Mapping[str, Any], required: bool = False) -> list:
    """Query parameters as peewee conditions; a repeated parameter matches any of its values."""
    fields = _fields_by_name(model)
    conditions = []
    for name, raw in params.items():
        if name in IGNORED_PARAMS:
            continue
        field = fields.get(name)
        if field is None:
            raise BadRequest(f"{model._meta.table_name} has no field {str(name)[:60]!r} to filter on",
                             code="unknown_field")
        if isinstance(raw, (list, tuple)):
            conditions.append(field.in_([_filter_value(field, item) for item in raw]))
        else:
            value = _filter_value(field, raw)
            conditions.append(field.is_null() if value is None else field == value)
    if required and not conditions:
        raise BadRequest(f"{model._meta.table_name}: give at least one field=value filter",
                         code="filter_required")
    return conditions


def query(table: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of ``table`` matching ``params`` (field filters, optional paging), by primary key."""
    model = model_for(table)
    params = dict(params)
    page = _positive(params, "page_number")
    per_page = _positive(params, "items_per_page")
    conditions = filter_conditions(model, params)
    select = model.select(*output_fields(model)).order_by(sort_key(model._meta.primary_key))
    if conditions:
        select = select.where(*conditions)
    if page is not None or per_page is not None:
        select = select.paginate(page or 1, per_page or DEFAULT_ITEMS_PER_PAGE)
    return [row_dict(model, row) for row in select.tuples()]


def sort_key(field: peewee.Field) -> peewee.Node:
    """``field`` for ORDER BY, text in code point order on every database.

    SQLite compares text bytewise; PostgreSQL by the database's collation, which in
    the usual en_US locale puts "1234a" before "1234A" and ignores punctuation. The
    "C" collation is PostgreSQL's bytewise order, so pages come out the same everywhere.
    """
    if is_postgres(database) and isinstance(field, (peewee.CharField, peewee.TextField)):
        return field.collate('"C"')
    return field


def insert(table: str, body: Any) -> int:
    """Insert one object or a list of them, all or none; returns how many."""
    model = model_for(table)
    rows = [body] if isinstance(body, dict) else body
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise BadRequest(f"{table}: send an object or a list of objects", code="invalid_object")
    pk = model._meta.primary_key
    seen = set()
    with write_transaction():
        for index, data in enumerate(rows):
            what = f"{table}[{index}]"
            values = row_values(model, data, what)
            if pk not in values and model in AUTO_ID_MODES:
                values[pk] = ids.allocate(AUTO_ID_MODES[model], 1)[0]
            check_required(model, values, what)
            key = values.get(pk)
            if key is not None and (key in seen or model.select().where(pk == key).exists()):
                raise Conflict(f"{what}: {table} {json_name(pk)} {key!r} already exists", code="duplicate_id")
            seen.add(key)
            check_references(model, values, what)
            _run(model.insert(values), what, "insert")
        if seen - {None}:  # some rows came with their own ids
            sync_sequence(model)
    return len(rows)


def sync_sequence(model: type[BaseModel]) -> None:
    """After rows were inserted with explicit ids, move a PostgreSQL serial key past them.

    PostgreSQL's sequence does not see explicit ids, so the next automatic id could
    collide with one; SQLite already takes max(id) + 1 by itself. The sequence never
    moves back: a lower max(id) can mean rows a concurrent transaction has not
    committed yet, whose ids came from the sequence.
    """
    pk = model._meta.primary_key
    if not is_postgres(database) or not isinstance(pk, peewee.AutoField):
        return
    table, column = model._meta.table_name, pk.column_name
    database.execute_sql(
        f'SELECT setval(seq, GREATEST((SELECT COALESCE(MAX("{column}"), 0) FROM "{table}"), '
        f'COALESCE(pg_sequence_last_value(seq), 0)) + 1, false) '
        f'FROM (SELECT pg_get_serial_sequence(%s, %s)::regclass AS seq) AS serial',
        (f'"{table}"', column))


def check_required(model: type[BaseModel], values: Mapping[peewee.Field, Any], what: str) -> None:
    """Every field without a default is given, or BadRequest ``missing_field``."""
    for field in model._meta.sorted_fields:
        if (field not in values and not field.null and field.default is None
                and not isinstance(field, peewee.AutoField)):
            raise BadRequest(f"{what}: {json_name(field)} is required", code="missing_field")


def update(table: str, params: Mapping[str, Any], body: Any) -> int:
    """Set the fields in ``body`` on every row matching the (required) filters; returns how many."""
    model = model_for(table)
    conditions = filter_conditions(model, params, required=True)
    if not isinstance(body, dict) or not body:
        raise BadRequest(f"{table}: send an object of the fields to set", code="invalid_object")
    what = f"{table} update"
    values = row_values(model, body, what)
    if model._meta.primary_key in values:
        raise BadRequest(f"{what}: the primary key cannot be changed", code="immutable_field")
    values.setdefault(model.updated, utcnow())
    with write_transaction():
        check_references(model, values, what)
        return _run(model.update(values).where(*conditions), what, "update")


def delete(table: str, params: Mapping[str, Any]) -> int:
    """Delete every row matching the (required) filters; ``in_use`` if another row refers to one."""
    model = model_for(table)
    conditions = filter_conditions(model, params, required=True)
    what = f"{table} delete"
    with write_transaction():
        for fk, referencing in model._meta.backrefs.items():
            targets = model.select(fk.rel_field).where(*conditions)
            if referencing.select().where(fk.in_(targets)).exists():
                raise Conflict(f"{what}: rows of {referencing._meta.table_name} still refer to them",
                               code="in_use")
        return _run(model.delete().where(*conditions), what, "delete")
