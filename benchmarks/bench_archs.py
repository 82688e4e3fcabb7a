"""Per-architecture table (issue 14): every family slimlm covers, on the tiny random models of the tests.

For each of tests/test_gguf_archs.py's ``CASES`` (the same models the tests check): our F32 GGUF under llama.cpp
vs transformers (max |logit diff|), whether llama.cpp loads our Q8_0/Q4_K_M/Q2_K files, their sizes vs
``llama_model_quantize``'s from our F32 file, whether transformers loads our W4A16 compressed-tensors dir (and its
logits vs our reference loader), and which runtime path the family gets (or the one-line refusal).

    python benchmarks/bench_archs.py            # appends a section to BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import append_section, markdown_table  # noqa: E402
from test_gguf_archs import CASES, IDS, hf_logits, llama_logits, make_model  # noqa: E402
from test_gguf_mix_llamacpp import llama_quantize  # noqa: E402

from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.quantize.gguf import quantize_gguf  # noqa: E402
from slimlm.quantize.layers import quantize_model  # noqa: E402

MIXES = ("Q8_0", "Q4_K_M", "Q2_K")
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def _loads(path: Path, f32_cache: bool) -> tuple[bool, np.ndarray | None]:
    try:
        return True, llama_logits(path, f32_cache)
    except Exception:  # llama.cpp raises a bare ValueError on a file it cannot load
        return False, None


def _compressed_tensors(src: Path, out: Path, moe: bool) -> str:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from slimlm.writers.compressed_tensors import load_reference_model

    quantize_model(src, out, scheme="w4a16", method="rtn", group_size=32, symmetric=True if moe else None)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
        ours = load_reference_model(out).eval()
        diff = float((hf(ids).logits - ours(ids).logits).abs().max())
    return f"yes (Δ {diff:.1e})"


def _runtime(f32: Path) -> str:
    from slimlm.runtime import load_quantized

    try:
        model = load_quantized(f32, reference=False, dtype=torch.float32)
    except SlimlmError as err:
        return "refused: " + str(err).replace(f"{f32}: ", "")
    ref = hf_logits_cache[f32]
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits[0].float().numpy()
    return f"lean forward (bf16 kernels, Δ {np.abs(got - ref).max():.1e})"


hf_logits_cache: dict[Path, np.ndarray] = {}


def run_case(name: str, work: Path) -> list[str]:
    case = CASES[name]
    moe = any(k in case.config for k in MOE_KEYS)
    src = make_model(work / name, case, layers=6 if case.gguf_arch == "gemma3" else 2)
    f32 = work / f"{name}-F32.gguf"
    quantize_gguf(src, "F32", f32)
    ref = hf_logits(src)
    hf_logits_cache[f32] = ref
    ok, got = _loads(f32, case.f32_cache)
    diff = f"{np.abs(got - ref).max():.1e}" if ok else "-"
    sizes, loads = [], [ok]
    for mix in MIXES:
        ours, theirs = work / f"{name}-{mix}.gguf", work / f"{name}-lcpp-{mix}.gguf"
        quantize_gguf(src, mix, ours)
        llama_quantize(f32, theirs, mix)
        a, b = ours.stat().st_size, theirs.stat().st_size
        sizes.append("=" if a == b else f"{a - b:+,}")
        loads.append(_loads(ours, case.f32_cache)[0])
    try:
        ct = _compressed_tensors(src, work / f"{name}-w4a16", moe)
    except Exception as err:  # a refusal or a transformers failure: the table says which
        ct = f"no: {str(err).splitlines()[0][:50]}"
    cache = " (F32 KV)" if case.f32_cache else ""
    return [name, case.gguf_arch, diff + cache, "yes" if all(loads) else "NO", " / ".join(sizes), ct,
            _runtime(f32)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            rows.append(run_case(name, Path(tmp)))
            print(" | ".join(rows[-1]), flush=True)
    body = ("Tiny random models (tests/test_gguf_archs.py `CASES`: hidden 128, 2 layers, Gemma 3 6; random norms and "
            "biases). 'logit diff': our F32 GGUF under llama.cpp (llama-cpp-python 0.3.36) vs transformers on the "
            "same weights, max |Δ| over 40 tokens (|logits| ≤ ~4.3; F32 KV: llama.cpp's K/V cache set to F32, since "
            "its default F16 cache alone moves DeepSeek's MLA logits by up to 1e-2). 'llama.cpp loads': F32, Q8_0, "
            "Q4_K_M and Q2_K files all load. 'size vs llama-quantize': our file's bytes minus llama_model_quantize's "
            f"from our F32 file, for {' / '.join(MIXES)} ('=' equal). 'compressed-tensors': our W4A16 RTN g32 dir "
            "(symmetric for MoE) loaded by transformers (`run_compressed=False`), max |Δ logit| vs our reference "
            "loader. 'runtime': slimlm.runtime.load_quantized on the F32 GGUF (Δ vs transformers fp32), or its "
            "one-line refusal.\n\n"
            + markdown_table(["family", "llama.cpp arch", "logit diff", "llama.cpp loads", "size vs llama-quantize",
                              "compressed-tensors in transformers", "runtime"], rows)
            + "\n\nCommand: `python benchmarks/bench_archs.py`")
    if not args.no_append:
        append_section("Architectures: conversion, mixes, compressed-tensors, runtime (bench_archs.py)", body)
    print(body)


if __name__ == "__main__":
    main()
