"""CLI commands of the inspect area: parse, call slimlm.api, render with rich."""

from __future__ import annotations

import typer
from rich.table import Table

from slimlm.cli.app import JSON_OPTION, app, columns_table, console, err_console, print_json  # noqa: F401

_ROLE_NAMES = {"mlp": "MLP (dense)", "routed_experts": "routed experts", "shared_experts": "shared experts"}


def _bytes(n: int) -> str:
    from slimlm.inspect.fit import format_bytes

    return format_bytes(n)


@app.command()
def inspect(
    target: str = typer.Argument(..., metavar="PATH|NAME",
                                 help="HF model dir, .safetensors, .gguf, config.json, or a catalog name "
                                      "(deepseek-r1, deepseek-r1:14b, SmolLM2-135M, ...)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Count a model's parameters (total, by role, active per token for MoE) from headers alone, no weights loaded."""
    # Not slimlm.api (it re-exports this but loads torch for other areas): inspecting must stay instant.
    from slimlm.inspect import inspect as inspect_target

    report = inspect_target(target)
    data = report.to_dict()
    if json_out:
        print_json(data)
        return
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    _print_summary(data)
    _print_roles(data)
    if data.get("dtypes"):
        _print_dtypes(data)
    if data.get("gguf"):
        _print_gguf(data["gguf"])


def _print_summary(data: dict) -> None:
    table = Table(title=f"{data['name'] or data['source']}", show_header=False, title_justify="left")
    table.add_column("", style="bold", no_wrap=True)  # names whole; values wrap between words
    table.add_column("")
    table.add_row("source", f"{data['source']} ({data['format']}, counted from {data['counted_from']})")
    if data.get("model_type"):
        table.add_row("architecture", str(data["model_type"]))
    table.add_row("parameters", f"{data['total_params']:,} ({data['label']})")
    catalog = data.get("catalog")
    if catalog:
        table.add_row("name says", catalog["vendor_label"])
        published = catalog["published"].get("total_params")
        if published:
            table.add_row("published", f"{published:,} ({catalog['published']['source']})")
    table.add_row("tied embeddings", "yes (embedding and lm_head counted once)" if data["tied_embeddings"] else "no")
    if "active_params" in data:
        table.add_row("active per token", f"{data['active_params']:,} ({data['active_label']})")
        table.add_row("  with embeddings", f"{data['active_with_embeddings']:,}")
        table.add_row("  definition", data["active_definition"])
    if "mtp_params" in data:
        table.add_row("MTP module (not in total)",
                      f"{data['mtp_params']:,} stored, {data['mtp_unique_params']:,} unique "
                      "(the rest are copies of the embedding and lm_head)")
    if data.get("file_bytes"):
        table.add_row("file size", f"{data['file_bytes']:,} bytes ({_bytes(data['file_bytes'])})")
    if data.get("missing_bytes"):
        table.add_row("missing bytes", f"{data['missing_bytes']:,} (partial download)")
    for note in data.get("notes", []):
        table.add_row("note", note)
    console.print(table)


def _print_roles(data: dict) -> None:
    table = columns_table("parameters by role", ("role", "parameters", "share"), ["role"], title_justify="left")
    total = data["total_params"] or 1
    for role, count in data["roles"].items():
        if count:
            table.add_row(_ROLE_NAMES.get(role, role), f"{count:,}", f"{100 * count / total:.2f}%")
    table.add_row("[bold]total[/]", f"[bold]{data['total_params']:,}[/]", "100.00%")
    console.print(table)


def _print_dtypes(data: dict) -> None:
    scales = any(row.get("scales") for row in data["dtypes"].values())
    heads = ("dtype", "tensors", "params") + (("scale values",) if scales else ()) + ("bytes",)
    table = columns_table("storage by dtype", heads, ["dtype"], title_justify="left")
    for dtype, row in data["dtypes"].items():
        cells = [dtype, str(row["tensors"]), f"{row['params']:,}"] + ([f"{row['scales']:,}"] if scales else [])
        table.add_row(*cells, f"{row['bytes']:,} ({_bytes(row['bytes'])})")
    console.print(table)


def _print_gguf(gguf: dict) -> None:
    table = columns_table(f"GGUF quant mix: {gguf['bits_per_weight']} bits per weight in tensors, "
                          f"{gguf['file_bits_per_weight']} in the whole file",
                          ("type", "tensors", "share of params", "bits/weight"), ["type"], title_justify="left")
    for row in gguf["quant_mix"]:
        table.add_row(row["type"], str(row["tensors"]), f"{100 * row['share_of_params']:.2f}%",
                      f"{row['bits_per_weight']:.2f}")
    console.print(table)
    kinds = {k: v for k, v in (gguf.get("per_tensor_kind") or {}).items() if set(v) != {"F32"}}
    if kinds:
        title = "per-tensor types (layers)" + (f": a budget mix for {gguf['budget']}" if gguf.get("budget") else "")
        table = columns_table(title, ("tensor", "types in layers"), ["tensor", "types in layers"],
                              title_justify="left")
        for kind, by_type in kinds.items():
            table.add_row(kind, "; ".join(f"{t} {layers}" for t, layers in by_type.items()))
        console.print(table)
