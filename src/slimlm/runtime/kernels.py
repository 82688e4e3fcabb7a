"""The low-bit matmul kernels we call, and the per-shape choices between them.

Choices come from measurements (benchmarks/bench_runtime.py's kernel table, and optionally per shape at
load with ``SLIMLM_AUTOTUNE=1``) and are recorded on each layer so ``slimlm generate``/``bench`` can say
which kernel each layer used.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F

# Activations with at least this many rows take the "dequantize to bf16, then bf16 GEMM" path in W4A16:
# the CPU int4 tinygemm kernel works in 4-row blocks, so its cost grows linearly with rows (576→1536, one
# thread: ~20 µs per row), while unpacking + dequantizing the weight costs ~0.8 ms once and oneDNN's bf16
# GEMM is cheap; they cross near 48 rows. bench_runtime.py's kernel table re-measures both at 128 rows.
W4A16_DEQUANT_MIN_ROWS = 48


def autotune_enabled() -> bool:
    """Per-shape timing at load is opt-in (``SLIMLM_AUTOTUNE=1``): on a shared, busy machine a few
    milliseconds of timing pick noise, so by default each scheme takes the kernel the benchmark tables in
    BENCHMARKS.md measured fastest on every SmolLM2 shape (oneDNN int8 for W8A8)."""
    return os.environ.get("SLIMLM_AUTOTUNE", "0") == "1"


def _best_of(fns: dict[str, callable], rounds: int = 7, margin: float = 0.1) -> str:
    """Name of the fastest function: medians over ``rounds`` interleaved timings (so a busy machine slows
    every candidate alike); the first candidate (the default) is kept unless another beats it by ``margin``."""
    medians = _medians(fns, rounds)
    default = next(iter(fns))
    best = min(medians, key=medians.get)
    return best if medians[best] < (1 - margin) * medians[default] else default


def _medians(fns: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` interleaved timings, after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


INT8_BACKENDS = ("onednn", "int_mm_nk", "int_mm_kn")


@functools.cache
def onednn_int8_available() -> bool:
    """oneDNN's int8 linear (brgemm; AMX/VNNI where the CPU has them), as torch's x86 inductor path uses it,
    present in this torch build and not a reference fallback. On some CPUs (seen: an AMD EPYC with
    AVX512-VNNI, torch 2.13) oneDNN picks a naive reference kernel: 0.5 s for 128×576×576 against 0.2 ms
    on ``torch._int_mm``, turning a 7-minute test suite into an hour. On an AVX2-only CPU (seen: an AMD EPYC,
    torch 2.13) its int8 kernel is inexact: off by up to 1e5 in int32 sums on random codes (16-bit saturation).
    One probe (32×256×256, a few ms where oneDNN is fine) rules it out where it is not exact or is over 4x
    slower than ``_int_mm``."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return False
    return _onednn_exact(32, 256, 256) and not _onednn_slower(32, 256, 256, rounds=3, slack=1e-4)


def _probe_codes(rows: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=gen)
    return x, w


def _onednn_exact(rows: int, k: int, n: int) -> bool:
    """Whether oneDNN's int8 linear gives the exact int32 sums (as ``torch._int_mm`` does) on random codes."""
    x, w = _probe_codes(rows, k, n)
    got = onednn_int8_linear(x, onednn_prepack(w), torch.ones(n), torch.zeros(n, dtype=torch.int64))
    return bool(torch.equal(got.double(), (x.double() @ w.double().T)))


