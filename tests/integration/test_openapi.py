"""Every service describes itself in OpenAPI 3 at ``/openapi.json``: the description is valid,
names every route the service exposes and no route it does not, and the running services
answer as described (schemathesis, GET only, a bounded number of examples: no 500, no answer
outside the description)."""
import subprocess
import sys
from pathlib import Path

import cherrypy
import pytest
import requests

from common import registry
from common.auth import SERVICE_TOKEN_HEADER
from common.commands import sync_all
from tests.helpers import NoBroker, make_settings

VERBS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


def exposed_nodes(node, prefix=""):
    """``(path, {methods})`` of every exposed object under ``node`` (the CherryPy object tree);
    CherryPy's dispatcher finds ``/openapi.json`` as the attribute ``openapi_json``."""
    yield prefix or "/", {verb for verb in VERBS if callable(getattr(node, verb, None))}
    for name, child in vars(node).items():
        if not name.startswith("_") and getattr(child, "exposed", False) and not callable(child):
            yield from exposed_nodes(child, f"{prefix}/{name.replace('_json', '.json')}")


def owner(path: str, nodes: dict[str, set]) -> str:
    """The object-tree node that answers a described ``path``: its longest literal prefix."""
    parts = [part for part in path.split("/") if part]
    for length in range(len(parts), -1, -1):
        candidate = "/" + "/".join(parts[:length])
        if candidate in nodes and not any(part.startswith("{") for part in parts[:length]):
            return candidate
    return "/"


@pytest.fixture(scope="module")
def applications(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("openapi"))
    sync_all(settings)
    built = {}
    for service in registry.services():
        app = service.build_app(settings) if service.name != "ingest" else registry.load(service.app)(
            settings, celery_app=NoBroker())
        built[service.name] = app
    return built


@pytest.mark.parametrize("name", registry.names())
def test_every_exposed_route_is_described_and_every_described_route_exists(applications, name):
    app = applications[name]
    nodes = {}
    if not isinstance(app, cherrypy.Application):  # the ingest service's state endpoint sits in front
        nodes[app.PATH] = {"GET", "HEAD"}
        app = app.application
    nodes.update(dict(exposed_nodes(app.root)))
    document = registry.describe_api(name)
    described: dict[str, set] = {path: set() for path in nodes}
    for path, operations in document["paths"].items():
        described[owner(path, nodes)] |= {method.upper() for method in operations}
    for path, methods in nodes.items():
        # CherryPy answers HEAD for every GET: only the methods a node defines must be described.
        assert described[path] - {"HEAD"} == methods - {"HEAD"}, (name, path, sorted(methods), sorted(described[path]))
        assert described[path] & {"HEAD"} <= methods, (name, path)


@pytest.mark.parametrize("name", registry.names())
def test_each_running_service_serves_a_valid_openapi_3_description(stack, name):
    from openapi_spec_validator import validate
    answer = requests.get(stack.url(name) + "/openapi.json", timeout=30)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    validate(document)
    assert document["components"]["schemas"]["Error"]["required"] == ["status", "code", "message"]


@pytest.mark.parametrize("name", registry.names())
def test_schemathesis_finds_no_server_error_and_no_undescribed_answer(stack, name, tmp_path):
    settings = stack.settings
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", stack.url(name) + "/openapi.json",
               "--url", stack.url(name), "--max-examples", "5", "--include-method", "GET",
               "--exclude-path", "/getid", "--exclude-path-regex", "^/dashboard",
               "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                           "response_schema_conformance",
               "--seed", "1", "--phases", "examples,fuzzing", "--no-color", "--workers", "1"]
    if settings.service_token:
        command += ["--header", f"{SERVICE_TOKEN_HEADER}: {settings.service_token}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
