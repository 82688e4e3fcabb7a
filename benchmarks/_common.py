"""Helpers every benchmark uses: medians of repeated runs, markdown tables, appending to BENCHMARKS.md."""

import datetime as _dt
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def append_section(title: str, body: str) -> None:
    """Print a section and append it to BENCHMARKS.md with the date and machine."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = f"\n## {title}\n\n_{stamp}; {machine_line()}_\n\n{body}\n"
    print(text)
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# slimlm benchmarks\n\nEvery table is appended by a script in benchmarks/; "
                                 "ratios are measured in the same run.\n")
    with BENCHMARKS_MD.open("a") as f:
        f.write(text)


def publish(title: str, body: str, no_write: bool) -> None:
    """Print ``body`` alone (``--no-write``), or print and append it to BENCHMARKS.md under ``title``."""
    if no_write:
        print(body)
    else:
        append_section(title, body)
