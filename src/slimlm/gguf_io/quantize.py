"""Streaming quantization to GGUF: read one tensor (mmap), encode it with the type the mix plan gives it,
write it, drop it. Peak memory is a few tensors whatever the model size.

Source: a Hugging Face dir (converted on the fly: names, rope permutation, metadata, tokenizer) or a GGUF
(re-quantized, with a warning: error compounds). Plan: llama.cpp's per-tensor rules (formats.gguf_mix) plus
``--tensor-type`` overrides. Codecs: formats.ggml (bit-exact llama.cpp blocks, importance-weighted when an
imatrix is given).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gguf
import numpy as np

from slimlm.errors import SlimlmError
from slimlm.formats import gguf_mix
from slimlm.gguf_io.imatrix import Imatrix, check_compatible, collect_imatrix, read_imatrix
from slimlm.gguf_io.sources import ModelSource, open_source
from slimlm.gguf_io.writer import check_output, tensor_nbytes, write_gguf

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType
_FLOATS = (T.F32, T.F16, T.BF16)

# Tensors encoded ahead of the one being written: overlaps encoding with I/O, bounds memory to a few tensors.
LOOKAHEAD = 4
# Encoder processes for the plain codecs (at most the CPU count).
WORKERS = 2

Progress = Callable[[int, int, str], None]
METHODS = ("llama.cpp", "gptq", "awq", "awq+gptq")


@dataclass
class PlannedTensor:
    name: str
    shape: list[int]
    type: str
    bytes: int


@dataclass
class QuantizeResult:
    """What was (or, with dry_run, would be) written."""

    model: str
    out: str | None
    ftype: str
    tensors: list[PlannedTensor]
    tensor_bytes: int
    file_bytes: int | None
    n_params: int
    bits_per_weight: float
    seconds: float
    imatrix_entries: int = 0
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    type_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_type_of(ftype: str) -> gguf.LlamaFileType:
    return gguf.LlamaFileType.ALL_F32 if ftype == "F32" else gguf.LlamaFileType[f"MOSTLY_{ftype}"]


def _tensor_infos(source: ModelSource) -> list[gguf_mix.TensorInfo]:
    infos = []
    for t in source.tensors:
        base = t.source_type if t.source_type in _FLOATS else T.F32
        if len(t.shape) <= 1:
            base = T.F32  # llama.cpp keeps 1-D tensors (norms, biases) in F32
        infos.append(gguf_mix.TensorInfo(t.name, tuple(t.shape), base))
    return infos


def plan_for(source: ModelSource, ftype: str, tensor_types: Sequence[str] = (), has_imatrix: bool = False
             ) -> dict[str, T]:
    facts = gguf_mix.ArchFacts(n_layers=source.facts["n_layers"], n_head=source.facts["n_head"],
                               n_head_kv=source.facts["n_head_kv"], arch=source.arch)
    overrides = gguf_mix.parse_overrides(tensor_types)
    plan = gguf_mix.plan_types(_tensor_infos(source), facts, ftype, overrides=overrides, has_imatrix=has_imatrix)
    from slimlm.formats import ggml

    missing = sorted({q.name for q in plan.values() if q not in ggml.REGISTRY})
    if missing:
        raise SlimlmError(f"no encoder for {', '.join(missing)} yet; slimlm can write: {', '.join(ggml.supported_names())}")
    return plan


def load_importance(imatrix: Path | Imatrix | None, calib: Path | None, model: Path, calib_chunks: int | None,
                    ctx: int = 512) -> Imatrix | None:
    if imatrix is not None and calib is not None:
        raise SlimlmError("pass either --imatrix or --calib, not both")
    if isinstance(imatrix, Imatrix):
        return imatrix
    if imatrix is not None:
        return read_imatrix(Path(imatrix))
    if calib is not None:
        return collect_imatrix(model, Path(calib), ctx=ctx, chunks=calib_chunks)
    return None


def quantize_gguf(
    model: str | Path,
    to: str,
    out: str | Path | None = None,
    *,
    imatrix: str | Path | Imatrix | None = None,
    calib: str | Path | None = None,
    calib_chunks: int | None = 100,
    tensor_types: Sequence[str] = (),
    dry_run: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    method: str = "llama.cpp",
    hessians: dict[str, np.ndarray] | None = None,
    gptq_damp: float = 0.01,
    hessian_chunks: int | None = 32,
    encoder: Callable[[np.ndarray, T, np.ndarray | None, str], np.ndarray] | None = None,
) -> QuantizeResult:
    """Write ``model`` (HF dir or GGUF) as a GGUF of mix ``to`` (Q4_K_M, Q8_0, F16, ...) to ``out``.

    ``method`` (all write the same tensor types and sizes; see slimlm.algorithms.gguf_search):
    "llama.cpp" rounds each block on its own, as llama-quantize does; "gptq" compensates each block's
    rounding error in the later columns using the calibration inputs' covariance; "awq" folds searched
    per-channel scales into the norms first; "awq+gptq" does both. gptq needs ``calib`` (or, from the API,
    ``imatrix`` plus ``hessians``); awq needs ``calib`` or ``imatrix``.
    ``encoder(x, qtype, importance, name)`` replaces the block encoding altogether (tests, experiments).
    With ``dry_run`` no calibration runs: the plan assumes an imatrix when one is asked for.
    """
    start = time.perf_counter()
    ftype = gguf_mix.normalize_ftype(to)
    model = Path(model)
    if not dry_run:
        if out is None:
            raise SlimlmError("an output path is needed (-o out.gguf), or use --dry-run")
        out = Path(out)
        check_output(out, overwrite)
    source = open_source(model)
    warnings = []
    if source.kind == "gguf":
        msg = (f"re-quantizing {model.name}, which is already quantized: errors compound; quantize from the "
               "original Hugging Face checkpoint when you can") if source.quantized_source else \
              f"converting from the GGUF {model.name}; metadata copied as is"
        log.info(msg)  # returned in result.warnings; the CLI prints it once
        warnings.append(msg)
    if method not in METHODS:
        raise SlimlmError(f"unknown GGUF method {method!r}; choose one of: {', '.join(METHODS)}")
    uses_gptq, uses_awq = "gptq" in method, "awq" in method
    if uses_awq and imatrix is None and calib is None:
        raise SlimlmError(f"--method {method} needs calibration: --calib FILE (or --imatrix FILE for awq)")
    if dry_run and calib is not None:
        im = None  # the plan only needs to know one will exist
    elif (uses_gptq or (uses_awq and calib is not None)) and hessians is None:
        if calib is None:
            raise SlimlmError(f"--method {method} needs calibration text (--calib FILE): it uses the inputs' covariance")
        if imatrix is not None:
            raise SlimlmError(f"--method {method} computes its own importance matrix from --calib; drop --imatrix")
        hessians = {}
        im = collect_imatrix(model, Path(calib), chunks=calib_chunks, hessians=hessians, hessian_chunks=hessian_chunks)
    else:
        im = load_importance(imatrix, Path(calib) if calib else None, model, calib_chunks)
    plan = plan_for(source, ftype, tensor_types, has_imatrix=im is not None or calib is not None)
    rows = {t.name: int(t.shape[-1]) for t in source.tensors if len(t.shape) >= 2 and plan[t.name] not in _FLOATS}
    matched = check_compatible(im, rows, "the importance matrix") if im is not None else 0
    importance_of = (lambda name: im.importance(name)) if im is not None else (lambda name: None)
    if uses_awq and not dry_run:
        source, importance_of, hessians = _equalize(source, plan, importance_of, hessians)
    if uses_gptq and encoder is None:
        from slimlm.algorithms.gguf_search import gptq_encoder

        encoder = gptq_encoder(hessians, damp=gptq_damp)
    n_params = int(sum(np.prod(t.shape, dtype=np.int64) for t in source.tensors))
    planned = [PlannedTensor(t.name, list(t.shape), plan[t.name].name, tensor_nbytes(t.shape, plan[t.name]))
               for t in source.tensors]
    total = sum(p.bytes for p in planned)
    counts: dict[str, int] = {}
    for p in planned:
        counts[p.type] = counts.get(p.type, 0) + 1
    result = QuantizeResult(str(model), None if out is None else str(out), ftype, planned, total, None, n_params,
                            total * 8 / max(n_params, 1), 0.0, matched, dry_run, warnings, counts)
    if dry_run:
        result.seconds = time.perf_counter() - start
        return result

    tensors = source.tensors

    def load(i: int) -> tuple[np.ndarray, T, np.ndarray | None]:
        t = tensors[i]
        qtype = plan[t.name]
        values = t.load()
        if tuple(values.shape) != tuple(t.shape):
            raise SlimlmError(f"{t.name}: loaded shape {values.shape} differs from the declared {t.shape}")
        importance = importance_of(t.name) if qtype not in _FLOATS else None
        return values, qtype, importance

    def metadata(writer: gguf.GGUFWriter) -> Any:
        meta = source.write_metadata(writer)
        writer.add_file_type(int(file_type_of(ftype)))
        if method != "llama.cpp":
            writer.add_string("slimlm.quantize.method", method)
        if any(q not in _FLOATS for q in plan.values()):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if im is not None:
            if isinstance(imatrix, (str, Path)):
                writer.add_string("quantize.imatrix.file", str(imatrix))
            if im.datasets:
                writer.add_string("quantize.imatrix.dataset", im.datasets[0])
            writer.add_int32("quantize.imatrix.entries_count", len(im.entries))
            if im.chunk_count:
                writer.add_int32("quantize.imatrix.chunks_count", int(im.chunk_count))
        return meta

    # The plain codecs are numpy code that holds the GIL, so they run in forked worker processes (which only
    # run numpy: no torch/OpenMP state is touched after the fork). A worker loads its tensor itself (the
    # source's mmap loaders are inherited through the fork), so only a tensor index goes out and only the
    # encoded bytes come back. Custom encoders (closures over Hessians, test hooks) run in threads.
    global _FORKED
    workers = max(1, min(WORKERS, os.cpu_count() or 1))
    use_processes = (encoder is None and workers > 1 and len(tensors) > 8
                     and "fork" in multiprocessing.get_all_start_methods())
    pool_cls = ProcessPoolExecutor if use_processes else ThreadPoolExecutor
    pool_kwargs = {"mp_context": multiprocessing.get_context("fork")} if use_processes else {}
    if use_processes:
        _FORKED = load  # read by _encode_index in the workers, which fork on the first submit
    try:
        with pool_cls(max_workers=workers if use_processes else 2, **pool_kwargs) as pool:
            pending: dict[int, Future] = {}

            def submit(j: int) -> Future:
                if use_processes:
                    if int(np.prod(tensors[j].shape, dtype=np.int64)) < 1 << 16:  # not worth a round trip
                        done: Future = Future()
                        done.set_result(_plain_encode(*load(j), tensors[j].name, threads=1))
                        return done
                    return pool.submit(_encode_index, j)
                return pool.submit(lambda: (encoder or _plain_encode)(*load(j), tensors[j].name))

            def fill(i: int) -> None:
                for j in range(i, min(i + LOOKAHEAD + 1, len(tensors))):
                    if j not in pending:
                        pending[j] = submit(j)

            def produce_ahead(i: int) -> np.ndarray:
                fill(i)
                data = pending.pop(i).result()
                fill(i + 1)  # keep the workers busy while this one is written
                if progress:
                    progress(i + 1, len(tensors), tensors[i].name)
                return data

            fill(0)  # the first tensors encode while the metadata (tokenizer) is built and written
            try:
                write_gguf(out, source.arch, metadata, [(t.name, tuple(t.shape), plan[t.name]) for t in tensors],
                           produce_ahead)
            finally:
                for f in pending.values():
                    f.cancel()
    finally:
        _FORKED = None
    result.file_bytes = out.stat().st_size
    result.seconds = time.perf_counter() - start
    return result


def _equalize(source: ModelSource, plan: dict[str, T], importance_of: Callable[[str], np.ndarray | None],
              hessians: dict[str, np.ndarray] | None):
    """Fold searched per-channel scales into the norms (AWQ-style); adjust importances and covariances to match."""
    import dataclasses

    from slimlm.algorithms import gguf_search

    by_name = {t.name: t for t in source.tensors}
    scales = gguf_search.equalization_plan(lambda n: by_name[n].load(), set(by_name), plan,
                                           source.facts["n_layers"], importance_of, hessians)
    transforms = gguf_search.apply_equalization(scales, source.facts["n_layers"])
    tensors = []
    for t in source.tensors:
        fn = transforms.get(t.name)
        tensors.append(t if fn is None else dataclasses.replace(t, load=lambda t=t, fn=fn: fn(t.load())))
    new_h = None if hessians is None else dict(hessians)
    cache: dict[tuple[int, int], np.ndarray] = {}
    overrides: dict[str, np.ndarray] = {}
    for name in by_name:
        s = gguf_search.input_scale_of(scales, name)
        if s is None:
            continue
        imp = importance_of(name)
        if imp is not None:
            overrides[name] = imp / (s * s)
        if new_h is not None and name in hessians:
            key = (id(hessians[name]), id(s))
            if key not in cache:
                cache[key] = hessians[name] / np.outer(s, s)
            new_h[name] = cache[key]
    log.info("equalized %d groups", len(scales))
    return (dataclasses.replace(source, tensors=tensors),
            lambda name: overrides[name] if name in overrides else importance_of(name), new_h)


# The tensor loader the forked encoder processes call (set by quantize_gguf just before its pool forks).
_FORKED: Callable[[int], tuple[np.ndarray, T, np.ndarray | None]] | None = None


def _encode_index(i: int) -> np.ndarray:
    """Worker-process entry point (module level so it pickles): load tensor ``i`` and encode it."""
    assert _FORKED is not None, "encoder worker without a forked source"
    values, qtype, importance = _FORKED(i)
    return _plain_encode(values, qtype, importance, "", threads=1)  # the processes are the parallelism


def _plain_encode(values: np.ndarray, qtype: T, importance: np.ndarray | None, name: str,
                  threads: int | None = None) -> np.ndarray:
    from slimlm.formats import ggml

    if qtype == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    return ggml.quantize(values, qtype, importance, threads=threads)
