"""What every ``labvault`` command shares, wherever it is declared (``common.cli`` or a service)."""
from __future__ import annotations

import argparse
import os
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


def has_schema(settings: Settings, service: str) -> bool:
    """Whether the service's database has a schema at all (a deployment exists there)."""
    db, schema = service_database(settings, service)
    with db.connection_context():
        return migrations.current_version(db, schema) is not None


def deployed_database(settings: Settings, service: str):
    """(database, schema) of a deployment that exists, or a CommandError saying how to make one."""
    if not has_schema(settings, service):
        raise CommandError(f"no labvault deployment at {settings.data_dir} (the {service} database has no "
                           f"schema); run 'labvault up' (or 'labvault dbsync') first, or point --data-dir, "
                           f"LABVAULT_DATA_DIR or --config at the deployment", 2)
    return service_database(settings, service)


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


def data_dir_source(args: argparse.Namespace, settings: Settings) -> str:
    """Where the data directory came from, as the user can check it: the same order as ``Settings``."""
    if args.data_dir:
        return "--data-dir"
    if os.environ.get("LABVAULT_DATA_DIR"):
        return "LABVAULT_DATA_DIR"
    if settings.source is not None:
        return f"[data] dir of {settings.source}"
    return "the default ./var of the working directory"


def say_deployment(args: argparse.Namespace, settings: Settings) -> None:
    """One line on stderr: which deployment a command works on, so a wrong one is seen at once."""
    print(f"labvault {args.command}: data directory {settings.data_dir} (from {data_dir_source(args, settings)})",
          file=sys.stderr)
