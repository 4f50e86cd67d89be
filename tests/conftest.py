"""Shared fixtures. The local control plane fixture lives in e2e/ so the demo and
the tests start the very same cluster."""

pytest_plugins = ["e2e.pytest_plugin"]
