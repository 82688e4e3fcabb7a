"""GGML block codecs against llama.cpp: byte identity, encode/decode speed, round-trip error.

For each (type, importance matrix?) case in CASES: encode SmolLM2-135M's ffn_down matrices (Q4_1 GGUF
dequantized to float32; 1536-wide rows, so every block family applies) with ``slimlm.formats.ggml`` and
with llama.cpp's ``ggml_quantize_chunk`` (what ``llama_model_quantize`` runs; one thread, same process),
and compare bytes block by block; decode with ours and with gguf-py. Median of several runs.

Run: ``flock /tmp/slimlm-heavy.lock python benchmarks/bench_codecs.py [--layers 4] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import append_section, markdown_table, median_time  # noqa: E402
from ggml_oracle import ggml_quantize_chunk, smollm2_ffn_down  # noqa: E402

from slimlm import resources  # noqa: E402
from slimlm.formats import ggml  # noqa: E402

# (type, with importance matrix). Types llama.cpp quantizes the same with or without one (F16, Q8_0, ...)
# appear once; add a row here when a codec is added.
CASES: list[tuple[T, bool]] = [
    (T.F16, False), (T.BF16, False), (T.Q8_0, False),
    (T.Q4_0, False), (T.Q4_0, True), (T.Q4_1, False), (T.Q4_1, True),
    (T.Q5_0, False), (T.Q5_0, True), (T.Q5_1, False), (T.Q5_1, True),
    (T.IQ4_NL, False), (T.IQ4_NL, True),
    (T.Q2_K, False), (T.Q2_K, True), (T.Q3_K, False), (T.Q3_K, True),
    (T.Q4_K, False), (T.Q4_K, True), (T.Q5_K, False), (T.Q5_K, True),
    (T.Q6_K, False), (T.Q6_K, True),
    (T.IQ4_XS, False), (T.IQ4_XS, True), (T.IQ3_S, False), (T.IQ3_S, True), (T.IQ3_XXS, False), (T.IQ3_XXS, True),
    (T.IQ2_S, False), (T.IQ2_S, True), (T.IQ2_XS, True), (T.IQ2_XXS, True), (T.IQ1_M, False), (T.IQ1_M, True),
    (T.IQ1_S, True),  # llama.cpp's IQ2_XS/IQ2_XXS/IQ1_S encoders need an importance matrix
]


def synthetic_imatrix(n: int, seed: int = 0) -> np.ndarray:
    """A skewed per-column importance like real activations' mean squares (a few columns dominate)."""
    return np.random.default_rng(seed).gamma(0.5, 2.0, n).astype(np.float32)


def gguf_py_encode_time(x: np.ndarray, qt: T, repeats: int) -> float | None:
    """gguf-py's own numpy quantizer, where it has one (legacy types and BF16; no k-quants, no imatrix)."""
    try:
        gguf_quantize(x[:1], qt)
    except (NotImplementedError, ValueError):
        return None
    return median_time(lambda: gguf_quantize(x, qt), repeats=repeats)


def measure(x: np.ndarray, qt: T, im: np.ndarray | None, rms: float, repeats: int) -> list[str]:
    """One table row: identity with llama.cpp, encode/decode times against the peers, round-trip error."""
    ours = ggml.quantize(x, qt, im)
    ref = ggml_quantize_chunk(x, qt, im)
    bs = GGML_QUANT_SIZES[qt][1]
    same = (ours.reshape(-1, bs) == ref.reshape(-1, bs)).all(axis=1)
    t_ours = median_time(lambda: ggml.quantize(x, qt, im, threads=1), repeats=repeats)
    t_ours_mt = median_time(lambda: ggml.quantize(x, qt, im), repeats=repeats)
    t_ref = median_time(lambda: ggml_quantize_chunk(x, qt, im), repeats=repeats)
    d_ours = median_time(lambda: ggml.dequantize(ours, qt, x.shape), repeats=repeats)
    d_ref = median_time(lambda: gguf_dequantize(ref, qt), repeats=repeats)
    t_gguf = gguf_py_encode_time(x, qt, repeats) if im is None else None
    y = ggml.dequantize(ours, qt, x.shape)
    rel = float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2))) / rms
    return [qt.name, "yes" if im is not None else "no", f"{same.mean():.4%}", f"{int((~same).sum())}/{same.size}",
            f"{t_ours * 1e3:.0f}", f"{t_ref * 1e3:.0f}", f"{t_ours / t_ref:.2f}", f"{t_ours_mt * 1e3:.0f}",
            "—" if t_gguf is None else f"{t_gguf * 1e3:.0f}",
            f"{d_ours * 1e3:.0f}", f"{d_ref * 1e3:.0f}", f"{rel:.4f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="ffn_down matrices of SmolLM2 to use")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", default="", help="comma-separated GGML types to run (default: all in CASES)")
    args = ap.parse_args()
    only = {t.strip().upper() for t in args.types.split(",") if t.strip()}

    mats = smollm2_ffn_down(resources.smollm2_gguf_path(), layers=tuple(range(args.layers)))
    smol = np.concatenate(mats, axis=0)
    datasets = {
        "SmolLM2 ffn_down": smol,
        "normal(0,1)": np.random.default_rng(1).standard_normal(smol.shape).astype(np.float32),
    }
    imatrix = synthetic_imatrix(smol.shape[1])

    rows = []
    for data_name, x in datasets.items():
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        for qt, use_im in CASES:
            if qt not in ggml.REGISTRY or (only and qt.name not in only):
                continue
            rows.append([data_name] + measure(x, qt, imatrix if use_im else None, rms, args.repeats))
            print(" | ".join(rows[-1]), flush=True)

    headers = ["data", "type", "imatrix", "blocks identical to llama.cpp", "differing", "encode ms (slimlm, 1 thread)",
               "encode ms (llama.cpp, 1 thread)", "encode ratio", f"encode ms (slimlm, {os.cpu_count()} threads)", "encode ms (gguf-py)", "decode ms (slimlm)", "decode ms (gguf-py)",
               "rel. RMSE"]
    body = (f"SmolLM2-135M ffn_down: {args.layers} matrices ({smol.shape[0]}x{smol.shape[1]}, {smol.size:,} "
            f"values; the shipped GGUF is Q4_1, so re-encoding it as Q4_1/Q5_1 is lossless), and as many "
            f"normal(0,1) values. imatrix rows use a synthetic gamma(0.5) importance per column. "
            f"llama.cpp = `ggml_quantize_chunk` (the function `llama_model_quantize` calls) via llama-cpp-python's libggml-base; median of "
            f"{args.repeats} runs.\n\n" + markdown_table(headers, rows))
    append_section("GGML block codecs vs llama.cpp (bench_codecs.py)", body)


if __name__ == "__main__":
    main()
