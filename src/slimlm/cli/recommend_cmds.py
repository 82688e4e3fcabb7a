"""CLI: recommend (measured choice per device and goal), report (HTML + PNG), demo (the whole journey)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console

from slimlm.cli.app import (JSON_OPTION, app, console, err_console, fitted_table, left_out_note, print_json,
                            progress_task)


def _say(message: str) -> None:
    err_console.print(f"[dim]…[/] {message}", highlight=False)


@contextlib.contextmanager
def _steps(json_out: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    """Progress within recommend's stages (scoring windows, timing rounds) as one bar with an ETA that restarts
    with each stage; nothing where no bar can show (the stage lines say enough there)."""
    if json_out or not err_console.is_terminal:
        yield None
        return
    with progress_task("measuring", item="") as update:
        yield lambda done, total, what: update(completed=done, total=total, item=what)


def _figure(r: dict, key: str, fmt: str, with_interval: bool) -> str:
    text = format(r[key], fmt)
    low, high = (r.get("intervals") or {}).get(key, (None, None))
    if with_interval and low is not None:
        text += f" ({format(low, fmt)}-{format(high, fmt)})"
    return text


def _render(result: dict, out: Console | None = None) -> None:
    """The measured table (cells whole at any width: the least important columns go first), then the choice."""
    from slimlm.inspect.fit import format_bytes

    out = out or console

    goal_key = {"throughput": "prefill_tok_s", "latency": "itl_p50_ms"}.get(result["goal"])
    tied = set(result.get("tied", []))
    columns = [("variant", 10), ("memory", 8), ("KLD", 8), ("top-1", 4), ("ppl", 3),
               ("prefill tok/s", 9 if goal_key == "prefill_tok_s" else 5), ("decode tok/s", 5),
               ("ITL p50 ms", 9 if goal_key == "itl_p50_ms" else 5), ("engine", 2), ("", 9)]
    rows, styles = [], []
    for r in sorted(result["measured"], key=lambda r: r["memory_bytes"]):
        mark = ("← chosen" if r["name"] == result["choice"] else "tied" if r["name"] in tied
                else "Pareto" if r["name"] in result["pareto"] else "")
        rows.append([r["name"], format_bytes(r["memory_bytes"]), f"{r['kld_mean']:.4f}", f"{100 * r['top1']:.1f}%",
                     f"{r['ppl']:.2f}", _figure(r, "prefill_tok_s", ".0f", goal_key == "prefill_tok_s"),
                     _figure(r, "decode_tok_s", ".1f", False), _figure(r, "itl_p50_ms", ".1f", goal_key == "itl_p50_ms"),
                     r["engine"], mark])
        styles.append("bold yellow" if r["name"] == result["choice"] else None)
    table, dropped = fitted_table(f"{Path(result['model']).name}: goal {result['goal']}, memory "
                                  f"{format_bytes(result['memory_bytes'])}", columns, rows,
                                  left=("variant", "engine", ""), styles=styles, width=out.width,
                                  title_justify="left")
    out.print(table)
    if dropped:
        out.print(left_out_note(dropped))
    coverage = [r["interval_coverage"] for r in result["measured"] if "interval_coverage" in r]
    if goal_key and coverage:
        out.print(f"[dim]median of {result['settings']['runs']} runs, in brackets its {min(coverage):.0%} interval "
                  "(order statistics); overlapping intervals are a tie[/]")
    machine = result.get("machine") or {}
    unstable = [r["name"] for r in result["measured"] if r.get("unstable")]
    if unstable:
        out.print(f"[yellow]unstable[/] (its runs disagree by more than half the median): {', '.join(unstable)}",
                  highlight=False)
    if machine.get("busy"):
        out.print(f"[bold yellow]warning:[/] {machine['note']} ({'; '.join(machine['reasons'])})", highlight=False)
    for e in result["excluded"]:
        out.print(f"[dim]excluded {e['name']}: {e['reason']}[/]")
    for s in result["skipped"]:
        out.print(f"[dim]skipped {s['name']}: {s['reason']}[/]")
    if result.get("engine"):
        out.print(f"[dim]speed measured on {result['engine']}[/]", highlight=False)
    out.print(f"[bold green]Recommended:[/] {result['why']}")


@app.command()
def recommend(
    model: Path = typer.Argument(..., help="Hugging Face model dir to make and measure variants of."),
    memory: str = typer.Option(..., "--memory", help="Memory of the device, e.g. 8GiB, 512MiB."),
    goal: str = typer.Option("throughput", "--goal", help="throughput | latency | quality | size"),
    context: int = typer.Option(4096, "--context", help="Context length the device must hold."),
    batch: int = typer.Option(1, "--batch", help="Concurrent sequences (KV cache and bench batch)."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Stop measuring new variants after this."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text for AWQ/SmoothQuant (default: self-generated)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation text (default: wikitext-2 test)."),
    student: list[Path] = typer.Option([], "--student", help="A distilled student checkpoint to weigh too (repeatable)."),
    max_kld: float = typer.Option(0.1, "--max-kld", help="Variants above this KLD are too lossy for speed/size goals."),
    chunks: int = typer.Option(4, "--chunks", help="Evaluation windows of 512 tokens."),
    save: Optional[Path] = typer.Option(None, "--save", help="Also write the result JSON here (input for `slimlm report`)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Measure speed on the engine you will deploy on: "
                                         "slimlm | llama.cpp (GGUF mixes) | vllm (BF16, W8A8, W4A16 on its server, "
                                         "--batch concurrent streams). Default: GGUF on llama.cpp when installed, "
                                         "the rest on slimlm's runtime."),
    budget_mix: bool = typer.Option(False, "--budget-mix", help="Also make and weigh the GGUF budget mix that "
                                    "fits --memory at --context x --batch exactly (quantize --fit; its sensitivity "
                                    "is measured on --calib when that is a text file, else wikitext-2 valid)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Measure the variants that fit --memory on this machine and recommend one for --goal."""
    from slimlm.recommend import recommend as run

    with _steps(json_out) as steps:
        result = run(model, memory=memory, goal=goal, context=context, batch=batch, budget_minutes=budget_minutes,
                     calib=calib, data=data, students=list(student), max_kld=max_kld, chunks=chunks,
                     engine=engine, budget_mix=budget_mix, progress=_say, steps=steps).to_dict()
    if save:
        save.write_text(json.dumps(result, indent=1, default=str))
    if json_out:
        print_json(result)
    else:
        _render(result)


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help=(
        "Result JSON files from `slimlm recommend --save` (one model); or, with -o FILE.png, quality-per-size "
        "files (benchmarks/bench_budget.py), one panel per model.")),
    output: Path = typer.Option(Path("report.html"), "-o", "--output", help="HTML file (or .png plot) to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Write one self-contained HTML report (Pareto plots, tables, memory) plus PNG plots beside it; or the
    quality-per-size plot (KLD against file size of every file measured) when the output is a .png."""
    from slimlm.report.html import load_results, write_report

    if output.suffix.lower() == ".png":
        from slimlm.errors import SlimlmError
        from slimlm.report.plots import load_quality_points, plot_quality_per_size

        if output.exists() and not overwrite:
            raise SlimlmError(f"{output} exists (use --overwrite)")
        path = plot_quality_per_size(load_quality_points(results), output)
        if json_out:
            print_json({"plots": [str(path)]})
        else:
            console.print(f"plot:   {path}")
        return
    written = write_report(load_results(results), output, overwrite=overwrite)
    if json_out:
        print_json(written)
    else:
        console.print(f"report: {written['report']}")
        for p in written["plots"]:
            console.print(f"plot:   {p}")


@app.command()
def demo(
    out: Path = typer.Option(Path("slimlm-demo"), "--out", help="Folder for the results and the report."),
    full: bool = typer.Option(False, "--full", help="Measure every variant (9), not the quick set of 4."),
    json_out: bool = JSON_OPTION,
) -> None:
    """The whole journey on the built-in SmolLM2-135M, no download: inspect, explain, quantize, evaluate,
    bench, recommend for three goals, write the report."""
    from slimlm.demo import run_demo

    with _steps(json_out) as steps:
        summary = run_demo(out, say=_say, show=None if json_out else _render, full=full, steps=steps)
    if json_out:
        print_json(summary)
    else:
        console.print(f"[bold]Report:[/] {summary['report']}")
