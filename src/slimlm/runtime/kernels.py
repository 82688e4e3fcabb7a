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


@functools.cache
def int8_weight_layout(k: int, n: int) -> str:
    """How ``torch._int_mm`` wants the int8 weight for a (K → N) layer: "kn" (a contiguous K×N copy) or
    "nk" (the N×K weight passed transposed, i.e. column-major B). Measured at 128 activation rows (prefill,
    where W8A8's advantage lies); oneDNN packs B differently for each, and the winner depends on the shape.
    """
    if not autotune_enabled():
        return "nk"
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (128, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    wt = w.t().contiguous()
    return _best_of({"nk": lambda: torch._int_mm(x, w.t()), "kn": lambda: torch._int_mm(x, wt)})


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization of each row of a 2-D activation: codes and fp32 scales (M, 1)."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-10).div_(127.0)
    q = torch.round(x.float() / scale).to(torch.int8)  # |x/scale| <= 127 by construction: no clamp needed
    return q, scale


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
