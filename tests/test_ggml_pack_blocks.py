"""ggml.pack_blocks (GGML blocks from given codes and scales) against the float encoders: where llama.cpp's
rounding would pick the same grid (values exactly on it, each block spanning its full range), the packed
bytes equal ggml.quantize of the values; otherwise they decode to the codes times the fp16-rounded scales."""

from __future__ import annotations

import numpy as np
import pytest

from slimlm.errors import SlimlmError
from slimlm.formats import ggml

ROWS, N = 6, 256
NB = N // 32


def _scales(rng: np.random.Generator) -> np.ndarray:
    """Per-block scales with short mantissas, so that small integer multiples are exact in float32."""
    return (rng.integers(1, 256, (ROWS, NB)) * 2.0 ** -14).astype(np.float32)


def _with_extreme(rng: np.random.Generator, codes: np.ndarray, value: int) -> np.ndarray:
    """Put ``value`` at one random position of every 32-block (llama.cpp derives the scale from it)."""
    blocks = codes.reshape(ROWS, NB, 32)
    blocks[np.arange(ROWS)[:, None], np.arange(NB)[None], rng.integers(0, 32, (ROWS, NB))] = value
    return blocks.reshape(ROWS, N)


def _per_value(a: np.ndarray) -> np.ndarray:
    return np.repeat(a, 32, axis=1)


def test_q8_0_equals_llamacpp_rounding_on_its_grid():
    rng = np.random.default_rng(0)
    d = _scales(rng)
    q = _with_extreme(rng, rng.integers(-127, 128, (ROWS, N)).astype(np.int8), 127)
    q[::2] = -q[::2]  # blocks whose largest value is negative
    x = q.astype(np.float32) * _per_value(d)
    assert np.array_equal(ggml.pack_blocks("Q8_0", q, d), ggml.quantize(x, "Q8_0"))


def test_q4_0_equals_llamacpp_rounding_on_its_grid():
    rng = np.random.default_rng(1)
    d = _scales(rng)
    codes = _with_extreme(rng, rng.integers(1, 16, (ROWS, N)).astype(np.uint8), 0)  # 0 is -8·d: the max |x|
    x = (codes.astype(np.float32) - 8) * _per_value(d)
    assert np.array_equal(ggml.pack_blocks("Q4_0", codes, d), ggml.quantize(x, "Q4_0"))


def test_q4_1_equals_llamacpp_rounding_on_its_grid():
    rng = np.random.default_rng(2)
    d = _scales(rng)
    m = -rng.integers(1, 16, (ROWS, NB)).astype(np.float32) * d  # a zero point on the grid (not 0: -0.0)
    codes = rng.integers(0, 16, (ROWS, N)).astype(np.uint8)
    blocks = codes.reshape(ROWS, NB, 32)
    blocks[..., 3], blocks[..., 17] = 0, 15  # the block's min and max: llama.cpp's d is then (15·d)/15
    x = codes.astype(np.float32) * _per_value(d) + _per_value(m)
    assert np.array_equal(ggml.pack_blocks("Q4_1", codes, d, m), ggml.quantize(x, "Q4_1"))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_decodes_to_codes_times_fp16_scales(qtype):
    rng = np.random.default_rng(3)
    d = rng.uniform(1e-4, 1e-1, (ROWS, NB)).astype(np.float32)  # not fp16 values: rounded on the way
    m = rng.uniform(-1, 0, (ROWS, NB)).astype(np.float32)
    fp16 = lambda a: _per_value(a.astype(np.float16).astype(np.float32))  # noqa: E731
    if qtype == "Q8_0":
        codes = rng.integers(-128, 128, (ROWS, N)).astype(np.int8)
        want = codes.astype(np.float32) * fp16(d)
    else:
        codes = rng.integers(0, 16, (ROWS, N)).astype(np.uint8)
        want = ((codes.astype(np.float32) - 8) * fp16(d) if qtype == "Q4_0"
                else codes.astype(np.float32) * fp16(d) + fp16(m))
    packed = ggml.pack_blocks(qtype, codes, d, m if qtype == "Q4_1" else None)
    assert packed.shape == (ROWS, ggml.row_bytes(qtype, N))
    assert np.array_equal(ggml.dequantize(packed, qtype, (ROWS, N)), want)


def test_types_without_a_packer_are_refused():
    with pytest.raises(SlimlmError, match="no block packer for Q4_K"):
        ggml.pack_blocks("Q4_K", np.zeros((1, 256), np.uint8), np.ones((1, 8), np.float32))
    with pytest.raises(SlimlmError, match="Q4_1 without mins"):
        ggml.pack_blocks("Q4_1", np.zeros((1, 32), np.uint8), np.ones((1, 1), np.float32))
