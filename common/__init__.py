"""Pieces every labvault service shares: settings, database, errors, HTTP, Celery, bundles."""
