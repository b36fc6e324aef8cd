"""uWSGI entry point for the policy service: only builds ``application``."""
from common.settings import Settings
from common.web import wsgi_application
from policy_service.app import build_app

application = wsgi_application(build_app(Settings.load()))
