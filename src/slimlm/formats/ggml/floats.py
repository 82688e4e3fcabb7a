"""F32, F16 and BF16 rows: plain element conversions, with GGML's rounding rules.

F16 is IEEE half with round-to-nearest-even (GGML_FP32_TO_FP16, numpy's cast). BF16 follows
``ggml_compute_fp32_to_bf16``: round to nearest even on the top 16 bits, NaNs kept quiet.
"""

from __future__ import annotations

import numpy as np


def encode_f32(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f4").view(np.uint8).reshape(x.shape[0], -1)


def decode_f32(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).view("<f4").astype(np.float32).reshape(data.shape[0], -1)


def encode_f16(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond 65504 becomes inf, as in ggml
        return np.asarray(x, dtype=np.float32).astype("<f2").view(np.uint8).reshape(x.shape[0], -1)


def decode_f16(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).view("<f2").astype(np.float32).reshape(data.shape[0], -1)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits of float32 values, exactly as ggml_compute_fp32_to_bf16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    odd = (u >> np.uint32(16)) & np.uint32(1)
    odd += np.uint32(0x7FFF)
    odd += u
    bits = (odd >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(64)).astype(np.uint16)
    return bits


def encode_bf16(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    return fp32_to_bf16_bits(x).astype("<u2").view(np.uint8).reshape(x.shape[0], -1)


def decode_bf16(data: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(data).view("<u2").astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32).reshape(data.shape[0], -1)
