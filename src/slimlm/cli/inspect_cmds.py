"""CLI: inspect, explain, fit (parameters, names, memory)."""

from slimlm.cli.app import app  # noqa: F401
