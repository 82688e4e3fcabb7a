"""The typer application object shared by every command module.

Each module under ``slimlm.cli`` registers its commands on ``app``; command functions only parse
arguments, call ``slimlm.api`` and render with rich. No logic lives in the CLI.
"""

import json
import sys
from typing import Any, Iterable

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="slimlm",
    help="Make LLMs small enough for your hardware, and measure what each step costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """slimlm: inspect, quantize, evaluate, benchmark, distill and choose LLM variants."""

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def print_json(data: Any) -> None:
    """Write JSON to stdout untouched by rich, so tools can parse it."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def columns_table(title: str, columns: Iterable[str], left: Iterable[str], **kwargs: Any) -> Table:
    """A rich Table of these columns: the ones named in ``left`` left-aligned, the rest (numbers) right."""
    table = Table(title=title, **kwargs)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


@app.command()
def version(json_out: bool = JSON_OPTION) -> None:
    """Print slimlm's version and the versions of the engines it uses."""
    import importlib.metadata as md

    versions = {"slimlm": md.version("slimlm")}
    for dist in ("torch", "transformers", "gguf", "safetensors", "compressed-tensors", "llama-cpp-python"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    if json_out:
        print_json(versions)
    else:
        for name, ver in versions.items():
            console.print(f"{name:20} {ver or '-'}")
