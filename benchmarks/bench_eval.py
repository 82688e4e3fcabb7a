"""slimlm eval against independent computations of the same protocol, on a test model (SmolLM2-135M, or
Qwen2.5-Coder-0.5B with --model qwen2) and wikitext-2 test.

1. Perplexity of the fp32 HF dir: slimlm eval vs a minimal plain-transformers loop (one window at a time,
   whole-window logits, torch.log_softmax) -- must agree within 0.1%.
2. Perplexity of an F16 GGUF (made by llama.cpp's quantizer from the shipped Q4_1 GGUF, i.e. the
   dequantized Q4_1 weights rounded to f16): slimlm eval (GGUF dequantized into torch) vs llama.cpp
   (llama-cpp-python, logits_all, its own tokenizer, the llama-perplexity windows, NLL in float64 numpy)
   -- within 0.5%.
3. KLD of a Q4_K_M GGUF (llama.cpp's quantizer, from the F16 file) against the F16 file: slimlm eval
   vs the KLD computed from llama.cpp's logits of both files -- within 5%; top-1 agreement of both.
4. Speed: slimlm eval vs the plain loop on the same loaded model, median of runs, peak RSS of each.

    flock /tmp/slimlm-heavy.lock python benchmarks/bench_eval.py [--model qwen2] [--chunks 40] [--speed-chunks 10]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section, markdown_table, publish  # noqa: E402

from slimlm import resources  # noqa: E402
from slimlm.evaluate import evaluate  # noqa: E402
from slimlm.models import load_model  # noqa: E402
from slimlm.util.process import peak_rss_mb, reset_peak_rss  # noqa: E402

CTX = 512


def plain_transformers_nll(model, tokenizer, text: str, chunks: int) -> np.ndarray:
    """The independent reference loop: what a user would write with transformers alone."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nll = []
    first = CTX // 2
    with torch.no_grad():
        for i in range(chunks):
            window = torch.tensor(ids[i * CTX:(i + 1) * CTX])
            logp = torch.log_softmax(model(window[None]).logits[0].float(), dim=-1)
            nll.append(-logp[first:CTX - 1].gather(-1, window[first + 1:, None]).squeeze(-1))
    return torch.cat(nll).double().numpy()


def llama_cpp_open(path: Path):
    """llama_cpp.Llama with every logit kept (weight repacking off: see slimlm.evaluate.llamacpp)."""
    from slimlm.evaluate.llamacpp import open_llama

    return open_llama(path, n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, logits_all=True,
                      n_threads=torch.get_num_threads())


