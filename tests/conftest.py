"""Fixtures shared by the integration and end-to-end tests, and the run's summary of skips."""
import collections

import pytest

from tests.helpers import Stack, seeded
from tests.servers import require_postgres, require_rabbitmq, require_uwsgi


@pytest.fixture(scope="session", params=["embedded", "production"])
def stack(request, tmp_path_factory):
    """The whole suite, seeded, in each of its two worlds; every test that uses it runs on both.

    ``embedded``: ``labvault up`` (SQLite, filesystem broker, POSIX archive).
    ``production``: the services under uWSGI, two Celery workers on a RabbitMQ vhost,
    PostgreSQL databases (skipped, or failed under CI=true, without those servers).
    """
    if request.param == "production":
        require_postgres()
        require_rabbitmq()
        require_uwsgi()
        from tests.production import ProductionStack as kind
    else:
        kind = Stack
    root = tmp_path_factory.mktemp(f"stack-{request.param}")
    (root / "movable").mkdir()
    with seeded(kind(root, ingest={"move_roots": str(root / "movable")})) as running:
        yield running


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line at the end: which groups of tests were skipped, and why (a missing server or
    package), so a run that tested less than the machine could is never silent about it."""
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        groups = "; ".join(f"{count} because {reason}" for reason, count in reasons.most_common())
        terminalreporter.write_line(f"skipped: {groups}", yellow=True)
    else:
        terminalreporter.write_line("skipped: none (every group of tests ran)")
