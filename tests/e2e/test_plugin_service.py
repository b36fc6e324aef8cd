"""A sixth service plugs in by entry point alone: ``labvault up`` starts it, ``labvault --help``
lists its command, and nothing under common/ was edited for it."""
import subprocess
import sys

import pytest
import requests

from tests.helpers import Stack, env_for, free_port, write_plugin

PACKAGE = {
    "throwaway_service/__init__.py": '''
        from common.registry import Service

        SERVICE = Service(name="throwaway", title="Throwaway", port=1, order=60,
                          app="throwaway_service.app:build_app",
                          commands="throwaway_service.commands:add_commands")
    ''',
    "throwaway_service/app.py": '''
        import cherrypy

        from common.web import HealthMixin, json_body, make_application


        class Hello:
            exposed = True

            def GET(self):
                return json_body({"hello": "from a plug-in"})


        class Root(HealthMixin):
            exposed = True
            service_title = "Throwaway"

            def __init__(self):
                self.hello = Hello()


        def build_app(settings, check_schema=True):
            return make_application(Root())
    ''',
    "throwaway_service/commands.py": '''
        def add_commands(add):
            add("wave", cmd_wave, "Wave from the throwaway service.")


        def cmd_wave(args, settings):
            print("wave from throwaway")
            return 0
    ''',
}


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    root = write_plugin(tmp_path / "plugin", "throwaway-plugin", PACKAGE,
                        {"labvault.services": {"throwaway": "throwaway_service:SERVICE"}})
    monkeypatch.setenv("PYTHONPATH", str(root))
    return root


def test_labvault_help_lists_the_plugin_command_and_runs_it(plugin, tmp_path):
    stack = Stack(tmp_path / "var")
    env = env_for(stack.settings)
    helped = subprocess.run([sys.executable, "-m", "common.cli", "--help"], env=env,
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and "wave" in helped.stdout, helped.stdout + helped.stderr
    waved = subprocess.run([sys.executable, "-m", "common.cli", "wave"], env=env,
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert waved.returncode == 0 and waved.stdout.strip() == "wave from throwaway", waved.stderr


def test_labvault_up_starts_the_plugin_service(plugin, tmp_path):
    stack = Stack(tmp_path / "var", throwaway={"port": free_port()})
    stack.start()
    try:
        url = stack.settings.service_url("throwaway")
        assert requests.get(url + "/", timeout=10).json() == {"message": "Throwaway Up and Running"}
        assert requests.get(url + "/hello", timeout=10).json() == {"hello": "from a plug-in"}
        assert f"throwaway {url}" in " ".join((stack.data_dir / "up.log").read_text().split())
    finally:
        stack.stop()
