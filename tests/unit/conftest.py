"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest

from common import db as dbmod
from common import migrations
from tests.helpers import FIXTURES


@pytest.fixture
def metadata_db(tmp_path):
    """A fresh metadata database in a temporary SQLite file, schema applied, models bound to it."""
    from metadata_service import models

    db = dbmod.bind(models.database, f"sqlite:///{tmp_path}/m.sqlite3")
    migrations.sync(db, models.SCHEMA)
    yield db
    dbmod.close_quietly(db)


@pytest.fixture
def metadata_seeded(metadata_db):
    """``metadata_db`` loaded with Pacifica's seed (users 10 and 11, project 1234a, instrument 54...)."""
    from metadata_service.seed import load_seed

    load_seed(FIXTURES / "metadata-seed")
    return metadata_db
