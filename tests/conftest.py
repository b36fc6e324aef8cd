"""Fixtures shared by the integration and end-to-end tests, and the run's summary of skips."""
import collections

import pytest

from tests.helpers import seeded, stack_kind


@pytest.fixture(scope="session", params=["embedded", "production"])
def stack(request, tmp_path_factory):
    """The whole suite, seeded, in each of its two worlds; every test that uses it runs on both.

    ``embedded``: ``labvault up`` (SQLite, filesystem broker, POSIX archive).
    ``production``: the services under uWSGI, two Celery workers on a RabbitMQ vhost,
    PostgreSQL databases (skipped, or failed under CI=true, without those servers).
    """
    kind = stack_kind(request.param)
    root = tmp_path_factory.mktemp(f"stack-{request.param}")
    (root / "movable").mkdir()
    with seeded(kind(root, ingest={"move_roots": str(root / "movable")})) as running:
        yield running


@pytest.fixture(scope="session")
def s3_endpoint():
    """A SeaweedFS S3 server for the session (skipped without ``weed``; failed under CI=true)."""
    from tests.servers import require_s3, seaweedfs
    require_s3()
    with seaweedfs() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket name (not yet created), with the endpoint's credentials in the environment
    for boto3's usual chain."""
    import uuid
    for name, value in s3_endpoint.environ().items():
        monkeypatch.setenv(name, value)
    return f"labvault-{uuid.uuid4().hex[:12]}"


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
