"""The suite's one Celery app, built from settings; tasks are plain functions.

A service's tasks module marks a function with ``@task("<service>.<verb>_<noun>", queue=...)``;
the function takes the settings first and ids after, so tests call it directly.
``make_celery(settings)`` builds the app and registers every marked function as a
Celery task that passes the app's settings in. Creating the app connects to nothing.
A task function that raises ``RetryLater`` is run again later (Celery's retry).

The beat schedule (every service's ``periodic`` entries) is part of the app's configuration: ``labvault
worker --beat`` (the embedded default) or ``labvault beat`` (production: exactly one)
sends those tasks.
"""
from __future__ import annotations

import importlib
import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from celery import Celery, signals
from kombu import Exchange, Queue

from common import registry
from common.settings import Settings, once_per_settings

logger = logging.getLogger(__name__)

# Set once this worker shuts down (SIGTERM, Ctrl-C: Celery's warm shutdown). The main
# process receives the signal, the pool's processes run the tasks: an Event made before
# the pool forks is shared by both. None outside a worker.
_shutdown_flag = None


@signals.worker_init.connect
def _make_shutdown_flag(**_kwargs) -> None:
    global _shutdown_flag
    _shutdown_flag = multiprocessing.get_context("fork").Event()


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_kwargs) -> None:
    if _shutdown_flag is not None:
        _shutdown_flag.set()


def shutting_down() -> bool:
    """True in a worker (main or pool process) that has begun its warm shutdown: a long task
    should give its work back (the ingest pipeline does) rather than run on against
    services that may be stopping too."""
    return _shutdown_flag is not None and _shutdown_flag.is_set()

@dataclass(frozen=True)
class TaskSpec:
    name: str
    queue: str
    func: Callable
    options: dict


_REGISTRY: dict[str, TaskSpec] = {}


class RetryLater(Exception):
    """Raised by a task function: run the same task with the same arguments in ``countdown`` seconds."""

    def __init__(self, countdown: float, reason: str = ""):
        super().__init__(countdown, reason)
        self.countdown, self.reason = countdown, reason


def task(name: str, queue: str, **options) -> Callable[[Callable], Callable]:
    """Mark ``func(settings, *ids)`` as the Celery task ``name`` routed to ``queue`` (a service's queue)."""
    def mark(func: Callable) -> Callable:
        _REGISTRY[name] = TaskSpec(name, queue, func, options)
        func.task_name = name
        return func
    return mark


def celery_config(settings: Settings) -> dict:
    broker_url = settings.get("celery", "broker_url")
    queues = registry.queues()
    config = {
        "broker_url": broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # A task is acknowledged only after it finished, so a worker lost mid-task
        # leaves the message to be redelivered; tasks are written to run twice safely.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": queues[0],
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q, durable=True) for q in queues],
        "task_create_missing_queues": False,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "enable_utc": True,
        # A task past the soft limit gets SoftTimeLimitExceeded, so the pipeline records
        # FAILED and cleans up; the hard limit kills the process (see [celery] in
        # config/labvault.ini for how these relate to RabbitMQ's consumer_timeout).
        "task_time_limit": _seconds(settings, "task_time_limit"),
        "task_soft_time_limit": _seconds(settings, "task_soft_time_limit"),
        "beat_schedule": registry.periodic_tasks(settings),
        "beat_schedule_filename": str(settings.path("celery", "beat_schedule_file")),
    }
    if broker_url.startswith(("amqp", "pyamqp")):
        config.update(amqp_config(settings))
    if broker_url.startswith("filesystem"):
        folder = settings.path("celery", "broker_dir")
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # kombu's filesystem transport, writing each message whole before a consumer can see it.
        config["broker_transport"] = "common.broker:Transport"
        config["broker_transport_options"] = {
            # One folder carries every queue: producers write where consumers read.
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            # Exchange bindings; kombu's default is a folder in the working directory.
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": settings.getfloat("celery", "polling_interval"),
        }
    return config


def amqp_config(settings: Settings) -> dict:
    """What a RabbitMQ broker needs beyond the defaults: no message lost, no worker stranded."""
    max_retries = settings.get("celery", "connection_max_retries", "").strip()
    return {
        # Durable queues (above) keep messages only if the messages are persistent too.
        "task_default_delivery_mode": "persistent",
        # py-amqp waits for the broker's ack of every publish, so a message the broker
        # refused or lost raises in the enqueueing request instead of vanishing.
        "broker_transport_options": {"confirm_publish": True},
        # The worker's consumer connection: heartbeats find a dead broker (or a dead
        # network path) in about two intervals instead of the TCP timeout.
        "broker_heartbeat": settings.getint("celery", "heartbeat"),
        "broker_connection_timeout": settings.getfloat("celery", "connection_timeout"),
        "broker_connection_retry": True,
        # Empty: a worker waits for the broker forever rather than exiting.
        "broker_connection_max_retries": int(max_retries) if max_retries else None,
        # Producers (the ingest service) reconnect and publish again when the pooled
        # connection died, e.g. after a broker restart.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": settings.getint("celery", "publish_retries"),
                                      "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
        # A late-acked task cannot be acked on a new connection and the broker redelivers it
        # anyway: stop it at once rather than let two copies of one job run side by side.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
    }


def _seconds(settings: Settings, key: str) -> float | None:
    """``[celery] key`` in seconds; empty or 0 means no limit."""
    if not settings.get("celery", key, "").strip():
        return None
    value = settings.getfloat("celery", key)
    return value if value > 0 else None


def make_celery(settings: Settings) -> Celery:
    """The Celery app for these settings, with every suite task registered."""
    app = Celery("labvault", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.labvault_settings = settings
    for module in registry.task_modules():
        importlib.import_module(module)
    queues = registry.queues()
    routes = {}
    for spec in _REGISTRY.values():
        if spec.queue not in queues:
            raise ValueError(f"task {spec.name} is routed to {spec.queue!r}, which no service declares")
        app.task(name=spec.name, bind=True, **spec.options)(_adapter(spec.func))
        routes[spec.name] = {"queue": spec.queue, "routing_key": spec.queue}
    app.conf.task_routes = routes
    return app


def _adapter(func: Callable) -> Callable:
    def run(self, *args, **kwargs):
        try:
            return func(self.app.labvault_settings, *args, **kwargs)
        except RetryLater as later:
            # The job table decides when to stop coming back (a finished job needs no retry),
            # so Celery's retry count does not.
            logger.info("%s%s: again in %.1f s: %s", self.name, list(args), later.countdown, later.reason)
            raise self.retry(countdown=later.countdown, max_retries=None) from None
    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


@once_per_settings
def celery_for(settings: Settings) -> Celery:
    """A Celery app to enqueue with, one per process and settings (it connects on first use)."""
    return make_celery(settings)


def enqueue(app: Celery, name: str, *args) -> None:
    """Send task ``name`` with id arguments; call only after the database commit."""
    spec = _REGISTRY.get(name)
    queue = spec.queue if spec else name.split(".", 1)[0]
    app.send_task(name, args=list(args), queue=queue, routing_key=queue)


def broker_folder(settings: Settings) -> Path | None:
    if settings.get("celery", "broker_url").startswith("filesystem"):
        return settings.path("celery", "broker_dir")
    return None
