"""The policy service: who may upload what; Pacifica uploader queries."""
from common.registry import Service

SERVICE = Service(
    name="policy", title="Policy", port=8181, order=30,
    app="policy_service.app:build_app",
    openapi="policy_service.openapi:describe",
)
