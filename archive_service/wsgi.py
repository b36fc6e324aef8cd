"""uWSGI entry point (``module = archive_service.wsgi:application``); only builds ``application``."""
import sys

from archive_service.app import build_app
from common.errors import LabvaultError
from common.settings import Settings
from common.web import wsgi_application

settings = Settings.load()
try:
    application = wsgi_application(build_app(settings), settings)
except LabvaultError as exc:
    # A missing bucket or schema. Raising would make uWSGI print the import's traceback
    # (and exiting would make it respawn the worker forever): say why in one line and
    # leave ``application`` undefined, which need-app turns into a stop.
    print(f"archive: cannot start: {exc.message}", file=sys.stderr, flush=True)
