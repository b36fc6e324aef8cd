"""The stats service: statistics, figures and computed files derived from what was ingested."""
from common.registry import INGESTED, Service

SERVICE = Service(
    name="stats", title="Stats", port=8191, order=40,
    app="stats_service.app:build_app",
    models="stats_service.models",
    tasks=("stats_service.tasks",), queue="stats",
    periodic="stats_service.tasks:periodic",
    commands="stats_service.commands:add_commands",
    listeners={INGESTED: "stats_service.tasks:on_ingested"},
    openapi="stats_service.openapi:describe",
)
