"""Importance matrices exactly as llama.cpp defines them: per weight matrix, the sum over calibration tokens of each
input column's squared activation, plus the token count.

Files are llama.cpp's: the GGUF form (``NAME.in_sum2`` F32 [n_mat, n_in] and ``NAME.counts`` F32 [n_mat, 1], keys
imatrix.datasets / imatrix.chunk_count / imatrix.chunk_size) and the legacy ``.dat`` form (per entry: name, ncall,
nval, values = sum/count*ncall; then the chunk count and the dataset name). Collection hooks every Linear inside the
decoder layers in transformers (llama.cpp skips the output matrix by default too): their Gram diagonal."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from slimlm.checkpoint import open_checkpoint, read_config
from slimlm.checkpoint.names import TensorNames
from slimlm.errors import SlimlmError

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 [n_mat, n_in]: sum of x_j^2 over tokens
    counts: np.ndarray  # float32 [n_mat]: tokens seen

    def importance(self) -> np.ndarray:
        """Mean squared activation per input column ([n_in], or [n_mat, n_in] for experts) as llama-quantize uses it."""
        counts = self.counts.astype(np.float64)[:, None]
        values = np.where(counts > 0, self.sums / np.maximum(counts, 1), 1.0).astype(np.float32)
        return values[0] if values.shape[0] == 1 else values


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> np.ndarray | None:
        entry = self.entries.get(name)
        return None if entry is None else entry.importance()


# ---------------------------------------------------------------- files
def read_imatrix(path: Path) -> Imatrix:
    """Read a llama.cpp imatrix file of either form (GGUF is recognised by its magic)."""
    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"imatrix file {path} does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise SlimlmError(f"{path} is not a valid llama.cpp imatrix file ({exc})") from None


def _read_gguf(path: Path) -> Imatrix:
    try:
        ckpt = open_checkpoint(path)
        ckpt.check_complete()
    except SlimlmError as exc:
        raise SlimlmError(f"{path} is not a valid llama.cpp imatrix file ({exc})") from None
    header = ckpt.gguf_header
    assert header is not None
    out = Imatrix()
    if (f := header.field(KEY_DATASETS)) is not None:
        out.datasets = list(f.value())
    if (f := header.field(KEY_CHUNK_COUNT)) is not None:
        out.chunk_count = int(f.value())
    if (f := header.field(KEY_CHUNK_SIZE)) is not None:
        out.chunk_size = int(f.value())
    sums, counts = {}, {}
    for t in ckpt.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = t
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = t
    if not sums:
        raise SlimlmError(f"{path} is a GGUF file but holds no imatrix data (no *.in_sum2 tensors)")
    for name, s in sums.items():
        if name not in counts:
            raise SlimlmError(f"{path}: {name} has sums but no counts")
        c = ckpt.load_array(counts[name]).reshape(-1)
        v = ckpt.load_array(s).reshape(len(c), -1)
        out.entries[name] = ImatrixEntry(v.copy(), c.copy())
    return out


def _read_dat(path: Path) -> Imatrix:
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise ValueError(f"implausible entry count {n_entries}")
    out = Imatrix()
    for _ in range(n_entries):
        (length,) = take("<i")
        name = buf[pos:pos + length].decode("utf-8")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(buf):
            raise ValueError(f"entry {name!r} claims {nval} values")
        values = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # Legacy values are mean * ncall; store them as sums over ncall "tokens" so importance() = mean.
        out.entries[name] = ImatrixEntry(values[None, :].copy(), np.array([max(ncall, 0)], dtype=np.float32))
        if ncall <= 0:
            out.entries[name].counts[:] = 1.0
    if pos + 4 <= len(buf):
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(buf):
            (length,) = take("<i")
            if length > 0:
                out.datasets.append(buf[pos:pos + length].decode("utf-8", errors="replace"))
    return out


def write_imatrix(imatrix: Imatrix, path: Path, fmt: str | None = None) -> Path:
    """Write llama.cpp's GGUF form (default, or for a .gguf name) or the legacy form (``fmt='dat'``/.dat)."""
    from slimlm.writers.gguf import atomic_path

    path = Path(path)
    fmt = fmt or ("dat" if path.suffix.lower() == ".dat" else "gguf")
    if fmt not in ("gguf", "dat"):
        raise SlimlmError(f"unknown imatrix format {fmt!r}; use gguf or dat")
    with atomic_path(path) as tmp:
        (_write_gguf if fmt == "gguf" else _write_dat)(imatrix, tmp)
    return path


def _write_gguf(im: Imatrix, path: Path) -> None:
    writer = gguf.GGUFWriter(path, arch="")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama.cpp's imatrix files carry none
    writer.add_type("imatrix")
    writer.add_array(KEY_DATASETS, list(im.datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, int(im.chunk_count))
    writer.add_uint32(KEY_CHUNK_SIZE, int(im.chunk_size))
    for name in sorted(im.entries):
        e = im.entries[name]
        writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32))
        writer.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_dat(im: Imatrix, path: Path) -> None:
    chunk = max(im.chunk_size, 1)
    parts = [struct.pack("<i", len(im.entries))]
    for name in sorted(im.entries):
        e = im.entries[name]
        encoded = name.encode("utf-8")
        ncall = int((float(e.counts.max()) + chunk - 1) // chunk) if im.chunk_size else int(e.counts.max())
        counts = np.repeat(e.counts.astype(np.float32), e.sums.shape[1])
        sums = e.sums.reshape(-1).astype(np.float32)
        values = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), 1.0) * np.float32(ncall)
        parts += [struct.pack("<i", len(encoded)), encoded, struct.pack("<ii", ncall, e.sums.size),
                  values.astype("<f4").tobytes()]
    dataset = (im.datasets[-1] if im.datasets else "").encode("utf-8")
    parts += [struct.pack("<i", int(im.chunk_count)), struct.pack("<i", len(dataset)), dataset]
    path.write_bytes(b"".join(parts))


