"""Property test: any truncation or byte corruption of a real safetensors or GGUF file (written by the
formats' own writers) yields either a valid inspection or a one-line SlimlmError, never another exception
and never a hang (each example has a deadline)."""

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimlm.errors import SlimlmError
from slimlm.inspect import inspect
from test_checkpoint_readers import write_safetensors_dir, write_tiny_gguf

_counter = itertools.count()


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("fuzz-originals")
    st_file = write_safetensors_dir(base / "st") / "model.safetensors"
    return {"safetensors": st_file.read_bytes(), "gguf": write_tiny_gguf(base / "t.gguf").read_bytes()}


@st.composite
def corruptions(draw, length: int):
    """A truncation point (or none) and up to 6 (position, new byte) flips, biased towards the header."""
    header_end = min(length, 4096)
    flips = draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), max_size=6))
    cut = draw(st.one_of(st.none(), st.integers(0, header_end), st.integers(0, length)))
    return cut, flips


def _apply(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in flips:
        buf[pos] = value
    return bytes(buf[:cut] if cut is not None else buf)


def _check(tmp: Path, suffix: str, data: bytes) -> None:
    path = tmp / f"case-{next(_counter)}{suffix}"
    path.write_bytes(data)
    try:
        report = inspect(path)
    except SlimlmError as exc:
        message = str(exc)
        assert message and "\n" not in message and str(path) in message
    else:
        assert report.total_params >= 0 and report.missing_bytes >= 0
    finally:
        path.unlink()


FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_corrupted_safetensors_only_clean_errors(originals, tmp_path, data):
    cut, flips = data.draw(corruptions(len(originals["safetensors"])))
    _check(tmp_path, ".safetensors", _apply(originals["safetensors"], cut, flips))


@FUZZ
@given(data=st.data())
def test_corrupted_gguf_only_clean_errors(originals, tmp_path, data):
    cut, flips = data.draw(corruptions(len(originals["gguf"])))
    _check(tmp_path, ".gguf", _apply(originals["gguf"], cut, flips))


def test_length_fields_set_to_huge_values_fail_fast(originals, tmp_path):
    """Every 8-byte window of the GGUF header overwritten with 0xFF..: a corrupt count or length must not
    make the reader loop over billions of empty reads."""
    original = originals["gguf"]
    for pos in range(0, 2048, 8):
        _check(tmp_path, ".gguf", original[:pos] + b"\xff" * 8 + original[pos + 8:])


def test_corrupt_array_length_is_a_truncated_header(originals, tmp_path):
    import struct

    data = bytearray(originals["gguf"])
    key = b"tokenizer.ggml.token_type"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<IIQ", data, at) == (9, 5, 256)  # ARRAY of INT32, 256 items
    struct.pack_into("<Q", data, at + 8, 2**40)
    path = tmp_path / "huge-array.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(SlimlmError, match="truncated GGUF header"):
        inspect(path)


def test_huge_block_count_is_quick(originals, tmp_path):
    """A corrupt ``llama.block_count`` (found by the fuzzer: one flipped byte made it 587,202,562) must not
    build per-layer tables for half a billion layers: the spec refuses over 10,000 layers, inspect goes on."""
    import struct

    data = bytearray(originals["gguf"])
    key = b"llama.block_count"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # UINT32
    struct.pack_into("<I", data, at + 4, 2**31 - 1)  # before the fix: a 2-billion-entry tuple (minutes, ~16 GB)
    _check(tmp_path, ".gguf", bytes(data))
