"""The operation engine and project builds without services: cache keys, schema errors, claims,
the reaper of runs, and a project build arriving while another holds the project."""
import datetime
import json

import pytest

from common.db import utcnow
from common.errors import LabvaultError
from stats_service import projects
from stats_service.catalog import FileRecord, kind_of
from stats_service.models import FAILED, OK, QUEUED, RUNNING, ProjectStats, Run
from stats_service.operations import discover
from stats_service.operations.base import Operation
from stats_service.runs import Engine, cache_key, canonical
from tests.helpers import make_settings


class Catalog:
    """Two files of project "p", no HTTP."""

    files = [FileRecord(1, "a.csv", "t", 10, "sha1", "aa", "text/csv", 5, "p"),
             FileRecord(2, "b.h5ad", "", 20, "sha1", "bb", "application/x-hdf5", 5, "p")]

    def file(self, file_id):
        return next((f for f in self.files if f.file_id == file_id), None)

    def project(self, project):
        return {"_id": project} if project == "p" else None

    def files_of_project(self, project):
        return list(self.files) if project == "p" else []


class Echo(Operation):
    name = "echo"
    applies_to = ("table",)
    calls = 0

    def run(self, context):
        Echo.calls += 1
        context.add_output("echo.txt", context.inputs and b"echo", "text/plain")
        return {"file": context.files[0].path}


@pytest.fixture
def engine(stats_db, tmp_path):
    built = Engine(make_settings(tmp_path, stats={"heartbeat_stale": "60", "max_attempts": "2"}),
                   operations={"echo": Echo()}, metadata=object(), archive=object())
    built.catalog = Catalog()
    return built


def test_the_cache_key_depends_on_name_version_inputs_and_digests_only():
    op = Echo()
    key = cache_key(op, {"file_id": 1}, {"1": "sha1:aa"})
    assert key == cache_key(op, {"file_id": 1}, {"1": "sha1:aa"})
    others = {cache_key(op, {"file_id": 2}, {"1": "sha1:aa"}), cache_key(op, {"file_id": 1}, {"1": "sha1:ab"})}
    assert len({key} | others) == 3
    assert canonical({"b": 1, "a": [2, 1]}) == '{"a":[2,1],"b":1}'


def test_bad_inputs_name_the_schema_error(engine):
    for inputs, where in (({"file_id": "1"}, "file_id"), ({}, "inputs"), ([], "inputs"),
                          ({"file_id": 1, "x": 1}, "inputs")):
        with pytest.raises(LabvaultError) as caught:
            engine.request("echo", inputs)
        assert caught.value.status == 422 and caught.value.code == "invalid_inputs"
        assert caught.value.message.startswith(where), caught.value.message
    with pytest.raises(LabvaultError) as caught:
        engine.request("echo", {"file_id": 99})
    assert caught.value.code == "unknown_input"
    with pytest.raises(LabvaultError) as caught:
        engine.request("nope", {})
    assert caught.value.status == 404


def test_a_second_request_for_a_queued_run_gets_the_same_run(engine):
    first, cached = engine.request("echo", {"file_id": 1})
    assert not cached and first.state == QUEUED
    again, cached = engine.request("echo", {"file_id": 1})
    assert again.run_id == first.run_id and not cached
    forced, _ = engine.request("echo", {"file_id": 1}, force=True)
    assert forced.run_id != first.run_id


def test_the_reaper_redrives_quiet_runs_and_fails_those_out_of_attempts(engine):
    old = utcnow() - datetime.timedelta(seconds=600)
    quiet, _ = engine.request("echo", {"file_id": 1})
    lost, _ = engine.request("echo", {"file_id": 2})
    Run.update(created=old, heartbeat=old, state=RUNNING).where(Run.run_id == quiet.run_id).execute()
    Run.update(created=old, heartbeat=old, state=RUNNING, attempts=2).where(Run.run_id == lost.run_id).execute()
    fresh, _ = engine.request("echo", {"file_id": 1}, force=True)
    enqueued = []
    done = engine.reap(enqueued.append)
    assert enqueued == [quiet.run_id] and len(done) == 2
    assert Run.get_by_id(lost.run_id).state == FAILED and Run.get_by_id(lost.run_id).error_code == "worker_lost"
    assert Run.get_by_id(fresh.run_id).state == QUEUED
    assert engine.reap(enqueued.append) == []  # the re-driven one waits another stale period


def test_a_run_held_by_a_live_process_is_left_alone(engine):
    run, _ = engine.request("echo", {"file_id": 1})
    Run.update(state=RUNNING, claimed_by="elsewhere", heartbeat=utcnow()).where(Run.run_id == run.run_id).execute()
    assert engine.execute(run.run_id).state == RUNNING
    assert Echo.calls == 0


def test_a_build_arriving_while_another_holds_the_project_marks_it_dirty(engine):
    ProjectStats.create(project="p", claimed_by="elsewhere", heartbeat=utcnow())
    assert projects.refresh(engine, "p") == projects.HELD
    assert ProjectStats.get_by_id("p").dirty is True
    assert ProjectStats.get_by_id("p").claimed_by == "elsewhere"


def test_a_stale_build_claim_is_taken_over(engine, monkeypatch):
    ProjectStats.create(project="p", claimed_by="gone", heartbeat=utcnow() - datetime.timedelta(seconds=600))
    built = []
    monkeypatch.setattr(projects, "_build", lambda engine, project, force: built.append(project) or projects.BUILT)
    assert projects.refresh(engine, "p") == projects.BUILT
    assert built == ["p"] and ProjectStats.get_by_id("p").claimed_by is None


def test_new_inputs_during_a_build_make_the_builder_go_round_once_more(engine, monkeypatch):
    rounds = []

    def build(engine, project, force):
        rounds.append(project)
        if len(rounds) == 1:  # another ingest arrives meanwhile
            assert projects.refresh(engine, project) == projects.HELD
        return projects.BUILT
    monkeypatch.setattr(projects, "_build", build)
    assert projects.refresh(engine, "p") == projects.BUILT
    assert rounds == ["p", "p"] and ProjectStats.get_by_id("p").dirty is False


def test_the_skip_list_reads_lines_and_semicolons(engine, tmp_path):
    engine.settings = make_settings(tmp_path, stats={"skip_projects": "a: too big\nb; c: later"})
    assert projects.skip_list(engine) == {"a": "too big", "b": "listed in [stats] skip_projects", "c": "later"}
    assert projects.refresh(engine, "a") == projects.SKIPPED
    assert ProjectStats.get_by_id("a").state == "skipped"


def test_the_builtin_operations_are_discovered_and_describe_themselves():
    found = discover()
    assert {"anndata_qc", "table_stats", "project_figures"} <= set(found)
    for operation in found.values():
        description = operation.describe()
        assert description["name"] and description["description"] and description["input_schema"]["type"] == "object"
        json.dumps(description)
    assert (kind_of("X.H5AD"), kind_of("a.tsv"), kind_of("a.csv"), kind_of("README")) == \
        ("anndata", "table", "table", "other")
    assert OK == "ok"
