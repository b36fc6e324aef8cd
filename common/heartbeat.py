"""A claim's heartbeat: refreshed from a thread while work runs, so others can tell it is alive.

Used by every claim-holding worker (an ingest job's run, a stats run, a project build): the
claim is one conditional UPDATE of a row, ``touch()`` refreshes its heartbeat and answers the
rows it changed, and a claim whose heartbeat went stale may be taken over by another run.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

logger = logging.getLogger(__name__)


class Heartbeat:
    """While entered, calls ``touch()`` every ``interval`` seconds from a thread; ``lost`` tells
    that ``touch()`` changed no row (the claim went to another run). ``done()`` runs when the
    thread ends (closing the thread's own database connection)."""

    def __init__(self, touch: Callable[[], int], interval: float, name: str,
                 done: Callable[[], None] = lambda: None):
        self.touch, self.interval, self.name, self.done = touch, interval, name, done
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 30)

    def _beat(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                try:
                    if self.touch() == 0:
                        logger.warning("%s: the claim went to another run; stopping", self.name)
                        self._lost.set()
                        return
                except Exception:  # noqa: BLE001 - a database hiccup: the next beat tries again
                    logger.warning("%s failed", self.name, exc_info=True)
                    self.done()
        finally:
            self.done()
