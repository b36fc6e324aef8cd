"""The metadata service's ``labvault`` commands: ``seed``."""
from __future__ import annotations

import sys
from pathlib import Path

from common import migrations
from common.commands import CommandError, has_schema, say_deployment, service_database
from common.errors import LabvaultError
from common.settings import Settings


def add_commands(add) -> None:
    seed = add("seed", cmd_seed, "Load users, projects, instruments, groups and relationships from seed files.")
    seed.add_argument("path", help="a directory of Pacifica seed files (users.json, projects.json, ...)")


def cmd_seed(args, settings: Settings) -> int:
    from metadata_service.seed import load_seed
    path = Path(args.path)
    if not path.exists():
        raise CommandError(f"{path} does not exist")
    say_deployment(args, settings)
    if not has_schema(settings, "metadata"):
        # Most often the wrong directory (seed run from elsewhere than `up`): say so loudly.
        print(f"labvault seed: WARNING: no labvault deployment at {settings.data_dir} yet; creating its "
              "metadata schema here. If the deployment is elsewhere, give --data-dir or LABVAULT_DATA_DIR",
              file=sys.stderr)
    db, schema = service_database(settings, "metadata")
    with db.connection_context():
        migrations.sync(db, schema)
        try:
            counts = load_seed(path)
        except LabvaultError as exc:
            raise CommandError(f"seed: {exc.as_exception_text()}") from None
    for table, count in counts.items():
        print(f"{table}: {count}")
    return 0
