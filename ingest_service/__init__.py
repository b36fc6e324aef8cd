"""The ingest service: uploads, the job table and the ingest pipeline."""
from common.registry import Service

SERVICE = Service(
    name="ingest", title="Ingest", port=8066, order=50,
    app="ingest_service.app:build_app",
    models="ingest_service.models",
    tasks=("ingest_service.tasks",), queue="ingest",
    periodic="ingest_service.tasks:periodic",
    commands="ingest_service.commands:add_commands",
    on_up="ingest_service.tasks:recover_at_up",
    openapi="ingest_service.openapi:describe",
)
