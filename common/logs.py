"""Logging set-up for every labvault process (services, workers, commands)."""
from __future__ import annotations

import logging

from common.settings import Settings


def setup_logging(settings: Settings) -> None:
    """Root logging at ``[log] level``, one line per record."""
    logging.basicConfig(level=settings.get("log", "level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
