"""Id allocation (Pacifica's uniqueid ``getid``): consecutive id ranges per mode.

The counter row of a mode is locked for the whole allocation (SQLite: the write
lock taken at BEGIN IMMEDIATE; PostgreSQL: SELECT ... FOR UPDATE), so concurrent
callers in any number of processes get disjoint ranges.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import peewee

from common.db import is_sqlite
from common.errors import BadRequest
from metadata_service.models import Files, IdCounter, Transactions, database, write_transaction

logger = logging.getLogger(__name__)

MODE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_RANGE = 1_000_000
# Modes whose ids also name rows that may be inserted directly (seed, REST PUT):
# allocation always starts above the largest such id.
ROW_FLOORS = {"upload_job": Transactions.id, "file": Files.id}


def check_mode(mode: Any) -> str:
    """A valid mode name, or BadRequest ``invalid_mode``."""
    if not isinstance(mode, str) or not MODE_PATTERN.match(mode):
        raise BadRequest(f"mode must match {MODE_PATTERN.pattern}, not {str(mode)[:70]!r}", code="invalid_mode")
    return mode


def check_range(count: Any) -> int:
    """A range size 1..MAX_RANGE (int or decimal text), or BadRequest ``invalid_range``."""
    number = None
    if isinstance(count, int) and not isinstance(count, bool):
        number = count
    elif isinstance(count, str) and re.fullmatch(r"\s*\d{1,7}\s*", count):
        number = int(count)
    if number is None or not 1 <= number <= MAX_RANGE:
        raise BadRequest(f"range must be an integer from 1 to {MAX_RANGE}, not {str(count)[:40]!r}",
                         code="invalid_range")
    return number


def allocate(mode: str, count: int) -> tuple[int, int]:
    """Reserve ``count`` consecutive ids of ``mode``; returns (first, last)."""
    mode, count = check_mode(mode), check_range(count)
    with write_transaction():
        (IdCounter.insert(mode=mode, next_id=1)
         .on_conflict(action="NOTHING", conflict_target=[IdCounter.mode]).execute())
        select = IdCounter.select(IdCounter.next_id).where(IdCounter.mode == mode)
        if not is_sqlite(database):
            # SQLite has no row locks (and no FOR UPDATE): BEGIN IMMEDIATE already serialises.
            select = select.for_update()
        start = select.scalar()
        floor_field = ROW_FLOORS.get(mode)
        if floor_field is not None:
            highest = floor_field.model.select(peewee.fn.MAX(floor_field)).scalar()
            start = max(start, (highest or 0) + 1)
        IdCounter.update(next_id=start + count).where(IdCounter.mode == mode).execute()
    logger.debug("getid %s: %d..%d", mode, start, start + count - 1)
    return start, start + count - 1


def getid(mode: Any, count: Any) -> dict[str, int]:
    """The Pacifica answer ``{"startIndex": s, "endIndex": s + count - 1}``."""
    start, end = allocate(check_mode(mode), check_range(count))
    return {"startIndex": start, "endIndex": end}
