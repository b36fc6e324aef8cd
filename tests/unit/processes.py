"""Run a function in several OS processes at once and collect what each returned.

For the concurrency tests: every process opens its own database connection (the
caller's is closed before forking, so none is inherited), and all of them wait on
one barrier so their work really overlaps.
"""
from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import peewee

# fork: the targets are test-module functions that need no pickling, and a child
# starts in milliseconds instead of re-importing the suite.
_CONTEXT = multiprocessing.get_context("fork")


def _child(index: int, target: Callable, args: tuple, barrier, results) -> None:
    try:
        barrier.wait(timeout=60)
        results.put((index, True, target(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((index, False, traceback.format_exc()))


def database_url(db: peewee.Database) -> str:
    """A URL that opens the same database as ``db`` (SQLite file or PostgreSQL) in another process."""
    if isinstance(db, peewee.SqliteDatabase):
        return f"sqlite:///{db.database}"
    params = db.connect_params
    user = params.get("user", "")
    return f"postgresql://{user}@{params.get('host', '')}:{params.get('port', 5432)}/{db.database}"


def run_processes(target: Callable[..., Any], calls: Sequence[tuple], databases: Sequence[peewee.Database] = (),
                  timeout: float = 120) -> list[Any]:
    """``target(*args)`` for each ``args`` in ``calls``, each in its own process, all at once.

    Returns the results in the order of ``calls``; a child's exception fails the caller
    with the child's traceback. ``databases`` are closed first so no child inherits a
    connection.
    """
    for db in databases:
        if not db.is_closed():
            db.close()
    barrier = _CONTEXT.Barrier(len(calls))
    results = _CONTEXT.Queue()
    children = [_CONTEXT.Process(target=_child, args=(n, target, tuple(args), barrier, results), daemon=True)
                for n, args in enumerate(calls)]
    for child in children:
        child.start()
    deadline = time.monotonic() + timeout
    answers: dict[int, Any] = {}
    try:
        while len(answers) < len(children):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {len(answers)} of {len(children)} processes answered in {timeout} s")
            try:
                index, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if any(child.exitcode not in (None, 0) for child in children):
                    crashed = [child.exitcode for child in children]
                    raise AssertionError(f"a process died without answering (exit codes {crashed})") from None
                continue
            if not ok:
                raise AssertionError(f"process {index} failed:\n{value}")
            answers[index] = value
    finally:
        for child in children:
            child.join(timeout=max(0.1, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join()
    return [answers[n] for n in range(len(children))]
