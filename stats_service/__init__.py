"""The stats service: statistics, figures and computed files derived from what was ingested."""
from common.registry import Service

SERVICE = Service(
    name="stats", title="Stats", port=8191, order=40,
    app="stats_service.app:build_app",
    tasks=("stats_service.tasks",), queue="stats",
)
