"""CLI commands of the distill area: parse, call slimlm.api, render with rich."""

from slimlm.cli.app import JSON_OPTION, app, console, print_json  # noqa: F401
