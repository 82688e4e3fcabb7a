"""Budget mixes (`slimlm quantize --target-bpw`) against llama.cpp's mixes of the same size, the quality-per-size
points for the plot, and the i-quants' tensor-data hashes against llama_model_quantize.

Stages (each appends a table to BENCHMARKS.md; files and measurements cached in --work):
  match    for each of --mixes (Q2_K, Q3_K_M, Q4_K_M, Q5_K_M): llama.cpp's file (llama_model_quantize, slimlm's F32
           GGUF, importance matrix from wikitext-2 valid), then slimlm's --target-bpw file no larger than it; KLD of
           both vs the fp32 model (wikitext-2 test, ctx 512, --chunks windows, slimlm's evaluator); greedy text
           by llama.cpp from each file
  curve    KLD and bytes of --curve-mixes by llama.cpp (with the importance matrix) and of budget mixes at
           --curve-bpw; writes WORK/quality-per-size-MODEL.json for `slimlm report`
  iquants  every i-quant mix by slimlm and by llama_model_quantize from the same F32 GGUF and importance matrix:
           sha256 of all tensor data, bytes, KLD

The importance matrix is slimlm's (`slimlm imatrix`, written as llama.cpp's GGUF imatrix file, which
llama_model_quantize is handed as llama-quantize --imatrix does): llama-cpp-python ships no llama-imatrix tool.
Earlier runs (bench_gguf.py --stages imatrix) found slimlm's and llama-imatrix's matrices equal to 0.00%.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gguf as bg  # noqa: E402
from _common import append_section, markdown_table  # noqa: E402

MIXES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M"]
CURVE_MIXES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL",
               "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S",
               "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
IQ_MIXES = ["IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
            "IQ1_M", "IQ1_S"]
PROMPT = "The capital of France is"


def noisy_hf_dir(src: Path, work: Path, alpha: float, seed: int = 0) -> Path:
    """The HF dir ``src`` with seeded Gaussian noise (std = alpha x each row's std) added to every matrix.

    The test models' fp32 weights are dequantized Q4_1 / Q4_K values: a type that reproduces that grid scores a KLD
    near zero, so a budget mix that picks it "wins" by recognising the file, not by allocating bits well. Noise of
    a fraction of a quantization step takes every weight off the grid, and both tools then start from the same
    ordinary fp32 model (which is itself the reference)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = work / f"hf-noise-{alpha:g}-seed{seed}"
    if (out / "model.safetensors").is_file():
        return out
    tmp = work / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "model.safetensors")
    for t in tensors.values():
        if t.ndim == 2:
            t += torch.randn(t.shape, generator=gen, dtype=t.dtype) * (alpha * t.float().std(dim=1, keepdim=True))
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    tmp.rename(out)
    return out


def imatrix_file(work: Path, calib_chunks: int) -> Path:
    from slimlm import resources
    from slimlm.quantize.imatrix import collect_imatrix, write_imatrix

    path = work / f"slimlm-imatrix-{calib_chunks}.gguf"
    if not path.exists():
        write_imatrix(collect_imatrix(bg.hf_dir(), resources.wikitext_path("valid"), ctx=512, chunks=calib_chunks),
                      path)
    return path


def lcpp_file(work: Path, mix: str, im: Path) -> Path:
    path = work / f"lcpp-{mix}-im.gguf"
    if not path.exists():
        bg.lcpp_quantize(bg.f32_gguf(work), path, mix, im)
    return path


