"""CLI commands of the eval area (`eval`, `bench`): parse, call slimlm.api, render with rich."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimlm.cli.app import (JSON_OPTION, app, columns_table, console, err_console, fitted_table, left_out_note,
                            print_json, progress_task)
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
    backend: str = typer.Option("torch", "--backend", help="torch (slimlm's own forward) or vllm (vLLM's "
                                "prompt log-probs, bf16; perplexity only; see `slimlm bench --backend vllm`)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Perplexity ± standard error with llama.cpp's protocol; with --ref, KL divergence and top-1 agreement."""
    from slimlm import api
    from slimlm.errors import SlimlmError

    if backend not in ("torch", "vllm"):
        raise SlimlmError(f"--backend must be torch or vllm, not {backend!r}")
    if backend == "vllm":
        if ref is not None or save_ref is not None or act_quant != "none":
            raise SlimlmError("--backend vllm reports perplexity only: drop --ref, --save-ref and --act-quant")
        with err_console.status("vLLM: loading and scoring", spinner="dots"):
            report = api.evaluate_vllm(model, data, ctx=ctx, chunks=chunks, tokenizer=tokenizer,
                                       text_field=text_field)
    else:
        with progress_task("evaluating windows", disable=json_out) as update:
            report = api.evaluate(model, data, ref=ref, ctx=ctx, chunks=chunks, batch_size=batch_size, dtype=dtype,
                                  save_ref=save_ref, ref_top_k=ref_top_k, tokenizer=tokenizer,
                                  text_field=text_field, overwrite=overwrite, act_quant=act_quant,
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
    if report["model"].get("engine") == "vllm":
        m = report["model"]
        table.add_row("engine", f"vLLM {m['vllm_version']} ({m['dtype']}, quantization {m['quantization']})")
        for kernel in m["kernels"]:
            table.add_row("vLLM kernel", kernel)
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
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="--backend vllm: concurrent streams against "
                                    "vLLM's OpenAI-compatible server, comma-separated."),
    requests_per_stream: int = typer.Option(2, "--requests-per-stream", help="--backend vllm: requests each "
                                            "stream sends per round."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Prefill and decode tokens/s, time to first token, inter-token latency p50/p95, peak RSS per backend.
    --backend vllm: vLLM's server under concurrent streams (TTFT, ITL, requests/s, output tok/s) and offline
    LLM.generate throughput."""
    from slimlm import api
    from slimlm.errors import SlimlmError

    if backend is not None and "vllm" in [b.strip() for b in backend.split(",")]:
        if backend.strip() != "vllm":
            raise SlimlmError("--backend vllm runs alone (its own processes); bench the other backends separately")
        try:
            streams = tuple(int(c) for c in concurrency.split(",") if c.strip())
        except ValueError:
            raise SlimlmError(f"--concurrency takes comma-separated integers, not {concurrency!r}") from None
        return _bench_vllm(model, prompt, gen, streams, requests_per_stream, runs, json_out)
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


def _bench_vllm(model: Path, prompt: int, gen: int, streams: tuple[int, ...], per_stream: int, runs: int,
                json_out: bool) -> None:
    from slimlm import api

    target = api.VllmTarget(model.name, model)
    with err_console.status("vLLM", spinner="dots") as status:
        say = (lambda m: status.update(f"vLLM: {m}"))
        server = api.vllm_serve_bench([target], concurrency=streams, prompt=prompt, gen=gen, runs=runs,
                                      requests_per_stream=per_stream, progress=say)
        offline = api.vllm_offline_bench([target], batch=max(streams), prompt=prompt, gen=gen, runs=runs,
                                         progress=say)
    if json_out:
        print_json({"server": server, "offline": offline})
        return
    table = columns_table(f"{model.name} on vLLM's server: prompt {prompt}, gen {gen}, median of {runs} rounds",
                          ("streams", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms",
                           "ITL p95 ms"), [], show_header=True)
    for r in server["rows"]:
        table.add_row(str(r["concurrency"]), f"{r['requests_per_s']:.2f}", f"{r['output_tok_s']:.1f}",
                      f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p95_ms']:.0f}", f"{r['itl_p50_ms']:.1f}",
                      f"{r['itl_p95_ms']:.1f}")
    console.print(table)
    o = offline["rows"][0]
    console.print(f"offline LLM.generate, {o['batch']} prompts: {o['requests_per_s']:.2f} req/s, "
                  f"{o['output_tok_s']:.1f} output tok/s; vLLM {o['vllm_version']}, quantization "
                  f"{o['quantization']}; kernels: {'; '.join(o['kernels']) or 'unquantized linear'}", highlight=False)
    if (server.get("machine") or {}).get("busy"):
        console.print(f"[bold yellow]warning:[/] {BUSY_NOTE}", highlight=False)
