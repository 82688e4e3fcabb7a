"""CLI commands of the quantize area: parse, call slimlm.api, render with rich."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slimlm.cli.app import JSON_OPTION, app, columns_table, console, err_console, print_json, progress_task


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# --help shows the options in these panels, so a user sees which apply to the target chosen.
_OUTPUT, _BOTH = "Output", "Method and calibration (--to and --scheme)"
_GGUF, _CT, _LINT = "GGUF (--to)", "compressed-tensors (--scheme)", "Lint (--check)"
_BUDGET = "GGUF budget mix (instead of --to; needs --calib)"


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Hugging Face model dir, or a .gguf to re-quantize."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", rich_help_panel=_OUTPUT,
                                       help="Output .gguf file (--to), or output dir (--scheme)."),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=_OUTPUT, help=(
        "Replace an existing output (it stays whole until the new one is complete). An output is written under a "
        "temporary name and renamed in, so a kill or a full disk never leaves a partial one; while a run writes "
        "it, a second run to the same output refuses at once (exit 2), with or without --overwrite.")),
    method: Optional[str] = typer.Option(None, "--method", rich_help_panel=_BOTH, help=(
        "The algorithm. --to: llama.cpp (default) | gptq | awq | awq+gptq (these need --calib; awq also works "
        "with --imatrix; a budget mix takes llama.cpp or gptq). --scheme: rtn | awq | gptq | awq+gptq | "
        "smoothquant | smoothquant+gptq (default: awq for w4a16, rtn for w8a16, smoothquant for w8a8).")),
    calib: Optional[Path] = typer.Option(None, "--calib", rich_help_panel=_BOTH, help=(
        "Calibration text. --to: a text file the importance matrix (and for gptq/awq the inputs' covariance) "
        "is computed from first, instead of --imatrix (--calib-chunks windows of 512 tokens). --scheme: a "
        ".txt/.jsonl file or HF dataset (--samples sequences of --seq-len tokens; default: text the model "
        "writes itself).")),
    to: Optional[str] = typer.Option(None, "--to", rich_help_panel=_GGUF, help=(
        "GGUF type mix as llama.cpp names it: Q4_K_M, Q8_0, Q2_K, ..., or f32/f16/bf16.")),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", rich_help_panel=_GGUF,
                                           help="llama.cpp importance matrix (.gguf or legacy .dat)."),
    calib_chunks: int = typer.Option(100, "--calib-chunks", rich_help_panel=_GGUF,
                                     help="512-token windows of --calib to use."),
    tensor_type: List[str] = typer.Option([], "--tensor-type", rich_help_panel=_GGUF,
                                          help="REGEX=TYPE override, e.g. 'attn_v=q8_0' (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", rich_help_panel=_GGUF,
                                 help="Print the per-tensor plan and size; write nothing."),
    show_plan: bool = typer.Option(False, "--plan", rich_help_panel=_GGUF,
                                   help="List every tensor's type (implied by --dry-run)."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", rich_help_panel=_BUDGET, help=(
        "Choose a type per tensor for at most this many bits per weight (tensor bytes x 8 / parameters), "
        "least measured output error.")),
    target_size: Optional[str] = typer.Option(None, "--target-size", rich_help_panel=_BUDGET, help=(
        "Same, for at most this much tensor data: 90MB, 1.5GiB.")),
    fit_memory: Optional[str] = typer.Option(None, "--fit", rich_help_panel=_BUDGET, help=(
        "Same, so that weights + KV cache of --context tokens + runtime overhead fit this memory: 8GiB.")),
    context: int = typer.Option(4096, "--context", rich_help_panel=_BUDGET, help="Context length --fit plans for."),
    batch: int = typer.Option(1, "--batch", rich_help_panel=_BUDGET, help="Sequences --fit plans the KV cache for."),
    cache_type: str = typer.Option("f16", "--cache-type", rich_help_panel=_BUDGET,
                                   help="KV cache type --fit plans for: f16, q8_0, q4_0, f32."),
    budget_windows: int = typer.Option(4, "--budget-windows", rich_help_panel=_BUDGET, help=(
        "512-token windows of --calib on which each tensor group's effect on the output (KLD) is measured.")),
    per_layer: bool = typer.Option(True, "--per-layer/--per-kind", rich_help_panel=_BUDGET, help=(
        "Measure every tensor's effect on its own (default), or one scale per tensor kind (faster, "
        "coarser: massive-activation layers get mispriced).")),
    # --- compressed-tensors schemes (W4A16/W8A16/W8A8): see slimlm/cli/scheme_quantize.py ---
    scheme: Optional[str] = typer.Option(None, "--scheme", rich_help_panel=_CT, help=(
        "w4a16 | w8a16 | w8a8: write a compressed-tensors dir (vLLM/transformers) instead of GGUF.")),
    group_size: Optional[str] = typer.Option(None, "--group-size", rich_help_panel=_CT, help=(
        "32 | 64 | 128 | channel (default 128 for w4a16; a size that does not divide is adapted and reported; "
        "also the size --check tests).")),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", rich_help_panel=_CT, help=(
        "Symmetric or asymmetric weights (default: asym for w4a16, sym for w8).")),
    ignore: List[str] = typer.Option([], "--ignore", rich_help_panel=_CT, help=(
        "Module name or 're:REGEX' kept in full precision (repeatable; lm_head always kept).")),
    samples: Optional[int] = typer.Option(None, "--samples", rich_help_panel=_CT, help=(
        "Calibration sequences of --seq-len tokens (default 16 from --calib; 8 when the model writes its own).")),
    seq_len: int = typer.Option(512, "--seq-len", rich_help_panel=_CT, help="Tokens per calibration sequence."),
    static_acts: bool = typer.Option(False, "--static-acts", rich_help_panel=_CT, help=(
        "w8a8: static per-tensor activation scales instead of dynamic per-token (with --check: warns where "
        "vLLM's CPU build would ignore them).")),
    spill: Optional[Path] = typer.Option(None, "--spill", "--offload", rich_help_panel=_CT, help=(
        "Keep calibration activations in this dir between layers (bounded RAM).")),
    threads: Optional[int] = typer.Option(None, "--threads", rich_help_panel=_CT, help="CPU threads for torch."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel=_CT, help=(
        "Keep each finished layer in OUT.partial/ and, rerun after a kill, continue where it stopped "
        "(same output bytes as an uninterrupted run).")),
    check: bool = typer.Option(False, "--check", rich_help_panel=_LINT, help=(
        "Lint only, write nothing: per layer which group sizes divide and which vLLM TP degrees (2/4/8) work.")),
    json_out: bool = JSON_OPTION,
) -> None:
    """Quantize a model: to a llama.cpp GGUF (--to TYPE, one streaming pass), or to compressed-tensors
    (--scheme w4a16|w8a16|w8a8 --method ..., layer-by-layer calibration), or lint it (--check)."""
    from slimlm.cli import scheme_quantize
    from slimlm.errors import SlimlmError

    if check:
        return scheme_quantize.run_check(model, group_size, json_out, static_acts)
    if scheme is not None:
        if to is not None:
            raise SlimlmError("give either --to TYPE (GGUF) or --scheme (compressed-tensors), not both")
        return scheme_quantize.run_scheme(
            model, out, scheme=scheme, method=method, group_size=group_size, sym=sym, ignore=ignore, calib=calib,
            samples=samples, seq_len=seq_len, static_acts=static_acts, spill=spill, threads=threads, resume=resume,
            overwrite=overwrite, json_out=json_out)
    budget = _budget(target_bpw, target_size, fit_memory, context, batch, cache_type)
    if to is None and budget is None:
        raise SlimlmError("give --to TYPE (a GGUF mix such as Q4_K_M), a budget (--target-bpw, --target-size, "
                          "--fit), or --scheme w4a16|w8a16|w8a8, or --check")

    with progress_task(f"quantizing to {to or budget.describe()}", item="", disable=json_out or dry_run, silent=dry_run) as update:
        from slimlm.algorithms.methods import GGUF_METHODS
        from slimlm.quantize.gguf import quantize_gguf  # = api's; lighter import

        gguf_method = method or "llama.cpp"
        if gguf_method not in GGUF_METHODS:
            raise SlimlmError(f"--method {method} is for --scheme; GGUF (--to) methods: {', '.join(GGUF_METHODS)}")
        result = quantize_gguf(model, to, out, imatrix=imatrix, calib=calib, calib_chunks=calib_chunks,
                                   tensor_types=tensor_type, dry_run=dry_run, overwrite=overwrite, method=gguf_method,
                                   budget=budget, budget_windows=budget_windows, per_layer=per_layer,
                                   progress=lambda done, total, name: update(completed=done, total=total, item=name))
    if json_out:
        print_json(result.to_dict())
        return
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if dry_run or show_plan:
        table = columns_table(f"{result.ftype} plan for {Path(result.model).name}",
                              ("tensor", "shape", "type", "bytes"), ["tensor", "shape", "type"])
        for t in result.tensors:
            table.add_row(t.name, "×".join(map(str, t.shape)), t.type, f"{t.bytes:,}")
        console.print(table)
    mix = ", ".join(f"{k} ×{v}" for k, v in sorted(result.type_counts.items()))
    size = result.file_bytes if result.file_bytes is not None else result.tensor_bytes
    what = "would write" if dry_run else f"wrote {result.out}"
    console.print(f"{what}: {result.ftype}, {_human(size)} ({size:,} bytes{' of tensor data' if dry_run else ''}), "
                  f"{result.bits_per_weight:.2f} bits/weight, {result.n_params:,} params; {mix}"
                  + (f"; imatrix covers {result.imatrix_entries} tensors" if result.imatrix_entries else "")
                  + ("" if dry_run else f"; {result.seconds:.1f} s"), highlight=False)


def _budget(target_bpw: float | None, target_size: str | None, fit_memory: str | None, context: int, batch: int,
            cache_type: str):
    """The budget the options ask for (quantize.budget.Budget), or None for a fixed mix."""
    if target_bpw is None and target_size is None and fit_memory is None:
        return None
    from slimlm.inspect.fit import parse_memory
    from slimlm.quantize.budget import Budget

    return Budget(target_bpw=target_bpw, target_bytes=parse_memory(target_size) if target_size else None,
                  fit_memory=parse_memory(fit_memory) if fit_memory else None, context=context, batch=batch,
                  cache_type=cache_type)


@app.command("imatrix")
def imatrix_cmd(
    model: Path = typer.Argument(..., help="Hugging Face model dir or .gguf."),
    calib: Path = typer.Option(..., "--calib", help="Calibration text file (e.g. wikitext-2 valid)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output imatrix: .gguf (llama.cpp's current form) or .dat (legacy)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Use at most this many windows (default: all)."),
    ctx: int = typer.Option(512, "--ctx", help="Window length in tokens (llama-imatrix -c)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Compute llama.cpp's importance matrix (sum of squared activations per input column of every matrix)."""
    from slimlm import api

    with progress_task("imatrix", item="", disable=json_out) as update:
        result = api.imatrix(model, calib, out, chunks=chunks, ctx=ctx, overwrite=overwrite,
                             progress=lambda d, t: update(completed=d, total=t, item="windows"))
    if json_out:
        print_json(result)
        return
    console.print(f"wrote {result['out']}: {result['entries']} matrices, {result['chunks']} windows × "
                  f"{result['chunk_size']} tokens ({result['format']})", highlight=False)


@app.command("convert")
def convert_cmd(
    model: Path = typer.Argument(..., help="A .gguf file."),
    out: Path = typer.Option(..., "-o", "--out", help="Output Hugging Face model dir."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16 weights (the file's dequantized values)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output dir."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Write a GGUF as a Hugging Face dir (config.json, safetensors, tokenizer): the way back from `quantize --to`."""
    from slimlm import api

    with err_console.status("converting", spinner="dots"):
        done = api.convert(model, out, dtype=dtype, overwrite=overwrite)
    size = sum(p.stat().st_size for p in done.iterdir())
    if json_out:
        print_json({"out": str(done), "dtype": dtype, "bytes": size})
        return
    console.print(f"wrote {done}: {dtype}, {_human(size)}", highlight=False)
