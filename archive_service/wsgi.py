"""uWSGI entry point (``module = archive_service.wsgi:application``)."""
from archive_service.app import build_app
from common.settings import Settings
from common.web import wsgi_application

application = wsgi_application(build_app(Settings.load()))
