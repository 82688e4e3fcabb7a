"""CLI commands of the eval area (`eval`, `bench`): parse, call slimlm.api, render with rich."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimlm.cli.app import (JSON_OPTION, app, columns_table, console, fitted_table, left_out_note, print_json,
                            progress_task)
from slimlm.evaluate.noise import BUSY_NOTE


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="Model: HF dir, GGUF file, or any model file slimlm writes."),
    data: str = typer.Option(..., "--data", help="Text file, JSONL (see --text-field), or hf:NAME:CONFIG@SPLIT "
                             "(a Hugging Face dataset; config and split optional)."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference model, or a file written by --save-ref: "
                                       "adds KL(P_ref||P_model) and top-1 agreement."),
    ctx: int = typer.Option(512, "--ctx", help="Window length in tokens (llama-perplexity's -c)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Evaluate only the first N windows."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass."),
    dtype: str = typer.Option("fp32", "--dtype", help="Compute dtype of the torch model(s): fp32, bf16, fp16."),
    save_ref: Optional[Path] = typer.Option(None, "--save-ref", help="Store the reference's log-probs (REF, or "
                                            "MODEL when no --ref) in this .safetensors file for later --ref."),
    ref_top_k: int = typer.Option(0, "--ref-top-k", help="With --save-ref: 0 stores all log-probs (float16); "
                                  "K stores the top K per token plus a tail bucket (KLD becomes a lower bound)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer dir or GGUF, for models "
                                             "saved without one."),
    text_field: str = typer.Option("text", "--text-field", help="JSONL / dataset field holding the text."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --save-ref file."),
    act_quant: str = typer.Option("none", "--act-quant", help="none: evaluate a GGUF's dequantized weights "
                                  "exactly; llama.cpp: also round each matmul input as llama.cpp's CPU kernels do "
                                  "(Q8_K / Q8_0 / f16 by weight type) and attention's operands as its f16 KV "
                                  "cache does, to compare with llama.cpp's numbers."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Perplexity ± standard error with llama.cpp's protocol; with --ref, KL divergence and top-1 agreement."""
    from slimlm import api

    with progress_task("evaluating windows", disable=json_out) as update:
        report = api.evaluate(model, data, ref=ref, ctx=ctx, chunks=chunks, batch_size=batch_size, dtype=dtype,
                              save_ref=save_ref, ref_top_k=ref_top_k, tokenizer=tokenizer, text_field=text_field,
                              overwrite=overwrite, act_quant=act_quant,
                              progress=lambda done, total: update(completed=done, total=total))
    if json_out:
        print_json(report)
        return
    ppl = report["perplexity"]
    table = columns_table(f"{Path(report['model']['path']).name} on {Path(report['data']).name}",
                          ("measure", "value"), ["measure"], show_header=True)
    table.columns[0].no_wrap = True
    table.add_row("windows x ctx", f"{report['chunks']} x {report['ctx']} ({ppl['n_tokens']} scored tokens)")
    table.add_row("perplexity", f"{ppl['ppl']:.4f} ± {ppl['ppl_stderr']:.4f}")
    if "kld" in report:
        k = report["kld"]
        table.add_row("reference perplexity", f"{report['ref_perplexity']['ppl']:.4f} "
                      f"± {report['ref_perplexity']['ppl_stderr']:.4f}")
        table.add_row("ln(PPL/PPL_ref)", f"{k['ln_ppl_ratio']:.5f}")
        table.add_row("KLD mean (nats)", f"{k['kld_mean']:.6f} ± {k['kld_stderr']:.6f}")
        table.add_row("KLD median", f"{k['kld_median']:.6f}")
        table.add_row("KLD p99", f"{k['kld_p99']:.6f}")
        table.add_row("KLD max", f"{k['kld_max']:.6f}")
        table.add_row("top-1 agreement", f"{100 * k['top1_agreement']:.3f} ± {100 * k['top1_stderr']:.3f} %")
        if report["ref"]["kind"] == "file":
            table.add_row("reference", f"{report['ref']['path']} ({report['ref']['layout']})")
    if "saved_ref" in report:
        table.add_row("saved reference", f"{report['saved_ref']['path']} ({report['saved_ref']['layout']})")
    table.add_row("time", f"{report['seconds']:.1f} s ({report['scored_tokens_per_second']:.0f} scored tok/s)")
    console.print(table)


@app.command("bench")
def bench_cmd(
    model: Path = typer.Argument(..., help="Model: HF dir or GGUF file (llama.cpp runs GGUF files)."),
    prompt: int = typer.Option(512, "--prompt", help="Prompt length in tokens."),
    gen: int = typer.Option(128, "--gen", help="New tokens per run (greedy, EOS ignored)."),
    batch: str = typer.Option("1,8", "--batch", help="Comma-separated batch sizes."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Comma-separated backends (default: "
                                          "torch-fp32,torch-bf16, plus llama.cpp for GGUF files)."),
    runs: int = typer.Option(6, "--runs", help="Timed rounds after one warm-up, backends taking turns; figures are "
                             "medians with an order-statistic interval (95% from 6 runs)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Prefill and decode tokens/s, time to first token, inter-token latency p50/p95, peak RSS per backend."""
    from slimlm import api
    from slimlm.errors import SlimlmError

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise SlimlmError(f"--batch takes comma-separated integers, not {batch!r}") from None
    backends = [b.strip() for b in backend.split(",") if b.strip()] if backend else None
    with progress_task("bench: loading", disable=json_out) as update:
        report = api.bench(model, prompt=prompt, gen=gen, batches=batches, threads=threads, backends=backends,
                           runs=runs, progress=lambda done, total, label: update(completed=done, total=total,
                                                                                 description=label))
    if json_out:
        print_json(report)
        return
    rows, coverage = [], min(r["interval_coverage"] for r in report["rows"])
    for r in report["rows"]:
        iv = r["intervals"]
        rows.append([r["backend"], str(r["batch"]), f"{r['prefill_tok_s']:.1f} ({iv['prefill_tok_s'][0]:.1f}-"
                     f"{iv['prefill_tok_s'][1]:.1f})", f"{r['decode_tok_s']:.1f} ({iv['decode_tok_s'][0]:.1f}-"
                     f"{iv['decode_tok_s'][1]:.1f})", f"{r['ttft_ms']:.1f}", f"{r['itl_p50_ms']:.2f}",
                     f"{r['itl_p95_ms']:.2f}", f"{r['peak_rss_mb']:.0f}", "unstable" if r["unstable"] else ""])
    table, dropped = fitted_table(
        f"{Path(report['model']).name}: prompt {prompt}, gen {gen}, {report['threads']} threads, median of {runs} "
        f"runs (round-robin) and its {coverage:.0%} interval",
        [("backend", 10), ("batch", 9), ("prefill tok/s", 8), ("decode tok/s", 8), ("TTFT ms", 5),
         ("ITL p50 ms", 6), ("ITL p95 ms", 4), ("peak RSS MiB", 3), ("", 7)], rows, left=("backend", ""))
    console.print(table)
    if dropped:
        console.print(left_out_note(dropped))
    machine = report["machine"] or {}
    if machine.get("busy"):
        console.print(f"[bold yellow]warning:[/] {BUSY_NOTE} ({'; '.join(machine['reasons'])})", highlight=False)
