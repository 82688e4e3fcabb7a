"""Quantized runtime on SmolLM2-135M: fp32 vs bf16 vs W8A8 vs W4A16 (and GGUF files vs llama.cpp).

All models are loaded in one process and measured in interleaved rounds (fp32, bf16, w8a8, ... then again),
so load changes on a shared machine hit every variant alike; figures are medians over rounds and every
ratio is against fp32 measured in the same rounds. Greedy decoding (slimlm.runtime.generate_ids), EOS ignored.
Every variant runs on slimlm's runtime path, the lean forward with a static KV cache (runtime.fastpath), so
fp32/bf16 and the low-bit schemes differ only in their weights and kernels; the "(transformers forward)"
rows run the fp models through transformers' forward and DynamicCache, for what the lean path alone buys.

    flock /tmp/slimlm-heavy.lock python benchmarks/bench_runtime.py [--rounds 3] [--gen 32] [--gguf]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, publish  # noqa: E402

from slimlm import resources  # noqa: E402
from slimlm.runtime import (  # noqa: E402
    W4A16Config, W8A8Config, generate_ids, kernel_report, load_quantized, quantize_, summarize_kernels,
)
from slimlm.runtime.generate import forward_logits  # noqa: E402
from slimlm.runtime import int4pack, kernels  # noqa: E402
from slimlm.runtime.linear import W4A16Linear  # noqa: E402
from slimlm.runtime.swap import model_weight_bytes  # noqa: E402


def load_variants(hf_dir: Path, with_files: bool, tmp: Path, with_hf_rows: bool = True
                  ) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    def fp(dtype=torch.float32):
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()

    models = {"fp32": fp(), "bf16": fp(torch.bfloat16)}
    if with_hf_rows:  # the same fp models through transformers' forward: what the lean forward alone buys
        models["fp32" + HF_SUFFIX] = models["fp32"]
        models["bf16" + HF_SUFFIX] = models["bf16"]
    models["w8a8"] = fp()
    quantize_(models["w8a8"], W8A8Config())
    models["w8a8 (fp32 around)"] = fp()
    quantize_(models["w8a8 (fp32 around)"], W8A8Config(dtype=torch.float32))
    models["w4a16"] = fp()
    quantize_(models["w4a16"], W4A16Config(group_size=128))
    if with_files:  # compressed-tensors dirs written by slimlm's quantizer, loaded by load_quantized
        from slimlm.quantize.layers import quantize_model

        models["w8a8 SmoothQuant (file)"] = load_quantized(smoothquant_w8a8_dir(hf_dir, tmp))
        out = tmp / "smollm2-w4a16"
        if not (out / "config.json").is_file():
            quantize_model(hf_dir, out, scheme="w4a16", method="rtn")
        models["w4a16 RTN (file)"] = load_quantized(out)
    return models


HF_SUFFIX = " (transformers forward)"  # rows run through transformers' own forward and DynamicCache


def uses_lean(name: str) -> bool:
    return not name.endswith(HF_SUFFIX)


def prefill_s(model, ids, lean: bool = True) -> float:
    start = time.perf_counter()
    forward_logits(model, ids, logits_to_keep=1, lean=lean)
    return time.perf_counter() - start


def measure(models, prompt: int, decode_prompt: int, gen: int, rounds: int) -> dict[str, dict[str, float]]:
    gen_ids = torch.Generator().manual_seed(0)
    vocab = int(next(iter(models.values())).config.vocab_size)
    long = torch.randint(0, vocab, (1, prompt), generator=gen_ids)
    short1 = torch.randint(0, vocab, (1, decode_prompt), generator=gen_ids)
    short8 = torch.randint(0, vocab, (8, decode_prompt), generator=gen_ids)
    samples = {name: {"prefill": [], "d1": [], "d8": [], "ttft": [], "p50": [], "p95": []} for name in models}
    for r in range(rounds + 1):  # round 0 warms up (oneDNN primitive caches, first-touch memory)
        for name, model in models.items():
            lean = uses_lean(name)
            p = prefill_s(model, long, lean)
            one = generate_ids(model, short1, max_new_tokens=gen if r else 4, lean=lean)
            eight = generate_ids(model, short8, max_new_tokens=gen if r else 4, lean=lean)
            if r:
                s = samples[name]
                s["prefill"].append(prompt / p)
                s["d1"].append(one.decode_tokens_per_s)
                s["d8"].append(eight.decode_tokens_per_s)
                s["ttft"].append(one.ttft_s * 1e3)
                s["p50"].append(one.itl_ms(0.5))
                s["p95"].append(one.itl_ms(0.95))
            print(f"round {r} {name}: prefill {prompt / p:.0f} tok/s, decode b1 {one.decode_tokens_per_s:.1f}, "
                  f"b8 {eight.decode_tokens_per_s:.1f}", file=sys.stderr, flush=True)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


def weight_mb(model) -> float:
    return model_weight_bytes(model) / 2**20


def speed_section(models, med, args) -> tuple[str, list[str]]:
    base = med["fp32"]
    rows = []
    for name, m in med.items():
        rows.append([name, f"{m['prefill']:.0f}", f"{m['prefill'] / base['prefill']:.2f}x",
                     f"{m['d1']:.1f}", f"{m['d1'] / base['d1']:.2f}x", f"{m['d8']:.1f}",
                     f"{m['d8'] / base['d8']:.2f}x", f"{m['ttft']:.0f}", f"{m['p50']:.1f}", f"{m['p95']:.1f}",
                     f"{weight_mb(models[name]):.0f}"])
    table = markdown_table(["variant", f"prefill tok/s (p{args.prompt})", "vs fp32", "decode b1 tok/s", "vs fp32",
                            "decode b8 tok/s", "vs fp32", f"TTFT ms (p{args.decode_prompt})", "ITL p50 ms",
                            "ITL p95 ms", "weights+buffers MB"], rows)
    checks = []
    w8, w4 = med["w8a8"], med["w4a16"]
    checks.append(f"W8A8 prefill {w8['prefill'] / base['prefill']:.2f}x fp32 (target ≥ 2), "
                  f"{w8['prefill'] / med['bf16']['prefill']:.2f}x bf16 (target ≥ 1)")
    checks.append(f"W4A16 decode b1 {w4['d1'] / base['d1']:.2f}x fp32 (target ≥ 2.5)")
    checks.append(f"W8A8 decode b8 {w8['d8'] / base['d8']:.2f}x fp32 (target ≥ 1.5)")
    hf = med.get("fp32" + HF_SUFFIX)
    if hf:  # the same targets against the fp32 model on transformers' own forward
        checks.append(f"against fp32{HF_SUFFIX}: W8A8 prefill {w8['prefill'] / hf['prefill']:.2f}x, W4A16 decode b1 "
                      f"{w4['d1'] / hf['d1']:.2f}x, W8A8 decode b8 {w8['d8'] / hf['d8']:.2f}x")
    kern = []
    for name, model in models.items():
        counts = summarize_kernels(kernel_report(model))
        kern.append([name, "; ".join(f"{n}× {k}" for k, n in counts.items()) or "torch F.linear (nn.Linear)"])
    name = "SmolLM2-135M-Instruct (builtin fp32 dir" if args.model is None else f"{Path(args.model).name} ({args.model}"
    body = (f"{name}; W8A8/W4A16 = RTN by `quantize_`, lm_head included, "
            f"all rows on slimlm's lean forward with a static KV cache except those marked transformers forward; "
            f"W4A16 group 128, or 64 where the columns are not a multiple of 128; '(file)' rows: compressed-tensors dirs written by `slimlm quantize`, "
            f"loaded by `load_quantized`, kernels listed below), {torch.get_num_threads()} threads. Medians of {args.rounds} "
            f"interleaved rounds after a warm-up round. Prefill: one forward of {args.prompt} random tokens. "
            f"Decode: {args.gen} greedy tokens after a {args.decode_prompt}-token prompt, tokens/s over the decode "
            f"steps (all rows); TTFT/ITL from the batch-1 run.\n\n{table}\n\n"
            + "\n".join(f"- {c}" for c in checks) + "\n\nKernels per variant:\n\n"
            + markdown_table(["variant", "layers × kernel"], kern))
    return body, checks


def smoothquant_w8a8_dir(hf_dir: Path, work: Path) -> Path:
    """slimlm's default W8A8 (``slimlm quantize --scheme w8a8``: SmoothQuant, strength 0.8, wikitext-2 valid
    calibration) as a compressed-tensors dir, made once and cached in ``work``."""
    out = work / "smollm2-w8a8-smoothquant"
    if not (out / "config.json").is_file():
        from slimlm.quantize.layers import quantize_model

        quantize_model(hf_dir, out, scheme="w8a8", method="smoothquant")
    return out


def accuracy_section(hf_dir: Path, wikitext: Path, chunks: int, work: Path) -> str:
    """Fast path vs its reference: first-layer and logits relative error, perplexity on wikitext-2 test windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.evaluate.perplexity import make_windows, perplexity_stats, windows_nll
    from slimlm.data.text import TokenizedText
    from slimlm.runtime.fastpath import LeanModule

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor(tok(wikitext.read_text()[:200_000], add_special_tokens=False)["input_ids"])
    windows = make_windows(TokenizedText(ids, False, None, "wikitext-2 test"), 512, chunks)

    def ppl(model):
        return perplexity_stats(windows_nll(model, windows).reshape(-1)).ppl

    def first_layer_and_logits(fast, ref) -> tuple[float, float]:
        outs = []
        hooks = [m.model.layers[0].register_forward_hook(lambda mod, i, o: outs.append(
            (o[0] if isinstance(o, tuple) else o).float())) for m in (fast, ref)]
        with torch.inference_mode():
            lf, lr = fast(windows[:1]).logits.float(), ref(windows[:1]).logits.float()
        for h in hooks:
            h.remove()
        return float((outs[0] - outs[1]).norm() / outs[1].norm()), float((lf - lr).norm() / lr.norm())

    def hf(cfg, reference):
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        quantize_(model, cfg, reference=reference)
        return model

    sq = smoothquant_w8a8_dir(hf_dir, work)
    variants = (  # name, fast model, reference model (same integer weights), W4A16 int4 kernel forced
        ("w8a8 SmoothQuant file (bf16 around, default)", lambda: load_quantized(sq),
         lambda: load_quantized(sq, reference=True), False),
        ("w8a8 SmoothQuant file (fp32 around; norms/embeddings as loaded, bf16-rounded)", lambda: load_quantized(sq).float(),
         lambda: load_quantized(sq, reference=True), False),
        ("w8a8 RTN quantize_ (bf16 around)", lambda: hf(W8A8Config(), False), lambda: hf(W8A8Config(), True),
         False),
        ("w8a8 RTN quantize_ (fp32 around)", lambda: hf(W8A8Config(dtype=torch.float32), False),
         lambda: hf(W8A8Config(dtype=torch.float32), True), False),
        ("w4a16 RTN quantize_ (bf16 around, default)", lambda: hf(W4A16Config(), False),
         lambda: hf(W4A16Config(), True), False),
        ("w4a16 RTN quantize_ (fp32 around, int4 kernel forced)", lambda: hf(W4A16Config(dtype=torch.float32), False),
         lambda: hf(W4A16Config(dtype=torch.float32), True), True))
    rows = []
    for name, make_fast, make_ref, forced in variants:
        saved = kernels.W4A16_DEQUANT_MIN_ROWS
        kernels.W4A16_DEQUANT_MIN_ROWS = 10**9 if forced else saved
        try:
            fast, ref = make_fast(), make_ref()
            layer_err, err = first_layer_and_logits(fast, ref)
            pf, pr = ppl(fast), ppl(ref)
            pl = ppl(LeanModule(fast))  # the same modules through the runtime's lean forward
        finally:
            kernels.W4A16_DEQUANT_MIN_ROWS = saved
        rows.append([name, f"{layer_err:.1e}", f"{err:.2e}", f"{pf:.4f}", f"{pr:.4f}", f"{100 * (pf / pr - 1):+.3f}%",
                     f"{pl:.4f}", f"{100 * (pl / pr - 1):+.3f}%"])
        del fast, ref
    fp = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows.append(["fp32 model (no quantization)", "-", "-", f"{ppl(fp):.4f}", "-", "-", f"{ppl(LeanModule(fp)):.4f}",
                 "-"])
    fp = fp.to(torch.bfloat16)
    rows.append(["bf16 model (no quantization)", "-", "-", f"{ppl(fp):.4f}", "-", "-", f"{ppl(LeanModule(fp)):.4f}",
                 "-"])
    return (f"Fast path vs its reference (the same integer weights dequantized to fp32, fp32 matmul, fp32 "
            f"around; W8A8's reference also fake-quantizes activations per token), through transformers' forward "
            f"and through slimlm's lean forward. W8A8 twice: slimlm's default W8A8 file (`slimlm quantize --scheme "
            f"w8a8`: SmoothQuant, loaded by `load_quantized`) and plain RTN by `quantize_` (the speed rows' "
            f"weights; same kernels and shapes, other values). wikitext-2 test, first {chunks} windows of 512 "
            f"(llama.cpp protocol). 'first layer': relative error of decoder layer 0's output on one window, "
            f"where fast and reference read identical inputs.\n\n" + markdown_table(
                ["scheme", "first layer rel. error", "logits rel. error (1×512)", "ppl fast", "ppl reference",
                 "difference", "ppl fast, lean forward", "difference"], rows)
            + "\n\nW8A8's int8 kernels agree with the reference to about 5e-7 (fp32 around) on identical inputs, "
            "but the model amplifies that: per-token int8 codes whose value sits on a rounding boundary flip on a "
            "1-ulp difference, and a flipped code moves its activation by a whole quantization step (amax/127 of its "
            "token; SmolLM2's outlier channels make that step large against the other values). Measured with RTN, "
            "fp32 around: the relative error is 4.8e-7 after decoder layer 0, 6.4e-4 after layer 1 and 7.6e-2 at the "
            "last layer. W4A16 quantizes no activations and has no such amplification. SmoothQuant moves the "
            "outliers into the weights, which shrinks the per-token steps; its perplexity is also the closest to "
            "fp32. `load_quantized` keeps a file's norms and embeddings in bf16, so the file's fp32-around row casts "
            "bf16-rounded values up; the RTN fp32-around row is the kernel-only comparison.")