class Budgets:
    """slimlm's budget files for one model: the sensitivity measured once (cached), then one file per budget."""

    def __init__(self, work: Path, im: Path, windows: int, per_layer: bool, exclude: list[str],
                 covariance: bool = False, probe_bpw: float | None = None, method: str = "llama.cpp") -> None:
        from gguf import GGMLQuantizationType as T

        from slimlm.formats.gguf_mix import BUDGET_CANDIDATES

        self.work, self.im, self.windows, self.per_layer = work, im, windows, per_layer
        self.exclude = [e for e in exclude if e]
        self.types = [q for q in BUDGET_CANDIDATES if q.name not in self.exclude] if self.exclude else None
        unknown = set(self.exclude) - {q.name for q in T}
        if unknown:
            raise SystemExit(f"unknown types {unknown}")
        if probe_bpw is not None:  # ablation: each group's scale measured at the type nearest this bpw
            import slimlm.quantize.budget as budget_mod

            budget_mod.PROBE_BPW = probe_bpw
        cov = ("-cov" if covariance else "") + (f"-p{probe_bpw:g}" if probe_bpw is not None else "")
        self.sens_path = work / f"sensitivity-w{windows}{'-layer' if per_layer else ''}{cov}.pkl"
        self.tag = f"w{windows}{'-layer' if per_layer else ''}{cov}{''.join('-no' + e for e in self.exclude)}"
        # the rounding; the sensitivity (priced as llama.cpp rounds) and the sizes are the base tag's
        self.method, self.base_tag = method, self.tag
        if method != "llama.cpp":
            self.tag += f"-{method}"
        self.covariance = covariance
        self.sens = pickle.loads(self.sens_path.read_bytes()) if self.sens_path.exists() else None
        self.seconds: float | None = None

    def make(self, bpw: float) -> tuple[Path, dict]:
        from slimlm import resources
        from slimlm.quantize.budget import Budget
        from slimlm.quantize.gguf import quantize_gguf

        out = self.work / f"budget-{self.tag}-{bpw:.4f}.gguf"
        meta = out.with_suffix(".json")
        if out.exists() and meta.exists():
            return out, json.loads(meta.read_text())
        start = time.perf_counter()
        r = quantize_gguf(bg.hf_dir(), None, out, imatrix=self.im, calib=resources.wikitext_path("valid"),
                          budget=Budget(target_bpw=bpw), budget_windows=self.windows, per_layer=self.per_layer,
                          sensitivity=self.sens, budget_types=self.types, budget_covariance=self.covariance,
                          overwrite=True, method=self.method)
        if self.sens is None:
            self.sens = r.budget["sensitivity"]
            self.seconds = time.perf_counter() - start
        self.sens_path.write_bytes(pickle.dumps(self.sens))  # with the verification's measurements so far
        info = r.to_dict()
        info["quantize_seconds"] = time.perf_counter() - start
        meta.write_text(json.dumps(info))
        return out, info