# ---------------------------------------------------------------- checks
def check_compatible(imatrix: Imatrix, row_lengths: dict[str, int], source: str = "imatrix") -> int:
    """Raise if the imatrix cannot be from this model; return how many of the model's tensors it covers."""
    matched = 0
    for name, n in row_lengths.items():
        entry = imatrix.entries.get(name)
        if entry is None:
            continue
        if entry.sums.shape[-1] != n:
            raise SlimlmError(f"{source} does not fit this model: {name} has rows of {n} values but the imatrix "
                              f"has {entry.sums.shape[-1]} (made for another model?)")
        matched += 1
    if imatrix.entries and matched == 0:
        some = ", ".join(sorted(imatrix.entries)[:3])
        raise SlimlmError(f"{source} has no entry for any tensor of this model (it has e.g. {some}); "
                          "made for another model?")
    return matched


# ---------------------------------------------------------------- collection
def linear_gguf_names(model) -> dict[str, str]:
    """HF module name -> GGUF tensor name (without '.weight') for every Linear inside the decoder layers."""
    from slimlm.archs import SUPPORTED_ARCHITECTURES

    hf_arch = (model.config.architectures or [type(model).__name__])[0]
    spec = SUPPORTED_ARCHITECTURES.get(hf_arch) or SUPPORTED_ARCHITECTURES.get(type(model).__name__)
    if spec is None:
        raise SlimlmError(f"unsupported architecture {hf_arch}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = TensorNames(spec.gguf_arch, model.config.num_hidden_layers).linears(model)
    return {mod_name: gname for mod_name, gname in names.items() if gname is not None and gname.startswith("blk.")}


def collect_imatrix(model_path: Path, calib: Path, *, ctx: int = 512, chunks: int | None = None,
                    progress: Callable[[int, int], None] | None = None, hessians: dict[str, "np.ndarray"] | None = None,
                    hessian_chunks: int | None = None) -> Imatrix:
    """Run the model over ``calib`` (text or JSONL) in llama.cpp's ctx-token windows and sum squared Linear inputs.
    With ``hessians`` (a dict to fill), also accumulate each matrix's input covariance X^T X / tokens (float32
    [n_in, n_in], one array per distinct input) for GPTQ-style searches, from the first ``hessian_chunks`` windows
    (default: all; X^T X costs more than the forward pass)."""
    import torch

    from slimlm.algorithms.stats import Wanted
    from slimlm.data.calibration import check_text_path, linear_stats, llama_windows, read_text_file
    from slimlm.archs import arch_spec
    from slimlm.models import load_model

    calib = Path(calib)
    check_text_path(calib, "calibration file")
    config = Path(model_path) / "config.json"
    if config.is_file():
        arch_spec(read_config(config))  # clear error for architectures GGUF cannot hold
    model, tokenizer, _ = load_model(model_path)
    if tokenizer is None:
        raise SlimlmError(f"{model_path} has no usable tokenizer for calibration text")
    windows = llama_windows(tokenizer, read_text_file(calib), ctx, chunks)
    modules = dict(model.named_modules())
    linears = {gname + ".weight": modules[name] for name, gname in linear_gguf_names(model).items()}
    # The sums of x² in float64 (llama.cpp's imatrix); the covariance summed in float32, as GGUF searches had it.
    wanted = Wanted(gram_dtype=None if hessians is None else torch.float32, abs_stats=False, squares=True)
    stats = linear_stats(model, windows, linears, wanted, hessian_chunks or len(windows), progress)
    im = Imatrix(datasets=[calib.name], chunk_count=len(windows), chunk_size=ctx)
    shared: dict[int, np.ndarray] = {}
    for name, st in stats.by_linear.items():
        im.entries[name] = ImatrixEntry(st.sq_sum.to(torch.float32).numpy()[None, :].copy(),
                                        np.array([st.tokens], dtype=np.float32))
        if hessians is not None:
            if id(st) not in shared:
                shared[id(st)] = st.hessian.numpy()
            hessians[name] = shared[id(st)]
    return im


def make_imatrix(model: str | Path, calib: str | Path, out: str | Path, *, chunks: int | None = None, ctx: int = 512,
                 overwrite: bool = False, fmt: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """``slimlm imatrix``: collect over ``calib`` and write llama.cpp's file (GGUF form unless ``out`` ends in .dat)."""
    from slimlm.writers.gguf import check_output

    out = Path(out)
    check_output(out, overwrite)
    im = collect_imatrix(Path(model), Path(calib), ctx=ctx, chunks=chunks, progress=progress)
    write_imatrix(im, out, fmt)
    return {"out": str(out), "entries": len(im.entries), "chunks": im.chunk_count, "chunk_size": im.chunk_size,
            "tokens": im.chunk_count * im.chunk_size,
            "format": fmt or ("dat" if out.suffix.lower() == ".dat" else "gguf")}
