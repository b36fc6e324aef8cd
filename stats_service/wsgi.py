"""uWSGI entry point: ``application`` is the stats service."""
from common.settings import Settings
from common.web import wsgi_application
from stats_service.app import build_app

application = wsgi_application(build_app(Settings.load()))
