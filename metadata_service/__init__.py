"""The metadata service: users, projects, instruments, transactions, files; id allocation."""
from common.registry import Service

SERVICE = Service(
    name="metadata", title="Metadata", port=8121, order=10,
    app="metadata_service.app:build_app",
    models="metadata_service.models",
    commands="metadata_service.commands:add_commands",
    openapi="metadata_service.openapi:describe",
)
