"""Service-test fixtures; the helpers live in service_helpers.py (a unique module name)."""

from service_helpers import stack  # noqa: F401 - re-exported as a fixture

