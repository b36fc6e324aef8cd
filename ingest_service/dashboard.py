"""The dashboard's server side: its static files (package data) and where the page finds the
services. The page is plain HTML, JavaScript and CSS under ``ingest_service/static/``; it
calls the ingest service (same origin) and the stats service (cross-origin: the stats
service allows the dashboard's origin, ``[stats] cors_origins``).
"""
from __future__ import annotations

from importlib import resources

from common import registry
from common.errors import NotFound
from common.settings import Settings

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}


def public_url(settings: Settings, service: str) -> str:
    """The URL a browser reaches ``service`` at: ``[dashboard] <service>_url``, else ``[<service>] url``."""
    return (settings.get("dashboard", f"{service}_url", "").strip() or settings.service_url(service)).rstrip("/")


class DashboardFiles:
    """The shipped files by name (nothing else is ever read), and the page's configuration."""

    def __init__(self, settings: Settings, auth_mode: str):
        folder = resources.files("ingest_service") / "static"
        self.files = {entry.name: entry for entry in folder.iterdir()
                      if entry.is_file() and any(entry.name.endswith(suffix) for suffix in TYPES)}
        self.settings = settings
        self.auth_mode = auth_mode

    def read(self, name: str) -> tuple[str, bytes]:
        """``(content type, bytes)`` of a shipped file, or 404."""
        entry = self.files.get(name)
        if entry is None:
            raise NotFound(f"the dashboard has no file {name[:80]!r}", code="not_found")
        return TYPES["." + name.rpartition(".")[2]], entry.read_bytes()

    def config(self) -> dict:
        return {"ingest": public_url(self.settings, "ingest"), "stats": public_url(self.settings, "stats"),
                "auth_mode": self.auth_mode, "services": registry.names()}
