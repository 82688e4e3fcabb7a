"""Streaming GGUF writer: header and tensor table first, then each tensor's bytes as soon as they exist.

gguf's GGUFWriter keeps every tensor in memory until the end unless the table is written first; we always
use its streaming mode, so peak memory is one tensor (plus its encoded bytes). The file is written under a
temporary name beside the target and renamed at the end, so a crash never leaves a half-written .gguf.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import gguf
import numpy as np

from slimlm.errors import SlimlmError

T = gguf.GGMLQuantizationType


def tensor_nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if shape and shape[-1] % block:
        raise SlimlmError(f"rows of {shape[-1]} values do not fit {qtype.name} blocks of {block}")
    return n // block * size


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless asked; fail early on a missing folder."""
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise SlimlmError(f"folder {out.parent} does not exist")


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """Yield a temp path beside ``out``; rename onto ``out`` on success, delete it on any failure."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_gguf(
    out: Path,
    arch: str,
    write_metadata: Callable[[gguf.GGUFWriter], Any],
    tensors: Iterable[tuple[str, tuple[int, ...], T]],
    produce: Callable[[int], np.ndarray],
) -> Any:
    """Write a GGUF to ``out`` atomically.

    ``tensors`` lists (name, PyTorch-order shape, type) in file order; ``produce(i)`` returns tensor i's
    encoded data (float32/float16 values or uint8 blocks) and is called once per tensor, in order.
    Returns whatever ``write_metadata`` returned.
    """
    infos = list(tensors)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            meta = write_metadata(writer)
            for name, shape, qtype in infos:
                writer.add_tensor_info(name, shape, np.dtype(np.float32), tensor_nbytes(shape, qtype), raw_dtype=qtype)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, (name, shape, qtype) in enumerate(infos):
                data = produce(i)
                expected = tensor_nbytes(shape, qtype)
                if data.nbytes != expected:
                    raise RuntimeError(f"{name}: encoder returned {data.nbytes} bytes, {qtype.name} needs {expected}")
                writer.write_tensor_data(np.ascontiguousarray(data))
            writer.flush()
        finally:
            writer.close()
    return meta
