"""The stats service's HTTP application.

For now only the health answer; per-project stats, figures and computed files
build on the ingest path and arrive later.
"""
from __future__ import annotations

import cherrypy

from common.settings import Settings
from common.web import HealthMixin, make_application


class Root(HealthMixin):
    exposed = True
    service_title = "Stats"


def build_app(settings: Settings, check_schema: bool = True) -> cherrypy.Application:
    return make_application(Root())
