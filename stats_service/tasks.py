"""Celery adapters for the stats service (its tasks arrive with the stats issue)."""
