"""Shared by tests/app and tests/workers: real service processes on loopback (helpers) and the test-only
methods loaded into them through DISTILL_PLUGINS (plugin)."""
