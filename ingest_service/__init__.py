"""The ingest service: uploads, the job table, the ingest pipeline, webhook subscriptions."""
from common.registry import EVENT, Service

SERVICE = Service(
    name="ingest", title="Ingest", port=8066, order=50,
    app="ingest_service.app:build_app",
    models="ingest_service.models",
    tasks=("ingest_service.tasks",), queue="ingest",
    periodic="ingest_service.tasks:periodic",
    commands="ingest_service.commands:add_commands",
    on_up="ingest_service.tasks:recover_at_up",
    listeners={EVENT: "ingest_service.tasks:on_event"},
    openapi="ingest_service.openapi:describe",
)
