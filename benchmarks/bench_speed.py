"""slimlm bench on a test model: torch fp32 and bf16 side by side, and llama.cpp on the GGUF, batch 1 and 8.

The model is the shipped GGUF (SmolLM2-135M: Q4_1; --model qwen2, Qwen2.5-Coder-0.5B: a Q5_0/Q4_K/Q6_K/Q8_0 mix):
torch runs its dequantized weights (fp32 / bf16), llama.cpp runs the file natively, and --backends may add
slimlm's runtime on the file's own types (native); llama.cpp on the F16 GGUF (made by bench_eval.py) is added
when that file exists and --backends does not leave llama.cpp out. Ratios are against torch-fp32 at the same
batch size, measured in the same run.

    flock /tmp/slimlm-heavy.lock python benchmarks/bench_speed.py [--model qwen2] [--prompt 512] [--gen 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section, markdown_table  # noqa: E402
from bench_eval import MODELS  # noqa: E402

from slimlm import resources  # noqa: E402
from slimlm.evaluate.bench import bench, default_backends  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--backends", default=None, help="comma-separated (default: slimlm bench's for a GGUF file)")
    ap.add_argument("--no-f16", action="store_true", help="leave out llama.cpp on the F16 GGUF")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    name, shipped_gguf, _ = MODELS[args.model]
    shipped = {"smollm2": "Q4_1 GGUF", "qwen2": "shipped Q5_0/Q4_K/Q6_K/Q8_0 GGUF"}[args.model]
    gguf = shipped_gguf()
    backends = args.backends.split(",") if args.backends else default_backends(gguf)

    def progress(done: int, total: int, label: str) -> None:
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    report = bench(gguf, prompt=args.prompt, gen=args.gen, batches=batches, threads=args.threads,
                   backends=backends, runs=args.runs, progress=progress)
    rows = [(f"{r['backend']} ({shipped if r['backend'] in ('llama.cpp', 'native') else r['dtype']})", r)
            for r in report["rows"]]
    f16 = resources.cache_dir() / "bench" / f"{name}-F16.gguf"  # bench_eval.py's file
    if f16.is_file() and "llama.cpp" in backends and not args.no_f16:
        extra = bench(f16, prompt=args.prompt, gen=args.gen, batches=batches, threads=args.threads,
                      backends=["llama.cpp"], runs=args.runs, progress=progress)
        rows += [("llama.cpp (F16 GGUF)", r) for r in extra["rows"]]
    base = {r["batch"]: r for label, r in rows if r["backend"] == "torch-fp32"}
    table_rows = []
    for label, r in sorted(rows, key=lambda x: x[1]["batch"]):
        b = base[r["batch"]]
        table_rows.append([label, r["batch"], f"{r['prefill_tok_s']:.0f}",
                           f"{r['prefill_tok_s'] / b['prefill_tok_s']:.2f}×",
                           f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}×",
                           f"{r['ttft_ms']:.0f}", f"{r['itl_p50_ms']:.1f}", f"{r['itl_p95_ms']:.1f}",
                           f"{r['peak_rss_mb']:.0f}"])
    body = markdown_table(["backend", "batch", "prefill tok/s", "vs fp32", "decode tok/s", "vs fp32", "TTFT ms",
                           "ITL p50 ms", "ITL p95 ms", "peak RSS MiB"], table_rows)
    body += (f"\n\nprompt {args.prompt} random ids, {args.gen} greedy new tokens, {report['threads']} threads, "
             f"one warm-up then the median of {args.runs} runs per row (`slimlm bench`). Decode tok/s counts "
             "all sequences of the batch. Peak RSS is the process high-water mark over that row's runs, reset "
             "before them; it includes the interpreter, libraries and the loaded model (RSS just before the "
             f"runs ranged {min(r['rss_before_mb'] for _, r in rows):.0f}-"
             f"{max(r['rss_before_mb'] for _, r in rows):.0f}"
             " MiB).")
    if args.no_append:
        print(body)
    else:
        append_section(f"slimlm bench: {name}, torch fp32 / bf16 vs llama.cpp", body)


if __name__ == "__main__":
    main()