def kernel_section() -> str:
    """Why the per-shape choices are what they are: measured here, now."""
    def t(fn, n=15):
        fn()
        times = []
        for _ in range(n):
            s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - s)
        return statistics.median(times) * 1e6

    rows = []
    for k, n in ((576, 576), (576, 1536), (1536, 576), (576, 49152)):
        w = torch.randn(n, k) * 0.05
        s = w.abs().amax(1) / 127
        q = torch.round(w / s[:, None]).to(torch.int8)
        xq = torch.randint(-127, 128, (128, k), dtype=torch.int8)
        xs, ws = torch.ones(128, 1), torch.ones(n)
        wt = q.t().contiguous()
        nk = t(lambda: kernels.int8_matmul_rescale(xq, xs, q.t(), ws))
        kn = t(lambda: kernels.int8_matmul_rescale(xq, xs, wt, ws))
        packed, zeros = kernels.onednn_prepack(q), torch.zeros(n, dtype=torch.int64)
        dnn = t(lambda: kernels.onednn_int8_linear(xq, packed, ws, zeros).mul_(xs))
        xb, wb = torch.randn(128, k).bfloat16(), w.bfloat16()
        bf = t(lambda: torch.nn.functional.linear(xb, wb))
        choice = kernels.int8_backend(k, n)
        u = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        gs = 64 if k % 128 else 128
        m4 = W4A16Linear(u, torch.rand(n, k // gs) * 0.01, torch.zeros(n, k // gs), gs)
        x = torch.randn(128, k).bfloat16()
        xb = x.contiguous()
        kern = t(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, m4.packed, gs, m4.scale_zero))
        params = int4pack.prefill_params(m4.scale_zero)
        deq = t(lambda: xb @ int4pack.dequantize_kn_bf16(m4.packed, *params, n, k, gs))
        rows.append([f"{k}→{n}", f"{dnn:.0f}", f"{nk:.0f}", f"{kn:.0f}", choice, f"{bf:.0f}", f"{kern:.0f}",
                     f"{deq:.0f}"])
    return ("Per-shape kernel choices (µs, median of 15, 128 activation rows, int8 GEMM + its rescale). W8A8: "
            "oneDNN `qlinear_pointwise` (weight scales fused in the epilogue, then the per-token scale pass) vs "
            "`torch._int_mm` with the int8 weight as a transposed N×K view (`nk`) or a contiguous K×N copy (`kn`), "
            "then the int32→fp32 rescale; each layer takes the one measured fastest for its shape at load "
            "(`chosen`); bf16 GEMM for comparison. W4A16 at 128 rows: the int4 tinygemm kernel vs "
            f"dequantize-to-bf16 + GEMM (the path used from {kernels.W4A16_DEQUANT_MIN_ROWS} rows).\n\n"
            + markdown_table(["shape K→N", "oneDNN int8", "_int_mm nk", "_int_mm kn", "chosen", "bf16 GEMM",
                              "int4 kernel", "dequant+bf16 GEMM"], rows))


def gguf_section(hf_dir: Path, work: Path, types: list[str], gen: int, runs: int) -> str:
    """The same GGUF files on slimlm's runtime ("native": int4/int8 kernels) and on llama.cpp, side by side.

    Uses slimlm.evaluate.bench (its protocol: random prompt, greedy, medians of ``runs``); files are made
    from the fp32 dir by slimlm's GGUF quantizer (llama.cpp's rounding) and cached in ``work``.
    """
    import importlib.util

    from slimlm.evaluate.bench import bench
    from slimlm.quantize.gguf import quantize_gguf

    have_llama = importlib.util.find_spec("llama_cpp") is not None
    rows = []
    for qtype in types:
        path = work / f"smollm2-{qtype}.gguf"
        if not path.is_file():
            quantize_gguf(hf_dir, qtype, path)
        backends = ["native"] + (["llama.cpp"] if have_llama else [])
        result = bench(path, prompt=512, gen=gen, batches=[1, 8], threads=torch.get_num_threads(),
                       backends=backends, runs=runs)
        by = {(r["backend"], r["batch"]): r for r in result["rows"]}
        for batch in (1, 8):
            ours, theirs = by[("native", batch)], by.get(("llama.cpp", batch))
            def ratio(key):
                return f"{ours[key] / theirs[key]:.2f}x" if theirs else "-"
            rows.append([qtype, batch, f"{ours['prefill_tok_s']:.0f}",
                         f"{theirs['prefill_tok_s']:.0f}" if theirs else "-", ratio("prefill_tok_s"),
                         f"{ours['decode_tok_s']:.1f}", f"{theirs['decode_tok_s']:.1f}" if theirs else "-",
                         ratio("decode_tok_s"), f"{ours['peak_rss_mb']:.0f}",
                         f"{theirs['peak_rss_mb']:.0f}" if theirs else "-"])
    return (f"GGUF files (made from the fp32 dir with slimlm's llama.cpp-rounding quantizer) on slimlm's runtime "
            f"(`native`: lean forward; Q4_0/Q4_K → int4 tinygemm, Q8_0 → W8A8 oneDNN int8, Q5_0/Q6_K and others "
            f"dequantized to bf16 F.linear — on SmolLM2's 576-wide rows llama.cpp's Q4_K_M falls back to Q5_0 "
            f"for most tensors) vs "
            f"llama.cpp (llama-cpp-python) in the same process and threads. slimlm.evaluate.bench protocol: "
            f"prompt 512 random tokens, {gen} greedy tokens, median of {runs} runs. llama.cpp runs with weight "
            f"repacking off (slimlm.evaluate.bench: llama-cpp-python 0.3.36's AMX repack crashes on some Xeons), so "
            f"its prefill gets no AMX; decode is the fairer comparison.\n\n" + markdown_table(
                ["file", "batch", "slimlm prefill tok/s", "llama.cpp prefill tok/s", "slimlm/llama.cpp",
                 "slimlm decode tok/s", "llama.cpp decode tok/s", "slimlm/llama.cpp", "slimlm peak RSS MB",
                 "llama.cpp peak RSS MB"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--files", action="store_true", help="also run W8A8 (SmoothQuant, the quantizer's default) and "
                    "W4A16 (RTN) from compressed-tensors dirs")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    ap.add_argument("--model", default=None, help="HF dir (default: the built-in SmolLM2-135M fp32 dir)")
    ap.add_argument("--no-hf-rows", action="store_true",
                    help="skip the fp32/bf16 rows through transformers' forward (the pre-lean baseline)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the perplexity/accuracy table")
    ap.add_argument("--accuracy-only", action="store_true", help="only the fast-vs-reference table (no timing)")
    ap.add_argument("--gguf", default="", help="comma-separated GGUF types to compare with llama.cpp "
                    "(e.g. Q8_0,Q4_0,Q4_K_M); only this section runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_dir = Path(args.model) if args.model else resources.builtin_hf_dir()
    if args.gguf:
        body = gguf_section(hf_dir, resources.cache_dir(), args.gguf.split(","), args.gen, args.rounds)
        publish("Quantized runtime on GGUF files vs llama.cpp (bench_runtime.py --gguf)", body, args.no_write)
        return
    if args.accuracy_only:
        body = accuracy_section(hf_dir, resources.wikitext_path("test"), args.chunks, resources.cache_dir())
        publish(f"Quantized runtime: fast path vs reference over {args.chunks} windows "
                f"(bench_runtime.py --accuracy-only --chunks {args.chunks})", body, args.no_write)
        return
    models = load_variants(hf_dir, args.files, resources.cache_dir(), not args.no_hf_rows)
    med = measure(models, args.prompt, args.decode_prompt, args.gen, args.rounds)
    speed, checks = speed_section(models, med, args)
    del models
    # Each part is written as soon as it is measured, so a later failure cannot lose it.
    title = "Quantized runtime: fp32 vs bf16 vs W8A8 vs W4A16 (bench_runtime.py)"
    publish(title, speed, args.no_write)
    parts = [("kernel choices", kernel_section)]
    if not args.no_accuracy:
        parts.insert(0, ("fast path vs reference", lambda: accuracy_section(
            hf_dir, resources.wikitext_path("test"), args.chunks, resources.cache_dir())))
    for name, make in parts:
        publish(f"Quantized runtime: {name} (bench_runtime.py)", make(), args.no_write)


if __name__ == "__main__":
    main()
