"""CLI: `explain` and `fit`, on the area's modules rather than slimlm.api (which loads torch), so they answer
instantly."""

from __future__ import annotations

import typer
from rich.table import Table

from slimlm.cli.app import JSON_OPTION, app, columns_table, console, print_json  # noqa: F401


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _gib(n: int | None) -> str:
    from slimlm.inspect.fit import format_bytes

    return "-" if n is None else format_bytes(n)


def _num(n: int) -> str:
    """GiB with enough digits to tell small models apart."""
    value = n / 2**30
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


@app.command()
def explain(
    name: str = typer.Argument(..., metavar="NAME",
                               help="A model or file name: DeepSeek-R1-Distill-Qwen-7B-Q4_K_M, deepseek-r1:14b, "
                                    "Qwen2.5-7B-Instruct-AWQ, Q4_K_S, bf16, ..."),
    context: int = typer.Option(4096, "--context", help="Context length for the memory estimate."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Say what each part of a model name means, with parameters, bits per weight, file size and memory."""
    from slimlm.inspect.names import explain as explain_name

    data = explain_name(name, context=context)
    if json_out:
        print_json(data)
        return
    table = Table(title=data["input"], title_justify="left", show_lines=False)
    table.add_column("part", style="bold")
    table.add_column("kind")
    table.add_column("meaning")
    for part in data["parts"]:
        style = "red" if part["kind"] == "unknown" else None
        table.add_row(part["text"], part["kind"], part["meaning"], style=style)
    console.print(table)
    summary = Table(show_header=False, title_justify="left")
    summary.add_column("", style="bold")
    summary.add_column("")
    if data.get("model"):
        summary.add_row("model", data["model"])
    if data.get("variant"):
        summary.add_row("variant", data["variant"].get("meaning", data["variant"]["kind"]))
    params = data["parameters"]
    if params.get("count"):
        summary.add_row("parameters", f"{params['count']:,} ({params['label']})")
    if params.get("note"):
        summary.add_row("", params["note"])
    q = data.get("quantization")
    if q:
        summary.add_row("quantization", f"{q['scheme']} ({q['format']}): {q.get('bits_per_weight')} bits per weight")
        for line in q.get("high_precision") or []:
            summary.add_row("", line)
    if data.get("estimated_file_bytes"):
        summary.add_row("file size", f"about {_gb(data['estimated_file_bytes'])}")
    mem = data.get("memory")
    if mem:
        summary.add_row("memory", f"about {_gib(mem['total_bytes'])} at context {mem['context']} "
                        f"(weights {_gib(mem['weights_bytes'])} + KV cache {_gib(mem['kv_cache_bytes'])} "
                        f"+ overhead {_gib(mem['overhead_bytes'])})")
    for note in data.get("notes") or []:
        summary.add_row("note", note)
    if data.get("unknown"):
        summary.add_row("unknown", "; ".join(data["unknown"]), style="red")
    console.print(summary)


@app.command()
def fit(
    model: str = typer.Argument(..., metavar="MODEL",
                                help="HF model dir, .safetensors, .gguf, config.json, or a catalog name."),
    memory: str = typer.Option(..., "--memory", "-m", help="Memory budget: 8GiB, 16GB, 512MiB (K/M/G = binary)."),
    context: int = typer.Option(4096, "--context", help="Tokens of context per sequence."),
    batch: int = typer.Option(1, "--batch", help="Sequences held at once."),
    cache_type: str = typer.Option("f16", "--cache-type", help="KV cache type: f16, q8_0, q4_0, f32."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Which variants of MODEL fit in --memory (weights + KV cache + overhead), and the best one that does.

    Exit code 0 whether or not anything fits (the answer says what the smallest variant needs);
    2 for bad input.
    """
    from slimlm.inspect.fit import fit as fit_model

    data = fit_model(model, memory, context=context, batch=batch, cache_type=cache_type)
    if json_out:
        print_json(data)
        return
    table = columns_table(f"{data['model']} in {_gib(data['memory_bytes'])} "
                          f"(context {context} x batch {batch}, {cache_type} KV cache)",
                          ("variant", "bits/w", "weights", "KV", "overhead", "total", "headroom", "fits"), ["variant"],
                          title_justify="left")
    for row in data["variants"]:
        best = row["variant"] == data["best"]
        table.add_row(row["variant"] + (" *" if best else ""), f"{row['bits_per_weight']:.2f}",
                      _num(row["weights_bytes"]), _num(row["kv_cache_bytes"]), _num(row["overhead_bytes"]),
                      _num(row["total_bytes"]), _num(row["headroom_bytes"]), "yes" if row["fits"] else "no",
                      style="bold green" if best else (None if row["fits"] else "dim"))
    table.caption = "sizes in GiB; * = highest-quality variant that fits"
    console.print(table)
    console.print(data["message"], highlight=False)
    mix = data["budget_mix"]
    if mix["possible"]:
        console.print(f"A budget mix spends all {_gib(mix['weights_bytes'])} on the weights "
                      f"({mix['bits_per_weight']:.2f} bits/weight, a type per tensor by measured error): "
                      f"{mix['command']}", highlight=False)
    elif mix["weights_bytes"] < mix["smallest_bytes"]:
        console.print(f"No budget mix fits either: its smallest weights for this model take "
                      f"{_gib(mix['smallest_bytes'])} ({mix['smallest_bits_per_weight']:.2f} bits/weight; row lengths "
                      f"limit the types), and {_gib(max(mix['weights_bytes'], 0))} is left after the KV cache and "
                      "overhead.", highlight=False)
    console.print(f"[dim]{data['kv_cache']['note']}; {data['overhead_rule']}[/]", highlight=False)
