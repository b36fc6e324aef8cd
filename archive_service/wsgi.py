"""uWSGI entry point (``module = archive_service.wsgi:application``); only builds ``application``."""
from archive_service.app import build_app
from common.settings import Settings
from common.web import wsgi_application

settings = Settings.load()
application = wsgi_application(build_app(settings), settings)
