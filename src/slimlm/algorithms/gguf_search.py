"""Beyond llama.cpp's quantizer at the same GGUF bytes: error-compensating (GPTQ-style) block quantization.

llama.cpp rounds every block independently, choosing scales that minimise the imatrix-weighted error of
that block alone. Here each block is still encoded by the exact llama.cpp codec (so the file is a normal
GGUF of the same types and size), but the weights it encodes have absorbed the rounding error of the blocks
before it: with H = E[x x^T] over calibration inputs, the error of block b is pushed onto the not yet
quantized columns along H^-1 (optimal brain surgeon / GPTQ, Frantar et al. 2022), so the layer's output
error ||X (W - Q)^T|| drops, not just the weight error. Blocks are whole codec blocks (32 values for the
legacy and IQ4_NL types, 256 for the k-quants), so the encoder is a black box and the bytes stay exact.

Inside a block all columns are quantized at once; the error propagated from it is E = (W_b - Q_b) U_bb^-1
where H^-1 = U^T U (upper Cholesky), which equals GPTQ's column-by-column recurrence for fixed Q_b.
"""

from __future__ import annotations

from typing import Callable

import gguf
import numpy as np
import torch

from slimlm.formats import ggml

T = gguf.GGMLQuantizationType
_FLOATS = (T.F32, T.F16, T.BF16)


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """U with H^-1 = U^T U, after GPTQ's damping (a fraction of the mean diagonal added to the diagonal)."""
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    h += damp * diag.mean() * torch.eye(h.shape[0], dtype=h.dtype)
    for extra in (0.0, 0.1, 1.0):  # ill-conditioned H: damp harder rather than fail
        try:
            lower = torch.linalg.cholesky(h + extra * diag.mean() * torch.eye(h.shape[0], dtype=h.dtype))
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True)
        except RuntimeError:
            continue
    raise RuntimeError("input covariance is not positive definite even after damping")


def gptq_encode(w: np.ndarray, qtype: T, hessian: np.ndarray, importance: np.ndarray | None,
                damp: float = 0.01) -> np.ndarray:
    """Encode w [rows, n] to GGML blocks of ``qtype`` with block-wise error compensation under ``hessian``."""
    qtype = ggml.qtype_of(qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, n = w.shape
    work = torch.from_numpy(np.array(w, dtype=np.float64))
    u = _inverse_cholesky_upper(torch.from_numpy(np.asarray(hessian, dtype=np.float64)), damp)
    out = np.empty((rows, n // block * type_size), dtype=np.uint8)
    imp = None if importance is None else np.asarray(importance, dtype=np.float32).reshape(-1)
    for c0 in range(0, n, block):
        c1 = c0 + block
        wb = work[:, c0:c1]
        data = ggml.quantize(wb.to(torch.float32).numpy(), qtype, None if imp is None else imp[c0:c1])
        out[:, c0 // block * type_size: c1 // block * type_size] = data
        if c1 == n:
            break
        qb = torch.from_numpy(ggml.dequantize(data, qtype, (rows, block))).to(torch.float64)
        err = torch.linalg.solve_triangular(u[c0:c1, c0:c1], wb - qb, upper=True, left=False)
        work[:, c1:] -= err @ u[c0:c1, c1:]
    return out


def gptq_encoder(hessians: dict[str, np.ndarray], damp: float = 0.01
                 ) -> Callable[[np.ndarray, T, np.ndarray | None, str], np.ndarray]:
    """An encoder for quantize_gguf: GPTQ-compensated for matrices with a Hessian, llama.cpp's otherwise."""

    def encode(values: np.ndarray, qtype: T, importance: np.ndarray | None, name: str) -> np.ndarray:
        h = hessians.get(name)
        if qtype in _FLOATS or h is None or values.ndim != 2 or h.shape[0] != values.shape[1]:
            if qtype == T.F32:
                return np.ascontiguousarray(values, dtype=np.float32)
            if qtype == T.F16:
                return values.astype(np.float16)
            return ggml.quantize(values, qtype, importance)
        return gptq_encode(values, qtype, h, importance, damp)

    return encode
