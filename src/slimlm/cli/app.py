"""The typer app every ``slimlm.cli`` module registers on; commands only parse, call the API, render with rich."""

import contextlib
import json
import sys
from typing import Any, Callable, Iterable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(name="slimlm", help="Make LLMs small enough for your hardware, and measure what each step costs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="On an error, also print its traceback (for bug reports)."),
          ) -> None:
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


def fitted_table(title: str, columns: list[tuple[str, int]], rows: list[list[str]], *, left: Iterable[str] = (),
                 width: int | None = None, styles: list[str | None] | None = None, **kwargs: Any
                 ) -> tuple[Table, list[str]]:
    """A table whose cells are never cut: ``columns`` are (header, importance); while the table would be wider than
    ``width`` (default: the console's), the least important column is left out. Returns the table and the headers
    left out, for a footnote (``--json`` always has everything)."""
    width = width or console.width
    left = set(left)

    def need(i: int, wrap_header: bool = True) -> int:  # a header may wrap between words; a cell never wraps
        words = columns[i][0].split() if wrap_header else [columns[i][0]]
        return max([len(w) for w in words] + [len(r[i]) for r in rows] + [0])

    keep = list(range(len(columns)))
    while len(keep) > 1 and sum(need(i) + 3 for i in keep) + 1 > width:
        keep.remove(min(keep, key=lambda i: (columns[i][1], -i)))
    sizes = {i: need(i) for i in keep}
    slack = width - (sum(sizes[i] + 3 for i in keep) + 1)
    for i in keep:  # give the room left to headers that would otherwise wrap, left to right
        grow = min(slack, need(i, wrap_header=False) - sizes[i])
        sizes[i] += grow
        slack -= grow
    table = Table(title=title, **kwargs)
    for i in keep:
        table.add_column(columns[i][0], justify="left" if columns[i][0] in left else "right", width=sizes[i],
                         overflow="fold")
    for n, row in enumerate(rows):
        table.add_row(*(row[i] for i in keep), style=styles[n] if styles else None)
    return table, [columns[i][0] for i in range(len(columns)) if i not in keep]


def left_out_note(dropped: list[str]) -> str:
    """The footnote under a table that had to leave columns out."""
    return f"[dim]columns left out at this width: {', '.join(dropped)} (a wider terminal or --json shows them)[/]"


@contextlib.contextmanager
def progress_task(description: str, *, total: int | None = None, item: str | None = None, remaining: bool = True,
                  disable: bool = False, silent: bool = False) -> Iterator[Callable[..., None]]:
    """A transient rich progress bar on stderr with one task; yields that task's ``update(completed=, total=,
    description=, item=)``. ``item`` adds a column for the item being worked on; ``remaining`` an ETA column.
    Where no bar can show (``disable``, e.g. under --json, or stderr is not a terminal) the stage still gets one
    line on stderr at its first report, so logs say what ran; ``silent`` drops even that (nothing will run)."""
    if disable or not err_console.is_terminal:
        said = silent

        def once(**_kw: Any) -> None:  # on the first report: a command refused at its input prints only the error
            nonlocal said
            if not said:
                err_console.print(f"… {description}", highlight=False, soft_wrap=True)
                said = True
        yield once
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    columns += [TextColumn("ETA"), TimeRemainingColumn()] if remaining else []
    columns += [TextColumn("{task.fields[item]}")] if item is not None else []
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=total, **({"item": item} if item is not None else {}))

        def update(**kw: Any) -> None:
            """Like ``Progress.update``; a count that goes back (a new stage) restarts the clock and the ETA."""
            now = bar.tasks[0]
            if kw.get("completed", now.completed) < now.completed or kw.get("total", now.total) != now.total:
                bar.reset(task, start=True, total=kw.get("total", now.total), completed=kw.get("completed", 0))
            bar.update(task, **kw)

        yield update


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