def _onednn_slower(rows: int, k: int, n: int, rounds: int, slack: float = 0.0) -> bool:
    """Whether oneDNN's int8 linear on random (rows, K) × (K → N) codes takes over 4x ``torch._int_mm``'s time."""
    x, w = _probe_codes(rows, k, n)
    packed, scale, zero = onednn_prepack(w), torch.ones(n), torch.zeros(n, dtype=torch.int64)
    w_kn = w.t().contiguous()
    med = _medians({"onednn": lambda: onednn_int8_linear(x, packed, scale, zero),
                    "int_mm": lambda: torch._int_mm(x, w_kn)}, rounds=rounds)
    return med["onednn"] > 4 * med["int_mm"] + slack


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
    fns = {}
    if "onednn" in candidates:  # first = the default, kept unless another is clearly faster
        packed, zeros = onednn_prepack(w), torch.zeros(n, dtype=torch.int64)
        fns["onednn"] = lambda: onednn_int8_linear(x, packed, w_scale, zeros).mul_(x_scale)
    fns["int_mm_nk"] = lambda: int8_matmul_rescale(x, x_scale, w.t(), w_scale)
    fns["int_mm_kn"] = lambda: int8_matmul_rescale(x, x_scale, w_kn, w_scale)
    return _best_of(fns)


def onednn_prepack(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) weight → oneDNN's packed (opaque, MKLDNN) weight; ``.to_dense()`` gives back (K, N)."""
    return torch.ops.onednn.qlinear_prepack(q.contiguous(), None)