def llama_cpp_logprobs(llm, text: str, chunks: int):
    """Yield (scored log-probs float64 (255, V), targets) per window, llama-perplexity's protocol."""
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)  # add_bos honours the vocab's flag
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    first = CTX // 2
    for i in range(chunks):
        window = list(tokens[i * CTX:(i + 1) * CTX])
        if add_bos:
            window[0] = llm.token_bos()
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[first:CTX - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
        yield logits, np.array(window[first + 1:])


def llama_cpp_ppl(path: Path, text: str, chunks: int) -> tuple[float, float]:
    llm = llama_cpp_open(path)
    start = time.perf_counter()
    nll = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in llama_cpp_logprobs(llm, text, chunks)])
    seconds = time.perf_counter() - start
    del llm
    return float(np.exp(nll.mean())), seconds


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(P ‖ Q) per row, from log-probabilities."""
    return (np.exp(p) * (p - q)).sum(1)


def kld_decomposition(f16_path: Path, q_path: Path, f16_lm, q_lm, q_emu_lm, windows: torch.Tensor, text: str,
                      chunks: int) -> dict[str, float]:
    """KLDs between four computations of the same windows: llama.cpp and slimlm (torch), F16 and Q4_K_M.

    llama.cpp's CPU matmuls quantize activations (to Q8_K / Q8_0 for K-quant and Q5_0 weights, to f16 for
    F16 weights), slimlm computes in fp32 on the dequantized weights; the cross terms measure that.
    """
    from slimlm.evaluate.perplexity import iter_scored_logprobs

    cpp_f16, cpp_q = llama_cpp_open(f16_path), llama_cpp_open(q_path)
    sums: dict[str, list[np.ndarray]] = {"cpp": [], "cpp_top1": [], "q_cross": [], "f16_cross": [],
                                         "q_emu_cross": []}
    streams = zip(llama_cpp_logprobs(cpp_f16, text, chunks), llama_cpp_logprobs(cpp_q, text, chunks),
                  iter_scored_logprobs(f16_lm.model, windows[:chunks]),
                  iter_scored_logprobs(q_lm.model, windows[:chunks]),
                  iter_scored_logprobs(q_emu_lm.model, windows[:chunks]))
    for (a, targets), (b, _), (_, _, ours_f16), (_, _, ours_q), (_, _, ours_q_emu) in streams:
        of16, oq, oqe = ours_f16[0].double().numpy(), ours_q[0].double().numpy(), ours_q_emu[0].double().numpy()
        sums["q_emu_cross"].append(_kl(oqe, b))
        sums["cpp"].append(_kl(a, b))
        sums["cpp_top1"].append(a.argmax(1) == b.argmax(1))
        sums["q_cross"].append(_kl(oq, b))
        sums["f16_cross"].append(_kl(of16, a))
    del cpp_f16, cpp_q
    return {k: float(np.concatenate(v).mean()) for k, v in sums.items()}


def paired_kld(f16_path: Path, q_path: Path, text: str, chunks: int) -> dict[str, object]:
    """Per-window KLD(F16 ‖ Q4_K_M) from llama.cpp and from slimlm with llama.cpp's rounding emulated (both
    models emulated), paired by window.

    The emulation matches llama.cpp op by op to float32 rounding, but each 8-bit activation rounding turns a
    last-bit difference upstream into a whole quantization step now and then, so after a few layers the two
    runs carry the same amount of rounding noise, not the same draw. Whether their KLDs agree is then a
    statistical question: the per-window differences give the standard error of the mean difference.
    """
    from slimlm.evaluate.act_quant import emulate_llama_cpp_activations
    from slimlm.evaluate.perplexity import iter_scored_logprobs

    cpp_f16, cpp_q = llama_cpp_open(f16_path), llama_cpp_open(q_path)
    f16_lm, q_lm = load_model(f16_path), load_model(q_path)
    tokens = f16_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(tokens[:chunks * CTX]).view(chunks, CTX)
    emulate_llama_cpp_activations(f16_lm.model, f16_path)
    emulate_llama_cpp_activations(q_lm.model, q_path)
    cpp, ours, cross = [], [], []
    streams = zip(llama_cpp_logprobs(cpp_f16, text, chunks), llama_cpp_logprobs(cpp_q, text, chunks),
                  iter_scored_logprobs(f16_lm.model, windows), iter_scored_logprobs(q_lm.model, windows))
    for (a, _), (b, _), (_, _, of), (_, _, oq) in streams:
        of, oq = of[0].double().numpy(), oq[0].double().numpy()
        cpp.append(float(_kl(a, b).mean()))
        ours.append(float(_kl(of, oq).mean()))
        cross.append(float(_kl(oq, b).mean()))
    del cpp_f16, cpp_q
    cpp_a, ours_a = np.array(cpp), np.array(ours)
    diff = ours_a - cpp_a
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"cpp": float(cpp_a.mean()), "ours": float(ours_a.mean()),
            "diff_pct": 100 * float(diff.mean() / cpp_a.mean()),
            "se_pct": 100 * se / float(cpp_a.mean()), "cross": float(np.mean(cross)), "windows": len(diff),
            "per_window": {"cpp": cpp, "ours": ours}}


MODELS = {"smollm2": ("SmolLM2-135M-Instruct", resources.smollm2_gguf_path, resources.builtin_hf_dir),
          "qwen2": ("Qwen2.5-Coder-0.5B-Instruct", resources.qwen2_gguf_path, resources.qwen2_hf_dir)}


def make_ggufs(model: str) -> tuple[Path, Path]:
    """F16 (from the shipped file) and Q4_K_M (from that F16) GGUFs, made once with llama.cpp's quantizer."""
    import llama_cpp
    import llama_cpp._logger as llama_logger

    llama_logger.set_verbose(False)
    out = resources.cache_dir() / "bench"
    out.mkdir(exist_ok=True)
    name, shipped, _ = MODELS[model]
    f16, q4km = out / f"{name}-F16.gguf", out / f"{name}-Q4_K_M.gguf"
    for src, dst, ftype in ((shipped(), f16, llama_cpp.LLAMA_FTYPE_MOSTLY_F16),
                            (f16, q4km, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        if dst.is_file():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, torch.get_num_threads()
        tmp = dst.with_name(f".tmp-{dst.name}")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not write {dst}")
        tmp.rename(dst)
    return f16, q4km


def paired_section(model_name: str, f16: Path, q4km: Path, text: str, chunks: int, no_append: bool) -> None:
    """Window-paired KLD agreement of `slimlm eval --act-quant llama.cpp` with llama.cpp, as a section."""
    started = time.perf_counter()
    r = paired_kld(f16, q4km, text, chunks)
    half = chunks // 2
    halves = []
    for lo, hi in ((0, half), (half, chunks)):
        c, o = np.array(r["per_window"]["cpp"][lo:hi]), np.array(r["per_window"]["ours"][lo:hi])
        halves.append(f"{100 * (o.mean() / c.mean() - 1):+.2f}%")
    rows = [["KLD(F16 ‖ Q4_K_M) mean, nats", f"{r['ours']:.5f}", f"{r['cpp']:.5f}", f"{r['diff_pct']:+.2f}%",
             f"±{r['se_pct']:.2f}%", "0.5%"]]
    body = markdown_table([f"wikitext-2 test, ctx 512, {chunks} windows", "slimlm emulated", "llama.cpp",
                           "difference", "paired SE", "bound"], rows)
    body += (f"\n\nslimlm: `slimlm eval` with `--act-quant llama.cpp` on both files (each Linear input rounded to "
             "Q8_0 / Q8_K / f16 as ggml-cpu's x86 kernels round it, attention through an f16 K/V cache). The "
             "standard error is of the mean per-window difference (windows as independent blocks). Halves: "
             f"windows 1–{half} {halves[0]}, {half + 1}–{chunks} {halves[1]}. KLD(slimlm emulated Q4_K_M ‖ "
             f"llama.cpp Q4_K_M) = {r['cross']:.5f}: the same amount of rounding noise, a different draw. "
             f"{time.perf_counter() - started:.0f} s.")
    publish(f"KLD agreement with llama.cpp, window-paired ({model_name})", body, no_append)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--speed-chunks", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--paired-only", action="store_true",
                    help="only the window-paired KLD agreement with llama.cpp (emulated rounding), over --chunks")
    args = ap.parse_args()
    data = resources.wikitext_path("test")
    text = data.read_text()
    model_name = MODELS[args.model][0]
    hf_dir = MODELS[args.model][2]()
    f16, q4km = make_ggufs(args.model)
    if args.paired_only:
        paired_section(model_name, f16, q4km, text, args.chunks, args.no_append)
        return
    rows = []

    # 1. ours vs plain transformers, fp32 HF dir
    lm = load_model(hf_dir)
    ours = evaluate(lm, data, ctx=CTX, chunks=args.chunks)
    plain_nll = plain_transformers_nll(lm.model, lm.tokenizer, text, args.chunks)
    plain_ppl = float(np.exp(plain_nll.mean()))
    rows.append(["fp32 HF dir: slimlm vs plain transformers loop", f"{ours['perplexity']['ppl']:.4f}",
                 f"{plain_ppl:.4f}", f"{100 * (ours['perplexity']['ppl'] / plain_ppl - 1):+.4f}%", "0.1%"])

    # 2. ours vs llama.cpp, F16 GGUF
    ours_f16 = evaluate(f16, data, ctx=CTX, chunks=args.chunks)
    cpp_ppl, cpp_seconds = llama_cpp_ppl(f16, text, args.chunks)
    rows.append(["F16 GGUF: slimlm vs llama.cpp", f"{ours_f16['perplexity']['ppl']:.4f}", f"{cpp_ppl:.4f}",
                 f"{100 * (ours_f16['perplexity']['ppl'] / cpp_ppl - 1):+.4f}%", "0.5%"])

    # 3. KLD Q4_K_M vs F16
    f16_lm, q_lm = load_model(f16), load_model(q4km)
    ours_kld = evaluate(q_lm, data, ref=f16_lm, ctx=CTX, chunks=args.chunks)
    tokens = f16_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(tokens[:args.chunks * CTX]).view(args.chunks, CTX)
    from slimlm.evaluate.act_quant import emulate_llama_cpp_activations

    ours_emu = evaluate(q_lm, data, ref=f16_lm, ctx=CTX, chunks=args.chunks, act_quant="llama.cpp")
    q_emu_lm = load_model(q4km)
    emulate_llama_cpp_activations(q_emu_lm.model, q4km)
    parts = kld_decomposition(f16, q4km, f16_lm, q_lm, q_emu_lm, windows, text, args.chunks)
    k = ours_kld["kld"]
    rows.append(["KLD(F16 ‖ Q4_K_M) mean, nats", f"{k['kld_mean']:.5f}", f"{parts['cpp']:.5f}",
                 f"{100 * (k['kld_mean'] / parts['cpp'] - 1):+.2f}%", "5%"])
    ke = ours_emu["kld"]
    rows.append(["same, slimlm with --act-quant llama.cpp", f"{ke['kld_mean']:.5f}", f"{parts['cpp']:.5f}",
                 f"{100 * (ke['kld_mean'] / parts['cpp'] - 1):+.2f}%", "5%"])
    rows.append(["top-1 agreement Q4_K_M vs F16", f"{k['top1_agreement']:.4f}", f"{parts['cpp_top1']:.4f}",
                 f"{100 * (k['top1_agreement'] - parts['cpp_top1']):+.2f} pts", "-"])
    rows.append(["perplexity F16 / Q4_K_M (slimlm)", f"{ours_kld['ref_perplexity']['ppl']:.4f} / "
                 f"{ours_kld['perplexity']['ppl']:.4f}", "", "", ""])
    acc = markdown_table(["check (wikitext-2 test, ctx 512, %d chunks)" % args.chunks, "slimlm", "independent",
                          "difference", "bound"], rows)
    acc += (f"\n\nWhere the KLD gap comes from (mean nats per token): KLD(slimlm Q4_K_M ‖ llama.cpp Q4_K_M) = "
            f"{parts['q_cross']:.5f}, KLD(slimlm F16 ‖ llama.cpp F16) = {parts['f16_cross']:.5f}. llama.cpp's CPU "
            "kernels quantize the activations of K-quant/Q5_0/Q8_0 matmuls to 8 bits (f16 for F16 weights); slimlm "
            "evaluates the file's dequantized weights in fp32, so llama.cpp's KLD also contains that runtime noise. "
            "`--act-quant llama.cpp` adds the same kind of rounding (Q8_K / Q8_0 / f16 on each Linear input) and so "
            "the same amount of noise, but not token-for-token the same: KLD(slimlm emulated Q4_K_M ‖ llama.cpp "
            f"Q4_K_M) = {parts['q_emu_cross']:.5f}."
            f"\n\nKLD median {k['kld_median']:.5f}, p99 {k['kld_p99']:.5f}; slimlm tokenizes with transformers, "
            f"llama.cpp with its own (identical ids over these {args.chunks} windows). The F16 GGUF is llama.cpp's "
            "requantization of the shipped file (its dequantized values rounded to f16); Q4_K_M is quantized from it.")

    # 4. speed: same loaded model, same text
    timings: dict[str, list[float]] = {"slimlm eval": [], "plain transformers loop": []}
    peaks: dict[str, float] = {}
    for name, fn in (("slimlm eval", lambda: evaluate(lm, data, ctx=CTX, chunks=args.speed_chunks)),
                     ("plain transformers loop", lambda: plain_transformers_nll(lm.model, lm.tokenizer, text,
                                                                                args.speed_chunks))):
        fn()  # warm-up
        base = reset_peak_rss()
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
        peaks[name] = (base, peak_rss_mb())
    ours_t = statistics.median(timings["slimlm eval"])
    plain_t = statistics.median(timings["plain transformers loop"])
    speed_rows = [[name, f"{statistics.median(t):.2f}", f"{statistics.median(t) / plain_t:.3f}",
                   f"{peaks[name][1]:.0f}", f"{peaks[name][1] - peaks[name][0]:.0f}"] for name, t in timings.items()]
    speed = markdown_table([f"fp32 {model_name}, {args.speed_chunks} windows incl. tokenization", "median s",
                            "× plain loop", "peak RSS MiB", "peak above model MiB"], speed_rows)
    speed += (f"\n\nslimlm eval / plain loop = {ours_t / plain_t:.3f} (bound 1.1); median of {args.repeats} "
              f"after a warm-up. llama.cpp's own F16 pass over {args.chunks} windows took {cpp_seconds:.1f} s "
              f"(logits_all copies every position's logits).")
    body = acc + "\n\n" + speed
    if args.no_append:
        print(body)
    else:
        append_section(f"slimlm eval vs plain transformers and llama.cpp ({model_name}, wikitext-2 test)", body)


if __name__ == "__main__":
    main()
