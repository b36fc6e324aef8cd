"""uWSGI entry point (``module = metadata_service.wsgi:application``); only builds ``application``."""
from common.settings import Settings
from common.web import wsgi_application
from metadata_service.app import build_app

settings = Settings.load()
application = wsgi_application(build_app(settings), settings)
