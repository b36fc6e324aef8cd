"""What ``labvault status`` reports: each service up or down, the broker, its queues, the
workers and the auth mode. Iterates the registry; knows no service by name."""
from __future__ import annotations

from pathlib import Path

import requests

from common import registry
from common.celery_app import broker_folder, make_celery
from common.settings import Settings

TIMEOUT = 2.0


def service_states(settings: Settings) -> list[dict]:
    found = []
    for service in registry.services():
        url = service.url(settings)
        try:
            up = requests.get(url + "/", timeout=TIMEOUT).status_code == 200
        except requests.RequestException:
            up = False
        found.append({"name": service.name, "url": url, "up": up})
    return found


def filesystem_queues(folder: Path) -> dict[str, int]:
    """Messages waiting per queue: the filesystem broker keeps one ``<id>.<queue>.msg`` file each."""
    counts = {queue: 0 for queue in registry.queues()}
    for path in (folder / "out").glob("*.msg"):
        queue = path.name[:-len(".msg")].rpartition(".")[2]
        counts[queue] = counts.get(queue, 0) + 1
    return counts


def broker_state(settings: Settings) -> dict:
    """``{"url", "up", "queues": {name: count|None}, "workers": [names]|"unknown"}``."""
    url = settings.get("celery", "broker_url")
    shown = url.split("@")[-1] if "@" in url else url  # never the password
    folder = broker_folder(settings)
    if folder is not None:
        return {"url": shown, "up": folder.exists(), "queues": filesystem_queues(folder), "workers": "unknown"}
    app = make_celery(settings)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=TIMEOUT)
            channel = connection.default_channel
            queues = {}
            for queue in registry.queues():
                try:
                    queues[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except Exception:  # noqa: BLE001 - a queue nobody declared yet: nothing waits in it
                    channel = connection.channel()
                    queues[queue] = None
        replies = app.control.inspect(timeout=1.0).ping() or {}
        return {"url": shown, "up": True, "queues": queues, "workers": sorted(replies)}
    except Exception as exc:  # noqa: BLE001 - any failure means: not reachable
        return {"url": shown, "up": False, "queues": {}, "workers": [], "error": type(exc).__name__}


def report(settings: Settings) -> dict:
    services = service_states(settings)
    broker = broker_state(settings)
    return {"services": services, "broker": broker, "auth_mode": settings.get("auth", "mode", "open"),
            "ok": all(entry["up"] for entry in services) and broker["up"]}
