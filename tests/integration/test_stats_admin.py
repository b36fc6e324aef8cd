"""Stats from the command line: regenerate (forced or not) and the project skip-list."""
import requests

from tests.helpers import new_project, payload_bundle, wait_for

CSV = b"a,b\n1,2\n3,4\n"


def built(stack, project):
    return wait_for(lambda: (lambda d: d if d.get("state") == "ok" and d.get("files") else None)(
        requests.get(f"{stack.url('stats')}/stats/{project}", timeout=30).json()), timeout=90,
        message=f"stats of {project}")


def test_regenerate_rebuilds_only_when_forced(stack):
    project = new_project(stack, "regen")
    assert stack.ingest(payload_bundle({"t.csv": CSV}, project=project))["state"] == "OK"
    first = built(stack, project)["files"][0]["runs"]["table_stats"]
    unchanged = stack.cli("regenerate", "--project", project, "--now")
    assert unchanged.stdout.strip() == f"{project}: unchanged"
    forced = stack.cli("regenerate", "--project", project, "--now", "--force")
    assert forced.stdout.strip() == f"{project}: built"
    again = requests.get(f"{stack.url('stats')}/stats/{project}", timeout=30).json()["files"][0]["runs"]["table_stats"]
    assert again != first
    queued = stack.cli("regenerate", "--project", project)
    assert queued.stdout.strip() == f"{project}: rebuild enqueued"
    unknown = stack.cli("regenerate", "--project", "no-such-project", check=False)
    assert unknown.returncode == 1 and "project_not_found" in unknown.stderr and "Traceback" not in unknown.stderr


def test_a_skipped_project_says_why(stack):
    project = new_project(stack, "skip")
    result = stack.cli("regenerate", "--project", project, "--now", env={
        "LABVAULT_STATS_SKIP_PROJECTS": f"other: no; {project}: too large for this deployment"})
    assert result.stdout.strip() == f"{project}: skipped (too large for this deployment)"
    document = requests.get(f"{stack.url('stats')}/stats/{project}", timeout=30).json()
    assert document == {"project": project, "state": "skipped", "reason": "too large for this deployment"}
