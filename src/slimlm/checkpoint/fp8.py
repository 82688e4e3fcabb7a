"""DeepSeek's FP8 block checkpoints, read as the bf16 model they stand for, one block row at a time.

DeepSeek-V3/R1 ship every decoder Linear weight as ``float8_e4m3fn`` with a float32 ``<name>_scale_inv`` holding
one factor per 128x128 block (``quantization_config.weight_block_size``; the last block of a row or column may be
partial). The weight is ``fp8 * scale_inv`` of its block, rounded to bfloat16: exactly what DeepSeek's own
``fp8_cast_bf16.py`` writes (float32 product, stored as bf16 with round-to-nearest-even), so every path that reads
an FP8 checkpoint here sees the same numbers as from the 1.3 TB bf16 copy llama.cpp asks users to make first, and
no such copy is needed. The scales are not parameters: callers list weights with ``Checkpoint.weight_tensors``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    from slimlm.checkpoint.types import TensorInfo

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = ("F8_E4M3",)


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (0x7F and 0xFF are NaN)."""
    import torch

    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


_TABLE: np.ndarray | None = None


def block_size(config: dict[str, Any] | None) -> tuple[int, int] | None:
    """The (rows, cols) block of an FP8 block-quantized config, or None for other configs."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise SlimlmError(f"quantization_config.weight_block_size is {block!r}; expected two positive integers "
                          "(DeepSeek's [128, 128]); per-tensor FP8 is not read")
    return block[0], block[1]


def pair_scales(tensors: list[TensorInfo], block: tuple[int, int], where: str) -> dict[str, TensorInfo]:
    """Each FP8 weight's scale tensor, by the weight's name; a missing scale or one of the wrong shape (it must
    be ceil(rows/block) x ceil(cols/block)) is a user error naming the tensor."""
    by_name = {t.name: t for t in tensors}
    out: dict[str, TensorInfo] = {}
    for t in tensors:
        if t.dtype not in FP8_DTYPES:
            continue
        scale = by_name.get(t.name + SCALE_SUFFIX)
        if scale is None:
            raise SlimlmError(f"{where}: FP8 tensor {t.name} has no {t.name + SCALE_SUFFIX}")
        if len(t.shape) != 2:
            raise SlimlmError(f"{where}: FP8 tensor {t.name} is {list(t.shape)}; block scales need a matrix")
        want = (math.ceil(t.shape[0] / block[0]), math.ceil(t.shape[1] / block[1]))
        if tuple(scale.shape) != want or scale.dtype not in ("F32", "BF16", "F16"):
            raise SlimlmError(f"{where}: {scale.name} is {scale.dtype} {list(scale.shape)}; {block[0]}x{block[1]} "
                              f"blocks of {list(t.shape)} need float {list(want)}")
        out[t.name] = scale
    return out


def dequantize(fp8: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float32 values (bf16-exact) of an FP8 matrix (its bytes, uint8 ``rows x cols``) and its block scales,
    computed one block row at a time so the temporaries stay one block row of float32."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _e4m3_table()
    rows, cols = fp8.shape
    out = np.empty((rows, cols), dtype=np.float32)
    br, bc = block
    for i, r0 in enumerate(range(0, rows, br)):
        r1 = min(rows, r0 + br)
        factors = np.repeat(scale[i].astype(np.float32), bc)[:cols]
        np.multiply(_TABLE[fp8[r0:r1]], factors, out=out[r0:r1])
        round_bf16(out[r0:r1])
    return out


def round_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` (float32, in place) rounded to the nearest bfloat16, ties to even, as a float32->bf16 cast does."""
    bits = x.view(np.uint32)  # a view: rows of a C-contiguous matrix keep their layout
    finite = np.isfinite(x)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    np.copyto(bits, rounded, where=finite)
    return x
