"""The services of the suite, each declared once, found through an entry-point group.

A service package declares itself with one ``Service`` (name, default port, application
factory, models, Celery task modules and queue, periodic tasks, its own commands, the
events it listens to, what ``labvault up`` must do for it before the worker starts) and
registers it in its distribution's ``labvault.services`` entry-point group. Everything
that starts or wires the suite (``labvault up``, ``serve``, ``dbsync``/``dbchk``, the
command line, the Celery app, the tests' harness) iterates over ``services()``, so a new
service plugs in without an edit here. Nothing here imports a service: the declarations
name their parts as ``"module:attribute"`` strings, loaded when first needed, so asking
the registry is cheap and never starts a heavy import.

Tests may add a declaration for their own process with ``register``.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any, Mapping

from common.settings import Settings

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "labvault.services"
# A job's metadata is committed (listeners get ``settings, job_id``).
INGESTED = "ingested"
# A CloudEvent for the outside world was published (listeners get ``settings, cloud_event``; see
# ``common.events``); the service keeping webhook subscriptions enqueues its delivery.
EVENT = "event"


@dataclass(frozen=True)
class Service:
    """One service of the suite, as every starter and wirer sees it."""

    name: str
    port: int
    # "module:function" building the WSGI application from (settings).
    app: str
    title: str = ""
    # Module with ``database`` (a peewee proxy) and ``SCHEMA``; None for a service without tables.
    models: str | None = None
    # Modules whose ``@task`` functions are this service's Celery tasks, and their queue.
    tasks: tuple[str, ...] = ()
    queue: str | None = None
    # "module:function" (settings) -> Celery beat entries of this service.
    periodic: str | None = None
    # "module:function" (add) -> None, adding this service's ``labvault`` subcommands;
    # ``add(name, func, help)`` returns the subcommand's argparse parser.
    commands: str | None = None
    # event name -> "module:function" called with (settings, **payload) when it happens.
    listeners: Mapping[str, str] = field(default_factory=dict)
    # "module:function" (settings, started, out) run by ``labvault up`` once every service
    # answers and before the worker starts (the ingest service settles what a previous run left).
    on_up: str | None = None
    # ``labvault up`` starts services in ascending order (those others call first).
    order: int = 50
    # "module:function" () -> the service's OpenAPI 3 description (served at /openapi.json).
    openapi: str | None = None

    def url(self, settings: Settings) -> str:
        """Base URL other processes reach this service at."""
        return settings.service_url(self.name, default_port=self.port)

    def bind_address(self, settings: Settings) -> tuple[str, int]:
        return (settings.get(self.name, "host", "127.0.0.1"), settings.getint(self.name, "port", self.port))

    def build_app(self, settings: Settings):
        return load(self.app)(settings)

    def models_module(self):
        return importlib.import_module(self.models) if self.models else None

    def database(self, settings: Settings):
        """``(database, schema)`` bound to this service's database URL; only for a service with tables."""
        from common.db import bind
        module = self.models_module()
        return bind(module.database, settings.database_url(self.name)), module.SCHEMA


def load(reference: str) -> Any:
    """The object a ``"module:attribute"`` reference names."""
    module, _, attribute = reference.partition(":")
    target = importlib.import_module(module)
    return getattr(target, attribute) if attribute else target


_discovered: dict[str, Service] | None = None
_registered: dict[str, Service] = {}


def _discover() -> dict[str, Service]:
    global _discovered
    if _discovered is None:
        found = {}
        for entry in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                service = entry.load()
            except Exception:  # noqa: BLE001 - one broken plug-in must not stop the suite
                logger.exception("service entry point %r cannot be loaded; skipped", entry.name)
                continue
            if not isinstance(service, Service):
                logger.error("service entry point %r is not a Service; skipped", entry.name)
                continue
            found.setdefault(service.name, service)
        _discovered = found
    return _discovered


def services() -> list[Service]:
    """Every declared service, in start order."""
    merged = {**_discover(), **_registered}
    if not merged:
        raise RuntimeError("no labvault services are registered: install the package (pip install -e .)")
    return sorted(merged.values(), key=lambda service: (service.order, service.name))


def names() -> list[str]:
    return [service.name for service in services()]


def get(name: str) -> Service:
    for service in services():
        if service.name == name:
            return service
    raise KeyError(f"no service {name!r}; known: {', '.join(names())}")


def describe_api(name: str) -> dict | None:
    """The OpenAPI description service ``name`` declares, or None."""
    service = get(name)
    return load(service.openapi)() if service.openapi else None


def with_tables() -> list[Service]:
    return [service for service in services() if service.models]


def queues() -> list[str]:
    return list(dict.fromkeys(service.queue for service in services() if service.queue))


def task_modules() -> list[str]:
    return [module for service in services() for module in service.tasks]


def periodic_tasks(settings: Settings) -> dict:
    """Every service's Celery beat entries."""
    schedule: dict = {}
    for service in services():
        if service.periodic:
            schedule.update(load(service.periodic)(settings))
    return schedule


def emit(event: str, settings: Settings, **payload) -> None:
    """Tell every listener of ``event``; a listener that fails is logged and never fails the emitter."""
    for service in services():
        reference = service.listeners.get(event)
        if not reference:
            continue
        try:
            load(reference)(settings, **payload)
        except Exception:  # noqa: BLE001 - the event already happened; a listener cannot undo it
            logger.exception("%s listener of %s failed for %s", service.name, event, payload)


def register(service: Service) -> None:
    """Add (or replace) a declaration for this process only: the tests' hook."""
    _registered[service.name] = service


def unregister(name: str) -> None:
    _registered.pop(name, None)