def n_params_and_overhead(path: Path) -> tuple[int, int]:
    """Parameters of a GGUF and its bytes beyond tensor data (header, metadata, padding)."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    return sum(int(t.n_elements) for t in tensors), path.stat().st_size - sum(int(t.n_bytes) for t in tensors)


def greedy_text(path: Path, n_tokens: int = 24) -> str:
    from slimlm.evaluate.llamacpp import open_llama

    llm = open_llama(path, n_ctx=128)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1):
        out.append(tok)
        if len(out) == n_tokens:
            break
    text = llm.detokenize(out).decode("utf-8", "replace")
    del llm
    return text.replace("\n", " ").replace("|", "/").strip()


def stage_match(work: Path, chunks: int, calib_chunks: int, mixes: list[str], budgets: Budgets) -> None:
    ref = bg.reference(work, chunks)
    im = imatrix_file(work, calib_chunks)
    rows, rows_text = [], []
    chosen_path = work / f"match-bpw-{budgets.tag}.json"
    base_path = work / f"match-bpw-{budgets.base_tag}.json"
    if not chosen_path.exists() and base_path.exists():  # the rounding changes no size: start from its budgets
        chosen_path.write_text(base_path.read_text())
    for mix in mixes:
        theirs = lcpp_file(work, mix, im)
        n_params, _ = n_params_and_overhead(theirs)
        size = theirs.stat().st_size
        chosen = json.loads(chosen_path.read_text()) if chosen_path.exists() else {}
        if mix not in chosen:
            # our header is a little larger (imatrix and budget keys) and each tensor pads to 32 bytes: leave room
            probe = next(work.glob(f"budget-{budgets.tag}-*.gguf"), None)
            overhead = n_params_and_overhead(probe)[1] if probe else 4 << 20
            chosen[mix] = math.floor((size - overhead - 32 * 300) * 8 / n_params * 1e4) / 1e4
        bpw = chosen[mix]
        ours, info = budgets.make(bpw)
        if ours.stat().st_size > size:  # the overhead guess was short: step down until the file fits
            bpw = math.floor((size - (ours.stat().st_size - size) - n_params_and_overhead(ours)[1]) * 8 / n_params
                             * 1e4) / 1e4
            ours, info = budgets.make(bpw)
        chosen[mix] = bpw
        chosen_path.write_text(json.dumps(chosen))  # the same --target-bpw on every rerun of the stage
        r_t, r_o = bg.evaluate_kld(theirs, ref, chunks, work), evaluate_once(ours, ref, chunks, work)
        k_t, k_o = r_t["kld"]["kld_mean"], r_o["kld"]["kld_mean"]
        mix_types = ", ".join(f"{k} ×{v}" for k, v in sorted(info["type_counts"].items(), key=lambda kv: -kv[1])
                              if k != "F32")
        rows.append([mix, f"{size:,}", f"{ours.stat().st_size:,}", f"{bpw:.4f}", bg.kld_cell(r_t), bg.kld_cell(r_o),
                     f"{k_o / k_t:.3f}" if k_t > 0 else "-", "yes" if ours.stat().st_size <= size else "NO",
                     mix_types])
        rows_text.append([mix, greedy_text(theirs), greedy_text(ours)])
    body = (f"{bg.MODEL_NAMES[bg.MODEL]}. llama.cpp: `llama_model_quantize` of slimlm's F32 GGUF with the importance "
            f"matrix from wikitext-2 valid ({calib_chunks} windows of 512; slimlm's `imatrix` written as llama.cpp's "
            "GGUF imatrix file, since llama-cpp-python ships no llama-imatrix tool). slimlm: `quantize HF_DIR "
            f"--target-bpw B --imatrix (same file) --calib wikitext-2 valid --budget-windows {budgets.windows}"
            f"{'' if budgets.per_layer else ' --per-kind'}"
            f"{'' if budgets.method == 'llama.cpp' else ' --method ' + budgets.method}`"
            + (f" choosing among every candidate type except {', '.join(budgets.exclude)}" if budgets.exclude else "")
            + " with B the largest 4-decimal value whose file is no larger "
            f"than llama.cpp's. KLD vs the fp32 model on wikitext-2 test, ctx 512, {chunks} windows, slimlm's "
            "evaluator for both; ratio = slimlm / llama.cpp (the issue asks ≤ 0.8)."
            + (f" Sensitivity measurement (once per model, reused by every budget): {budgets.seconds:.0f} s."
               if budgets.seconds else "") + "\n\n"
            + markdown_table(["size of", "llama.cpp bytes", "slimlm bytes", "--target-bpw", "KLD llama.cpp",
                              "KLD slimlm budget", "ratio", "no larger", "slimlm's types (tensors)"], rows)
            + f"\n\nGreedy continuation of {PROMPT!r} (24 tokens) by llama.cpp (llama-cpp-python) from each file:\n\n"
            + markdown_table(["size of", "llama.cpp's file", "slimlm's budget file"], rows_text)
            + f"\n\nCommand: `python benchmarks/bench_budget.py {' '.join(sys.argv[1:])}`")
    title = "GGUF budget mixes vs llama.cpp's mixes at equal size"
    if budgets.exclude:
        title += f" without {', '.join(budgets.exclude)}"
    append_section(f"{title} (bench_budget.py, {bg.MODEL})", body)


def stage_curve(work: Path, chunks: int, calib_chunks: int, mixes: list[str], bpws: list[float],
                budgets: Budgets, extra: Path | None = None) -> Path:
    ref = bg.reference(work, chunks)
    im = imatrix_file(work, calib_chunks)
    points = []
    for mix in mixes:
        path = lcpp_file(work, mix, im)
        r = bg.evaluate_kld(path, ref, chunks, work)
        points.append({"name": mix, "kind": "llama.cpp", "bytes": path.stat().st_size,
                       "kld_mean": r["kld"]["kld_mean"], "kld_stderr": r["kld"]["kld_stderr"]})
    for bpw in bpws:
        path, _ = budgets.make(bpw)
        r = evaluate_once(path, ref, chunks, work)
        points.append({"name": f"{bpw:g} bpw", "kind": "slimlm budget", "bytes": path.stat().st_size,
                       "kld_mean": r["kld"]["kld_mean"], "kld_stderr": r["kld"]["kld_stderr"]})
    if extra is not None:  # points measured earlier with the same evaluator settings (their kind says where from)
        points += json.loads(extra.read_text())
    out = work / f"quality-per-size-{bg.MODEL}.json"
    out.write_text(json.dumps({"kind": "quality_per_size", "model": bg.MODEL_NAMES[bg.MODEL],
                               "evaluator": f"wikitext-2 test, ctx 512, {chunks} windows, KLD vs fp32",
                               "points": points}, indent=1))
    rows = [[p["name"], p["kind"], f"{p['bytes']:,}", f"{p['kld_mean']:.5f}" + (f" ± {p['kld_stderr']:.5f}" if "kld_stderr" in p else "")]
            for p in sorted(points, key=lambda p: p["bytes"])]
    append_section(f"GGUF quality per size: llama.cpp mixes and slimlm budget mixes (bench_budget.py, {bg.MODEL})",
                   f"{bg.MODEL_NAMES[bg.MODEL]}; llama.cpp files with the importance matrix of the match stage; "
                   f"KLD vs fp32, wikitext-2 test, ctx 512, {chunks} windows. Plot: `slimlm report {out.name} -o "
                   f"docs/quality_per_size.png` (one panel per model file given).\n\n"
                   + markdown_table(["file", "by", "bytes", "KLD"], rows)
                   + f"\n\nCommand: `python benchmarks/bench_budget.py {' '.join(sys.argv[1:])}`")
    return out


def tensor_hash(path: Path) -> str:
    """sha256 over (name, type, data) of every tensor in name order: llama_model_quantize writes the non-block
    tensors first (output_norm before token_embd), slimlm keeps the source order, so a file-order hash would differ
    on identical tensors."""
    import gguf
    import numpy as np

    h = hashlib.sha256()
    for t in sorted(gguf.GGUFReader(path).tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{t.tensor_type.name}:".encode())
        h.update(np.asarray(t.data).tobytes())
    return h.hexdigest()


def evaluate_once(path: Path, ref: Path, chunks: int, work: Path) -> dict:
    """bench_gguf.evaluate_kld, cached by tensor data: two budgets that pick the same types share one evaluation."""
    key = work / f"kld-{tensor_hash(path)[:20]}-{chunks}.json"
    if not key.exists():
        key.write_text(json.dumps(bg.evaluate_kld(path, ref, chunks, work)))
    return json.loads(key.read_text())


def stage_iquants(work: Path, chunks: int, calib_chunks: int, mixes: list[str], evaluate: bool) -> None:
    from slimlm.quantize.gguf import quantize_gguf

    ref = bg.reference(work, chunks) if evaluate else None
    im = imatrix_file(work, calib_chunks)
    rows = []
    for mix in mixes:
        theirs = lcpp_file(work, mix, im)
        ours = work / f"ours-{mix}-im.gguf"
        start = time.perf_counter()
        if not ours.exists():
            quantize_gguf(bg.hf_dir(), mix, ours, imatrix=im)
        seconds = time.perf_counter() - start
        a, b = tensor_hash(ours), tensor_hash(theirs)
        kld = bg.kld_cell(bg.evaluate_kld(theirs, ref, chunks, work)) if evaluate else "-"
        rows.append([mix, f"{ours.stat().st_size:,}", f"{theirs.stat().st_size:,}", a[:16], b[:16],
                     "identical" if a == b else "DIFFER", kld, f"{seconds:.0f}"])
    append_section(f"GGUF i-quant mixes: slimlm vs llama_model_quantize tensor hashes (bench_budget.py, {bg.MODEL})",
                   f"{bg.MODEL_NAMES[bg.MODEL]}: slimlm quantizes the HF dir, llama.cpp (`llama_model_quantize`) "
                   "slimlm's F32 GGUF, both with the same importance matrix (wikitext-2 valid, "
                   f"{calib_chunks} windows). sha256 (first 16 hex digits). File "
                   "sizes differ by the quantize.imatrix.* metadata keys slimlm writes as the llama-quantize tool "
                   "does (the library call writes none), and llama_model_quantize moves the non-block tensors to the "
                   "front, so "
                   "whole-file hashes cannot match; the hash covers every tensor's name, type and data in name order. "
                   "KLD vs "
                   f"fp32, wikitext-2 test, ctx 512, {chunks} windows.\n\n"
                   + markdown_table(["mix", "slimlm bytes", "llama.cpp bytes", "slimlm sha256", "llama.cpp sha256",
                                     "tensor data", "KLD", "slimlm quantize s"], rows)
                   + f"\n\nCommand: `python benchmarks/bench_budget.py {' '.join(sys.argv[1:])}`")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="match")
    ap.add_argument("--model", choices=sorted(bg.MODEL_NAMES), default="smollm2")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_budget"))
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--calib-chunks", type=int, default=100)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--curve-mixes", default=",".join(CURVE_MIXES))
    ap.add_argument("--curve-bpw", default="3.6,4.0,4.3,4.6,5.0,5.5,6.5,8.0")
    ap.add_argument("--extra-points", type=Path, help="curve: more points (JSON list) measured earlier")
    ap.add_argument("--iq-mixes", default=",".join(IQ_MIXES))
    ap.add_argument("--no-iq-kld", action="store_true", help="iquants: hashes only")
    ap.add_argument("--budget-windows", type=int, default=4)
    ap.add_argument("--per-kind", dest="per_layer", action="store_false",
                    help="one measured scale per tensor kind (the default measures every tensor)")
    ap.add_argument("--covariance", action="store_true",
                    help="price each Linear's error under its input covariance, not the imatrix diagonal")
    ap.add_argument("--exclude-types", default="", help="candidate types the budget mixes may not use (ablation)")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="start from the model plus seeded noise of this fraction of each row's std (fair reference)")
    ap.add_argument("--probe-bpw", type=float, help="measure each group's scale at the type nearest this bpw "
                    "(default: quantize.budget.PROBE_BPW)")
    ap.add_argument("--method", default="llama.cpp", choices=["llama.cpp", "gptq"],
                    help="the budget files' rounding (gptq: covariances from 32 windows of the calibration text)")
    ap.add_argument("--scratch", action="store_true", help="append tables to WORK/BENCHMARKS.md, not the repo's")
    args = ap.parse_args()
    bg.MODEL = args.model
    args.work.mkdir(parents=True, exist_ok=True)
    if args.scratch:
        import _common

        _common.BENCHMARKS_MD = args.work / "BENCHMARKS.md"
    if args.noise:
        noisy = noisy_hf_dir(bg.hf_dir(), args.work, args.noise)
        bg.hf_dir = lambda: noisy  # every stage (and bench_gguf's helpers) now starts from the noisy weights
        bg.MODEL_NAMES[bg.MODEL] = (bg.MODEL_NAMES[bg.MODEL].split(" (reference")[0]
                                    + f" + seeded noise ({args.noise:g} × each row's std; reference: that model)")
    im = imatrix_file(args.work, args.calib_chunks)
    budgets = Budgets(args.work, im, args.budget_windows, args.per_layer, args.exclude_types.split(","),
                      args.covariance, args.probe_bpw, args.method)
    for stage in args.stages.split(","):
        if stage == "match":
            stage_match(args.work, args.chunks, args.calib_chunks, args.mixes.split(","), budgets)
        elif stage == "curve":
            stage_curve(args.work, args.chunks, args.calib_chunks, args.curve_mixes.split(","),
                        [float(b) for b in args.curve_bpw.split(",")], budgets, args.extra_points)
        elif stage == "iquants":
            stage_iquants(args.work, args.chunks, args.calib_chunks, args.iq_mixes.split(","), not args.no_iq_kld)
        else:
            raise SystemExit(f"unknown stage {stage}")


if __name__ == "__main__":
    main()
