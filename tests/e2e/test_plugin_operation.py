"""An operation from a separate package plugs into the stats service by entry point: it is
listed, validated, run by a worker and cached; a broken plug-in is skipped, never fatal."""
import pytest
import requests

from tests.helpers import Stack, new_project, payload_bundle, seeded, wait_for, write_plugin

PACKAGE = {
    "wordcount_ops/__init__.py": '''
        from stats_service.operations.base import Operation


        class WordCount(Operation):
            name = "word_count"
            version = "2"
            description = "Words and lines of a text file."
            applies_to = ("other",)

            def run(self, context):
                text = context.fetch(context.files[0]).read_text()
                context.progress(50, "counted")
                context.add_output("words.txt", "\\n".join(sorted(set(text.split()))).encode(), "text/plain")
                return {"words": len(text.split()), "lines": text.count("\\n")}
    ''',
    "broken_ops/__init__.py": '''
        raise ImportError("this plug-in is broken on purpose")
    ''',
}


@pytest.fixture(scope="module")
def plugged(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin-operation")
    plugin = write_plugin(root / "plugin", "wordcount-ops", PACKAGE,
                          {"labvault.operations": {"word_count": "wordcount_ops:WordCount",
                                                   "broken": "broken_ops:Broken"}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(plugin))
        with seeded(Stack(root / "var")) as stack:
            yield stack


def test_the_plugin_operation_is_listed_and_the_broken_one_skipped(plugged):
    listed = {op["name"]: op for op in requests.get(f"{plugged.url('stats')}/operations", timeout=30).json()}
    assert listed["word_count"]["version"] == "2" and listed["word_count"]["applies_to"] == ["other"]
    assert "broken" not in listed and "anndata_qc" in listed
    assert "broken" in (plugged.data_dir / "log" / "stats.log").read_text()


def test_the_plugin_operation_runs_in_the_worker_and_is_cached(plugged):
    project = new_project(plugged, "words")
    final = plugged.ingest(payload_bundle({"notes.txt": b"alpha beta\ngamma alpha\n"}, project=project))
    assert final["state"] == "OK"
    # The project build ran it by itself (it applies to "other" files) ...
    document = wait_for(lambda: (lambda d: d if d.get("state") == "ok" else None)(
        requests.get(f"{plugged.url('stats')}/stats/{project}", timeout=30).json()), timeout=90,
        message="the project's stats")
    entry = document["files"][0]
    assert entry["state"] == "ok" and entry["stats"] == {"words": 4, "lines": 2}
    # ... and asking for it again is a cache hit.
    answer = requests.post(f"{plugged.url('stats')}/operations/word_count",
                           json={"inputs": {"file_id": entry["file_id"]}}, timeout=30)
    assert answer.status_code == 200 and answer.json()["cached"] is True
    assert answer.json()["outputs"]["words.txt"]["size"] == len(b"alpha\nbeta\ngamma")
