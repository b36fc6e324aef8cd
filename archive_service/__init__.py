"""The archive service: file bytes by file id, hash-verified and write-once."""
from common.registry import Service

SERVICE = Service(
    name="archive", title="Archive", port=8080, order=20,
    app="archive_service.app:build_app",
    models="archive_service.models",
    tasks=("archive_service.tasks",), queue="archive",
    periodic="archive_service.tasks:periodic",
    commands="archive_service.commands:add_commands",
    openapi="archive_service.openapi:describe",
)
