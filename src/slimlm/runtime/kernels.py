"""The low-bit matmul kernels we call, and the per-shape choices between them.

Every choice is measured on this machine (once per shape per process) rather than assumed, and recorded so
``slimlm generate``/``bench`` can say which kernel each layer used. ``SLIMLM_AUTOTUNE=0`` skips the
measurements and takes the defaults (useful in tests, where timings mean nothing).
"""

from __future__ import annotations

import functools
import os
import time

import torch

# Activations with more rows than this take the "dequantize to bf16, then bf16 GEMM" path in W4A16: the
# int4 tinygemm CPU kernel is a GEMV-style kernel (4-row blocks) and loses to oneDNN's bf16 GEMM on long
# prompts. Measured on SmolLM2 shapes: see BENCHMARKS.md "runtime kernels".
W4A16_DEQUANT_MIN_ROWS = 48


def autotune_enabled() -> bool:
    return os.environ.get("SLIMLM_AUTOTUNE", "1") != "0"


def _best_of(fns: dict[str, callable], repeats: int = 5) -> str:
    """Name of the fastest function (minimum of ``repeats`` timed calls after one warm-up each)."""
    best, best_t = None, float("inf")
    for name, fn in fns.items():
        fn()
        t = min(_timed(fn) for _ in range(repeats))
        if t < best_t:
            best, best_t = name, t
    return best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


INT8_BACKENDS = ("onednn", "int_mm_nk", "int_mm_kn")


def onednn_int8_available() -> bool:
    """oneDNN's int8 linear (brgemm; AMX/VNNI where the CPU has them), as torch's x86 inductor path uses it."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


@functools.cache
def int8_backend(k: int, n: int) -> str:
    """Which int8×int8 GEMM a (K → N) W8A8 layer uses, measured at 128 activation rows (prefill, where
    W8A8's advantage lies):

    - "onednn": ``onednn.qlinear_pointwise`` on a prepacked weight, per-channel weight scales applied in the
      GEMM epilogue (fp32 out); in torch 2.13 this is oneDNN's brgemm matmul (AMX on this Xeon);
    - "int_mm_nk" / "int_mm_kn": ``torch._int_mm`` (oneDNN's older s8s8s32 GEMM API) with the N×K weight
      passed transposed, or a contiguous K×N copy, then an int32 → fp32 rescale pass.
    """
    candidates = list(INT8_BACKENDS) if onednn_int8_available() else ["int_mm_nk", "int_mm_kn"]
    if not autotune_enabled():
        return candidates[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (128, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    x_scale, w_scale, w_kn = torch.ones(128, 1), torch.ones(n), w.t().contiguous()
    fns = {"int_mm_nk": lambda: int8_matmul_rescale(x, x_scale, w.t(), w_scale),
           "int_mm_kn": lambda: int8_matmul_rescale(x, x_scale, w_kn, w_scale)}
    if "onednn" in candidates:
        packed, zeros = onednn_prepack(w), torch.zeros(n, dtype=torch.int64)
        fns["onednn"] = lambda: onednn_int8_linear(x, packed, w_scale, zeros).mul_(x_scale)
    return _best_of(fns)


def onednn_prepack(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) weight → oneDNN's packed (opaque, MKLDNN) weight; ``.to_dense()`` gives back (K, N)."""
    return torch.ops.onednn.qlinear_prepack(q.contiguous(), None)


def onednn_int8_linear(xq: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor
                       ) -> torch.Tensor:
    """fp32 ``(xq @ W.T) * w_scale`` with int32 accumulation; activation scale 1 (applied by the caller)."""
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, w_scale, w_zero, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization of each row of a 2-D activation: codes and fp32 scales (M, 1).

    Five cheap passes (abs, amax, div, round in place, cast); |x/scale| <= 127 by construction: no clamp.
    """
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-10).div_(127.0)
    return torch.div(x, scale).round_().to(torch.int8), scale


def int8_matmul_rescale(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor
                        ) -> torch.Tensor:
    """``(xq @ w) * x_scale * w_scale`` with the int8×int8→int32 product on ``torch._int_mm``.

    ``w`` is (K, N) (contiguous or a transposed view). The rescale is one multiply by the outer product of
    the two scale vectors, done in place on the fp32 result (one pass over the output, no extra buffer).
    """
    acc = torch._int_mm(xq, w)
    return torch.mul(acc, x_scale).mul_(w_scale)


def int4_cpu_ok(k: int, n: int, group_size: int) -> bool:
    """Whether the CPU tinygemm kernel takes this shape directly (else we pad K/N, see W4A16Linear)."""
    return group_size in (32, 64, 128, 256) and k % group_size == 0 and n % 16 == 0
