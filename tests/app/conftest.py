"""Fixtures of the API tests: a real API and worker processes per job-store backend (service_support)."""

from service_support.helpers import stack  # noqa: F401 - re-exported as a fixture
