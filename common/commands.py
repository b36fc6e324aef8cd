"""What every ``labvault`` command shares, wherever it is declared (``common.cli`` or a service)."""
from __future__ import annotations

import sys

from common import migrations, registry
from common.settings import Settings


class CommandError(Exception):
    """A command that cannot go on; the message is for the user, the code is the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def service_database(settings: Settings, service: str):
    """(database, schema) of a service that owns tables, bound to its settings URL."""
    return registry.get(service).database(settings)


def sync_all(settings: Settings, out=sys.stdout) -> None:
    """Create or upgrade the schema of every service that has tables, printing what was done."""
    for service in registry.with_tables():
        db, schema = service.database(settings)
        with db.connection_context():
            applied = migrations.sync(db, schema)
        done = ", ".join(f"{major}.{minor}" for major, minor in applied) or "nothing to do"
        print(f"{service.name}: schema {schema.version[0]}.{schema.version[1]} ({done})", file=out)


def id_value(value: str) -> int | str:
    """A command-line id: digits are an integer id, anything else a string id (projects)."""
    return int(value) if value.isdigit() else value
