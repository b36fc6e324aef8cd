"""Fixtures shared by the integration and end-to-end tests."""
import pytest

from tests.helpers import FIXTURES, Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The suite under ``labvault up`` (SQLite, filesystem broker, POSIX archive), seeded."""
    root = tmp_path_factory.mktemp("stack")
    (root / "movable").mkdir()
    running = Stack(root, ingest={"move_roots": str(root / "movable")})
    running.start()
    try:
        running.cli("seed", str(FIXTURES / "metadata-seed"))
        yield running
    finally:
        running.stop()
