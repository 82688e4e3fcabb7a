"""Estimated vs real GGUF file sizes: SmolLM2-135M quantized by llama.cpp's own quantizer.

llama.cpp (through llama-cpp-python) first dequantizes the shipped Q4_1 GGUF to an F32 GGUF, then quantizes
that to each type. For each file we compare its size on disk with slimlm's estimates:
  - "from GGUF": the source GGUF's tensor list and its metadata size, with gguf_mix's type plan;
  - "from config": SmolLM2-135M's config alone (catalog), metadata estimated from the vocabulary size.
and check that the types llama.cpp chose are exactly those of our plan.

    flock /tmp/slimlm-heavy.lock python benchmarks/bench_sizes.py [--types Q4_K_M,Q8_0] [--no-write]
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf  # noqa: E402
import llama_cpp  # noqa: E402

from _common import append_section, markdown_table  # noqa: E402
from slimlm import resources  # noqa: E402
from slimlm.formats.gguf_mix import LLAMA_CPP_RULES_COMMIT, ArchFacts, PlanTensor, plan_types  # noqa: E402
from slimlm.inspect import catalog  # noqa: E402
from slimlm.inspect.memory import estimate_memory, gguf_metadata_bytes  # noqa: E402
from slimlm.spec import ModelSpec  # noqa: E402

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_L",
         "Q3_K_M", "Q3_K_S", "Q2_K"]


def llama_quantize(src: Path, dst: Path, ftype: str) -> float:
    """llama.cpp's quantizer, 2 threads; returns wall seconds."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if ftype == "F32" else f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp failed to quantize to {ftype}")
    return time.perf_counter() - start


def tensor_list(path: Path) -> list[PlanTensor]:
    reader = gguf.GGUFReader(path)
    return [PlanTensor(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type) for t in reader.tensors]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--no-write", action="store_true", help="print the table without appending to BENCHMARKS.md")
    args = ap.parse_args()
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    spec = ModelSpec.from_config(catalog.lookup("SmolLM2-135M").config)
    arch = ArchFacts(spec.n_layers, spec.n_heads, spec.n_kv_heads)
    rows = []
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-sizes-") as tmp:
        src = Path(tmp) / "smollm2-f32.gguf"
        llama_quantize(resources.smollm2_gguf_path(), src, "F32")  # dequantized Q4_1 -> F32 source
        tensors = tensor_list(src)
        meta = gguf_metadata_bytes(str(src))
        for ftype in types:
            out = Path(tmp) / f"smollm2-{ftype}.gguf"
            seconds = llama_quantize(src, out, ftype)
            real = out.stat().st_size
            theirs = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
            ours = plan_types(tensors, arch, ftype)
            same = sum(theirs[k] == ours[k] for k in theirs)
            est_file = estimate_memory(spec, ftype, tensors=tensors, metadata_bytes=meta).file_bytes
            est_cfg = estimate_memory(spec, ftype).file_bytes
            d_file, d_cfg = est_file / real - 1, est_cfg / real - 1
            worst = max(worst, abs(d_file), abs(d_cfg))
            rows.append([ftype, f"{real:,}", f"{est_file:,}", f"{d_file:+.3%}", f"{est_cfg:,}", f"{d_cfg:+.3%}",
                         f"{real * 8 / spec_params(tensors):.3f}", f"{same}/{len(theirs)}", f"{seconds:.2f}"])
            out.unlink()
    table = markdown_table(["type", "llama.cpp file (bytes)", "estimate from GGUF", "diff", "estimate from config",
                            "diff", "file bpw", "tensor types equal to our plan", "llama.cpp quantize s"], rows)
    body = (f"SmolLM2-135M-Instruct (shipped Q4_1 GGUF dequantized to F32 by llama.cpp, then quantized by "
            f"llama.cpp {llama_cpp.__version__} (llama-cpp-python) to each type). Our type rules follow llama.cpp "
            f"{LLAMA_CPP_RULES_COMMIT[:10]}. Largest size difference: {worst:.3%}.\n\n{table}")
    if args.no_write:
        print(body)
    else:
        append_section("GGUF file size: slimlm estimate vs llama.cpp's quantizer (bench_sizes.py)", body)


def spec_params(tensors: list[PlanTensor]) -> int:
    return sum(t.n_elements for t in tensors)


if __name__ == "__main__":
    main()