def onednn_int8_linear(xq: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(xq @ W.T) * w_scale`` in ``out_dtype`` with int32 accumulation; activation scale 1 (the caller
    applies the per-token scales: oneDNN's epilogue takes one activation scale, not one per row)."""
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, w_scale, w_zero, None, 1.0, 0, out_dtype,
                                              "none", [], "")


def scale_rows_(y: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """``y *= x_scale`` per row, in place, with the scales in y's dtype (a bf16 tensor times fp32 scales
    takes a slow mixed-dtype path: ~8x slower than casting the (M, 1) scales first)."""
    return y.mul_(x_scale.to(y.dtype))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization of each row of a 2-D activation: codes and fp32 scales (M, 1).

    Works on fp32 or bf16 rows without an up-cast copy (the max of bf16 values is exact; the division
    promotes to fp32); |x/scale| <= 127 by construction, so no clamp.
    """
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-10).div_(127.0)
    scaled = torch.div(x, scale) if x.dtype == torch.float32 else x.float().div_(scale)
    return scaled.round_().to(torch.int8), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of a 2-D activation with a calibrated per-tensor ``scale`` (a file's
    ``input_scale``): codes clamped to -128..127 (values past the calibrated range saturate, as in vLLM and
    compressed-tensors) and the scale repeated per row, so the per-token GEMM epilogues apply unchanged."""
    q = (x.float() / scale.float()).round_().clamp_(-128, 127).to(torch.int8)  # a new fp32 tensor: x untouched
    return q, scale.float().reshape(1, 1).expand(x.shape[0], 1)


class SharedInputQuantizer:
    """Per-token quantization of one activation, reused by the sibling layers that read the same tensor.

    q/k/v projections read the same normed hidden state, gate/up the same MLP input: quantizing it once
    instead of once per layer removes 3 of 7 quantization passes per decoder layer. Only layers marked as
    siblings (``reuse=True``: k/v after q, up after gate) look the memo up; it matches only the very same
    tensor object (weak reference) with the same version counter where one exists (inference tensors have
    none; nothing between sibling calls modifies the input in transformers' models).
    """

    def __init__(self) -> None:
        self._ref = None
        self._version: int | None = None
        self._result: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _version_of(x: torch.Tensor) -> int | None:
        try:
            return x._version
        except RuntimeError:  # inference tensors do not track versions
            return None

    def __call__(self, x: torch.Tensor, k: int, reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        import weakref

        if reuse and self._ref is not None and self._ref() is x and self._version_of(x) == self._version:
            return self._result
        result = quantize_per_token(x.reshape(-1, k))
        self._ref, self._version, self._result = weakref.ref(x), self._version_of(x), result
        return result


SHARED_QUANTIZER = SharedInputQuantizer()


# int8 codes multiplied in fp32 sum exactly while every partial sum stays within 2^24: |code| ≤ 128, so
# 1024 × 128 × 128 = 2^24 bounds K per fp32 GEMM; longer K is split and the exact chunk sums added in int32.
EXACT_FP32_MAX_K = 1024


def _int8_mm_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` for int8 (M, K) × (K, N) as exact int32 sums computed by fp32 GEMMs over K-chunks."""
    acc = None
    for start in range(0, x.shape[1], EXACT_FP32_MAX_K):
        end = start + EXACT_FP32_MAX_K
        part = torch.mm(x[:, start:end].float(), w[start:end].float()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


@functools.cache
def int_mm_emulated() -> bool:
    """Whether int8 GEMMs run as exact fp32 GEMMs (``_int8_mm_fp32``) instead of ``torch._int_mm``. On an
    AVX2-only CPU without VNNI (seen: an AMD EPYC, torch 2.13) ``_int_mm`` is 25-100x slower than fp32 GEMM
    (512×576 → 49152: 7.7 s against 0.37 s), so the int8 path would be the slowest on the machine; the
    emulation gives the same int32 sums. One probe (128×512×512) decides: over 2x slower → emulate."""
    x, w = _probe_codes(128, 512, 512)
    w_kn = w.t().contiguous()
    med = _medians({"int_mm": lambda: torch._int_mm(x, w_kn), "fp32": lambda: _int8_mm_fp32(x, w_kn)}, rounds=3)
    return med["int_mm"] > 2 * med["fp32"]


def int_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) × (K, N) → exact int32 sums: ``torch._int_mm``, or its fp32 emulation where that is faster."""
    return _int8_mm_fp32(x, w) if int_mm_emulated() else torch._int_mm(x, w)


def int_mm_name() -> str:
    """How ``int_mm`` runs here, for the kernel reports."""
    return "exact fp32 GEMM of int8 codes (torch._int_mm measured slow)" if int_mm_emulated() else "torch._int_mm"


def int8_matmul_rescale(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor
                        ) -> torch.Tensor:
    """``(xq @ w) * x_scale * w_scale`` with the int8×int8→int32 product on ``int_mm``.

    ``w`` is (K, N) (contiguous or a transposed view). The rescale is one multiply by the outer product of
    the two scale vectors, done in place on the fp32 result (one pass over the output, no extra buffer).
    """
    acc = int_mm(xq, w)
    return torch.mul(acc, x_scale).mul_(w_scale)


# ---------------------------------------------------------------- fused elementwise epilogues (W8A8)
# Around each int8 GEMM, eager torch spends more time than the GEMM itself on a 512-token prompt: per-token
# quantization is abs, amax, a dtype cast, div, round and a cast to int8 (six passes), and the per-token
# rescale of the output one more. The lean W8A8 forward (runtime.fastpath) instead calls the functions below,
# which do each step's elementwise work (residual add, RMSNorm, SiLU·up, quantization) in one pass when
# compiled by torch.compile (inductor's generated C++), for activations of COMPILE_MIN_ROWS rows or more;
# shorter ones (decode) run them eagerly, where a compiled call's guard/launch overhead is not repaid.
COMPILE_MIN_ROWS = 16


def residual_norm_quant(h: torch.Tensor, y: torch.Tensor, y_scale: torch.Tensor, weight: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h + y·y_scale`` (rounded to h's dtype: the residual stream), then RMSNorm·weight quantized per token."""
    h = (h.float() + y.float() * y_scale).to(h.dtype)
    hf = h.float()
    x = hf / torch.sqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    q, s = quantize_per_token(x)
    return h, q, s


def norm_quant(h: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm·weight of ``h``, quantized per token (the first layer's input)."""
    hf = h.float()
    return quantize_per_token(hf / torch.sqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float())


def silu_mul_quant(gate_up: torch.Tensor, scale: torch.Tensor, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate·scale) · (up·scale)`` from the fused gate/up GEMM output, quantized per token."""
    g = gate_up[:, :inter].float() * scale
    u = gate_up[:, inter:].float() * scale
    return quantize_per_token(F.silu(g) * u)


def residual_add(h: torch.Tensor, y: torch.Tensor, y_scale: torch.Tensor) -> torch.Tensor:
    return (h.float() + y.float() * y_scale).to(h.dtype)


def compile_enabled() -> bool:
    """torch.compile for the fused epilogues: on unless ``SLIMLM_COMPILE=0`` (and only where it works)."""
    return os.environ.get("SLIMLM_COMPILE", "1") != "0"


class _Fused:
    """A function run compiled for long activations, eagerly for short ones; compiled lazily on first long
    call, and if compiling fails (no C++ compiler, an inductor error) the eager function is kept for good."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.failed = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if args[0].shape[0] < COMPILE_MIN_ROWS or self.failed or not compile_enabled():
            return self.fn(*args)
        if self.compiled is None:
            try:
                self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                import warnings

                warnings.warn(f"slimlm: torch.compile unavailable for {self.fn.__name__} ({exc!s:.200}); "
                              "running it eagerly", stacklevel=2)
                self.failed = True
                return self.fn(*args)
        return self.compiled(*args)


residual_norm_quant_f = _Fused(residual_norm_quant)
norm_quant_f = _Fused(norm_quant)
silu_mul_quant_f = _Fused(silu_mul_quant)
quant_rows_f = _Fused(quantize_per_token)  # the attention output before o_proj
residual_add_f = _Fused(residual_add)


# ---------------------------------------------------------------- oneDNN's one-row pathology
# oneDNN's int8 linear (torch 2.13, this Xeon) takes 1-2 ms for ONE activation row on some narrow shapes
# (576→128/192/256: ~1.5 ms, against ~15 µs on torch._int_mm; 8 rows: ~30 µs on either). Decoding at batch 1
# hits exactly that, e.g. the unfused v_proj of GGUF files whose q/k/v have mixed types. Such layers keep a
# (K, N) int8 copy of their weight and run rows below ONE_ROW_MAX on _int_mm; measured once per shape.
ONE_ROW_MAX = 4


@functools.cache
def onednn_slow_at_one_row(k: int, n: int) -> bool:
    """Whether oneDNN's int8 linear at one row is over 4x slower than ``torch._int_mm`` for (K → N)."""
    return onednn_int8_available() and _onednn_slower(1, k, n, rounds=5)


def int8_linear(xq: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor | None, w_scale: torch.Tensor,
                w_zero: torch.Tensor | None, like: torch.dtype, w_kn: torch.Tensor | None = None) -> torch.Tensor:
    """``int8_gemm`` with the per-token activation scales ``xs`` applied too, in ``like`` (the activation's
    dtype) where that is fp32 or bf16, else fp32: one W8A8 layer's (or sibling group's) whole output."""
    return scale_rows_(int8_gemm(xq, packed, w_scale, w_zero, int8_out_dtype(like), w_kn), xs)


def int8_out_dtype(like: torch.dtype) -> torch.dtype:
    """The int8 GEMMs' output dtype for an activation dtype: itself where fp32 or bf16, else fp32."""
    return like if like in (torch.float32, torch.bfloat16) else torch.float32


def int8_gemm(xq: torch.Tensor, packed: torch.Tensor | None, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
              out_dtype: torch.dtype, w_kn: torch.Tensor | None = None) -> torch.Tensor:
    """``(xq @ W.T) * w_scale`` on oneDNN, or on ``_int_mm`` with the (K, N) weight ``w_kn`` where there is
    no oneDNN copy (``packed`` None) or for the few-row calls of shapes where oneDNN is pathologically slow
    (``onednn_slow_at_one_row``)."""
    if packed is None or (w_kn is not None and xq.shape[0] <= ONE_ROW_MAX):
        return int_mm(xq, w_kn).mul(w_scale).to(out_dtype)
    return onednn_int8_linear(xq, packed, w_scale, w_zero, out_dtype)
