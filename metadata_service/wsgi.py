"""uWSGI entry point: ``module = metadata_service.wsgi:application``."""
from common.settings import Settings
from common.web import wsgi_application
from metadata_service.app import build_app

application = wsgi_application(build_app(Settings.load()))
