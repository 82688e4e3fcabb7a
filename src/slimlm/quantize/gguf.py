"""Streaming quantization to GGUF: read one tensor (mmap), encode it with the type the mix plan gives it
(llama.cpp's per-tensor rules, formats.gguf_mix, plus ``--tensor-type`` overrides), write it, drop it: peak memory
is a few tensors whatever the model size. Source: an HF dir (converted on the fly) or a GGUF (re-quantized, with a
warning: error compounds). Codecs: formats.ggml (bit-exact llama.cpp blocks, importance-weighted with an imatrix)."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gguf
import numpy as np

from slimlm.algorithms.methods import get_method
from slimlm.errors import SlimlmError
from slimlm.formats import gguf_mix
from slimlm.quantize.budget import Budget
from slimlm.quantize.imatrix import Imatrix, check_compatible, collect_imatrix, read_imatrix
from slimlm.writers.gguf_metadata import write_source_metadata
from slimlm.quantize.sources import ModelSource, open_source
from slimlm.writers.gguf import atomic_path, check_output, data_layout, tensor_nbytes, write_gguf, write_gguf_header
from slimlm.util.process import ForkPool, fork_available, keep_heap

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType
_FLOATS = (T.F32, T.F16, T.BF16)

LOOKAHEAD = 4  # custom encoders (threads): tensors encoded ahead of the one written; bounds memory to a few
WORKERS = 2  # encoder processes for the plain codecs (at most the CPU count)

Progress = Callable[[int, int, str], None]
Encoder = Callable[[np.ndarray, T, np.ndarray | None, str], np.ndarray]


@dataclass
class PlannedTensor:
    name: str
    shape: list[int]
    type: str
    bytes: int


@dataclass
class GGUFResult:
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
    budget: dict[str, Any] = field(default_factory=dict)  # a budget mix: the target and what was measured

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["budget"] = {k: v for k, v in self.budget.items() if k != "sensitivity"}  # the measurement object
        return out


def file_type_of(ftype: str) -> gguf.LlamaFileType:
    return gguf.LlamaFileType.ALL_F32 if ftype == "F32" else gguf.LlamaFileType[f"MOSTLY_{ftype}"]


def plan_tensors(source: ModelSource) -> list[gguf_mix.PlanTensor]:
    """The source's tensors as the planner sees them. Base types: the source's float type, else F32; llama.cpp
    keeps 1-D tensors (norms, biases) in F32."""
    return [gguf_mix.PlanTensor(t.name, tuple(t.shape), t.source_type if len(t.shape) > 1 and t.source_type in _FLOATS
                                else T.F32) for t in source.tensors]


def plan_for(source: ModelSource, ftype: str, tensor_types: Sequence[str] = (), has_imatrix: bool = False
             ) -> dict[str, T]:
    facts = gguf_mix.ArchFacts(n_layers=source.facts["n_layers"], n_head=source.facts["n_head"],
                               n_head_kv=source.facts["n_head_kv"], n_expert=source.facts.get("n_expert", 0),
                               arch=source.arch)
    overrides = gguf_mix.parse_overrides(tensor_types)
    plan = gguf_mix.plan_types(plan_tensors(source), facts, ftype, overrides=overrides, has_imatrix=has_imatrix)
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


def quantize_gguf(model: str | Path | ModelSource, to: str, out: str | Path | None = None, *,
                  imatrix: str | Path | Imatrix | None = None, calib: str | Path | None = None,
                  calib_chunks: int | None = 100, tensor_types: Sequence[str] = (), dry_run: bool = False,
                  overwrite: bool = False, progress: Progress | None = None, method: str = "llama.cpp",
                  hessians: dict[str, np.ndarray] | None = None, gptq_damp: float = 0.01,
                  hessian_chunks: int | None = 32, encoder: Encoder | None = None, budget: Budget | None = None,
                  budget_windows: int = 4, per_layer: bool = True, sensitivity: Any = None,
                  budget_types: Sequence[T] | None = None, budget_covariance: bool = False) -> GGUFResult:
    """Write ``model`` (HF dir, GGUF, or an opened ModelSource) as a GGUF of mix ``to`` (Q4_K_M, Q8_0, ...).

    ``method`` never changes tensor types or sizes (slimlm.algorithms.methods): "llama.cpp" rounds each block on
    its own, as llama-quantize does; "gptq" pushes each block's rounding error onto the later columns through the
    inputs' covariance; "awq" first folds searched per-channel scales into the norms; "awq+gptq" does both. gptq
    needs ``calib`` (its covariances; an ``imatrix`` given beside it weights the blocks); awq needs ``calib`` or
    ``imatrix``.
    ``encoder(x, qtype, importance, name)`` replaces the block encoding (tests, experiments). ``dry_run`` runs no
    calibration: the plan assumes an imatrix when one is asked for.

    ``budget`` (quantize.budget.Budget) makes a budget mix instead of ``to``: a type per tensor chosen from measured
    sensitivities (``budget_windows`` windows of ``calib``; one scale per tensor with ``per_layer``, the
    default, else per tensor kind) to fit the budget exactly. It needs ``calib``; ``imatrix`` (else collected from ``calib``) weights
    the errors and the encoding; ``sensitivity`` (quantize.budget.Sensitivity) reuses a measurement;
    ``budget_types`` narrows the candidate types (default formats.gguf_mix.BUDGET_CANDIDATES);
    ``budget_covariance`` prices each Linear's error under its input covariance (quantize.budget.measure).
    ``method`` "gptq" encodes the budget's types with GPTQ rounding (priced as llama.cpp rounds them)."""
    start = time.perf_counter()
    if budget is not None:
        if to is not None and to.strip().lower() != "budget":
            raise SlimlmError(f"a budget ({budget.describe()}) chooses every tensor's type itself; drop --to {to}")
        if method not in ("llama.cpp", "gptq"):
            raise SlimlmError(f"budget mixes round with llama.cpp's encoder or GPTQ (--method llama.cpp|gptq), "
                              f"not {method}: a smoothing step would change the weights the budget measured")
        if calib is None:
            raise SlimlmError("a budget mix measures each tensor's effect on the output: pass --calib TEXT")
    ftype = "F16" if budget is not None else gguf_mix.normalize_ftype(to)
    if not dry_run:
        if out is None:
            raise SlimlmError("an output path is needed (-o out.gguf), or use --dry-run")
        out = Path(out)
        check_output(out, overwrite, sources=[] if isinstance(model, ModelSource) else [model])
    source = model if isinstance(model, ModelSource) else open_source(Path(model))
    warnings = _source_warnings(source)
    algo = get_method(method, "gguf")
    budget_info: dict[str, Any] = {}
    if budget is not None:
        if algo.gptq and not dry_run:  # a dry run only plans: no covariances
            im, hessians = _importance(algo, method, source.path, imatrix, calib, calib_chunks, False, hessians,
                                       hessian_chunks)
        else:
            im = load_importance(imatrix, None if imatrix is not None else Path(calib), source.path, calib_chunks)
        plan, budget_info = _budget_plan(source, budget, Path(calib), im, budget_windows, per_layer, progress,
                                         sensitivity, budget_types, budget_covariance)
        ftype = budget_info["file_type"]
    else:
        im, hessians = _importance(algo, method, source.path, imatrix, calib, calib_chunks, dry_run, hessians,
                                   hessian_chunks)
        plan = plan_for(source, ftype, tensor_types, has_imatrix=im is not None or calib is not None)
    rows = {t.name: int(t.shape[-1]) for t in source.tensors if len(t.shape) >= 2 and plan[t.name] not in _FLOATS}
    matched = check_compatible(im, rows, "the importance matrix") if im is not None else 0
    if not dry_run:
        gguf_mix.check_imatrix(plan, ftype, None if im is None else im.entries.keys())
    importance_of = (lambda name: im.importance(name)) if im is not None else (lambda name: None)
    if algo.smoothing == "awq" and not dry_run:
        source, importance_of, hessians = _equalize(source, plan, importance_of, hessians)
    if algo.gptq and encoder is None:
        encoder = _gptq_encoder(hessians, gptq_damp)
    result = _planned_result(source, ftype, plan, out, matched, dry_run, warnings)
    if budget is not None:
        result.ftype, result.budget = f"budget ({budget.describe()})", budget_info
    if not dry_run:
        metadata = _metadata_writer(source, ftype, plan, method, im, imatrix,
                                    budget.describe() if budget is not None else None)
        _write(out, source, plan, importance_of, metadata, encoder, progress, overwrite)
        result.file_bytes = out.stat().st_size
    result.seconds = time.perf_counter() - start
    return result


def _budget_plan(source: ModelSource, budget: Budget, calib: Path, im: Imatrix, windows: int, per_layer: bool,
                 progress: Progress | None, sensitivity: Any, types: Sequence[T] | None, covariance: bool = False
                 ) -> tuple[dict[str, T], dict[str, Any]]:
    """The budget mix's plan and, for the result, the target, the bytes allowed and the KLD of each probe group."""
    from slimlm.quantize import budget as budget_mix

    plan, sens, allowed = budget_mix.plan_budget(source, plan_tensors(source), budget, calib, im.importance,
                                                 windows=windows, per_layer=per_layer, progress=progress, sensitivity=sensitivity,
                                                 types=types or gguf_mix.BUDGET_CANDIDATES, covariance=covariance)
    sizes = {t.name: tensor_nbytes(t.shape, plan[t.name]) for t in source.tensors}
    return plan, {"target": budget.describe(), "sensitivity": sens, "allowed_tensor_bytes": allowed, "windows": sens.windows,
                  "per_layer": per_layer, "group_kld": sens.group_kld,
                  "file_type": budget_mix.file_type_name(plan, sizes)}


def _source_warnings(source: ModelSource) -> list[str]:
    """What a user should know about a GGUF source (returned in result.warnings; the CLI prints it once)."""
    if source.kind != "gguf":
        return []
    name = source.path.name
    msg = (f"re-quantizing {name}, which is already quantized: errors compound; quantize from the "
           "original Hugging Face checkpoint when you can") if source.quantized_source else \
          f"converting from the GGUF {name}; metadata copied as is"
    log.info(msg)
    return [msg]


def _importance(algo, method: str, model: Path, imatrix, calib, calib_chunks: int | None, dry_run: bool,
                hessians: dict[str, np.ndarray] | None, hessian_chunks: int | None
                ) -> tuple[Imatrix | None, dict[str, np.ndarray] | None]:
    """The importance matrix (read, or collected from ``calib``) and, for the searches, the inputs' covariances."""
    uses_gptq, uses_awq = algo.gptq, algo.smoothing == "awq"
    if uses_awq and imatrix is None and calib is None:
        raise SlimlmError(f"--method {method} needs calibration: --calib FILE (or --imatrix FILE for awq)")
    if dry_run and calib is not None:
        return None, hessians  # the plan only needs to know one will exist
    if (uses_gptq or (uses_awq and calib is not None)) and hessians is None:
        if calib is None:
            raise SlimlmError(f"--method {method} needs calibration text (--calib FILE): it uses the inputs' covariance")
        hessians = {}
        if imatrix is not None:  # the given imatrix weights the blocks; the text gives only the covariances
            collect_imatrix(model, Path(calib), chunks=hessian_chunks, hessians=hessians,
                            hessian_chunks=hessian_chunks)
            return load_importance(imatrix, None, model, calib_chunks), hessians
        im = collect_imatrix(model, Path(calib), chunks=calib_chunks, hessians=hessians, hessian_chunks=hessian_chunks)
        return im, hessians
    return load_importance(imatrix, Path(calib) if calib else None, model, calib_chunks), hessians


def _planned_result(source: ModelSource, ftype: str, plan: dict[str, T], out: Path | None, matched: int,
                    dry_run: bool, warnings: list[str]) -> GGUFResult:
    n_params = int(sum(np.prod(t.shape, dtype=np.int64) for t in source.tensors))
    planned = [PlannedTensor(t.name, list(t.shape), plan[t.name].name, tensor_nbytes(t.shape, plan[t.name]))
               for t in source.tensors]
    total = sum(p.bytes for p in planned)
    counts = dict(Counter(p.type for p in planned))
    return GGUFResult(str(source.path), None if out is None else str(out), ftype, planned, total, None, n_params,
                      total * 8 / max(n_params, 1), 0.0, matched, dry_run, warnings, counts)


def _metadata_writer(source: ModelSource, ftype: str, plan: dict[str, T], method: str, im: Imatrix | None,
                     imatrix, budget: str | None = None) -> Callable[[gguf.GGUFWriter], Any]:
    """The header's metadata: the model's (from the source), then the encoding's and the imatrix's keys."""
    def metadata(writer: gguf.GGUFWriter) -> Any:
        meta = write_source_metadata(writer, source)
        writer.add_file_type(int(file_type_of(ftype)))
        if method != "llama.cpp":
            writer.add_string("slimlm.quantize.method", method)
        if budget is not None:
            writer.add_string("slimlm.quantize.budget", budget)
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
    return metadata


def _write(out: Path, source: ModelSource, plan: dict[str, T], importance_of: Callable[[str], np.ndarray | None],
           metadata: Callable[[gguf.GGUFWriter], Any], encoder: Encoder | None, progress: Progress | None,
           overwrite: bool = True) -> None:
    """Encode and write every tensor: the plain codecs in forked workers, custom encoders in threads."""
    tensors = source.tensors

    def load(i: int) -> tuple[np.ndarray, T, np.ndarray | None]:
        t = tensors[i]
        qtype = plan[t.name]
        values = t.load()
        if tuple(values.shape) != tuple(t.shape):
            raise SlimlmError(f"{t.name}: loaded shape {values.shape} differs from the declared {t.shape}")
        importance = importance_of(t.name) if qtype not in _FLOATS else None
        return values, qtype, importance

    def parts(i: int) -> list[Callable[[], np.ndarray]] | None:
        """Tensor ``i``'s slices to encode one at a time (stacked experts without an importance vector)."""
        t = tensors[i]
        if t.parts is None or importance_of(t.name) is not None:
            return None
        return t.parts

    entries = [(t.name, tuple(t.shape), plan[t.name]) for t in tensors]
    workers = max(1, min(WORKERS, os.cpu_count() or 1))
    if encoder is None and workers > 1 and len(tensors) > 8 and fork_available():
        _write_forked(out, source.arch, metadata, entries, load, workers, progress, overwrite, parts)
    else:
        _write_threaded(out, source.arch, metadata, entries, load, encoder or _plain_encode, progress, overwrite)


Entry = tuple[str, tuple[int, ...], T]
Loader = Callable[[int], tuple[np.ndarray, T, np.ndarray | None]]


def _write_threaded(out: Path, arch: str, metadata: Callable[[gguf.GGUFWriter], Any], entries: list[Entry],
                    load: Loader, encode: Callable[..., np.ndarray], progress: Progress | None,
                    overwrite: bool = True) -> None:
    """Custom encoders (closures over Hessians, test hooks) in two threads, written in order, LOOKAHEAD ahead."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: dict[int, Future] = {}

        def fill(i: int) -> None:
            for j in range(i, min(i + LOOKAHEAD + 1, len(entries))):
                if j not in pending:
                    pending[j] = pool.submit(lambda j=j: encode(*load(j), entries[j][0]))

        def produce_ahead(i: int) -> np.ndarray:
            fill(i)
            data = pending.pop(i).result()
            fill(i + 1)  # keep the threads busy while this one is written
            if progress:
                progress(i + 1, len(entries), entries[i][0])
            return data

        fill(0)  # the first tensors encode while the metadata (tokenizer) is built and written
        try:
            write_gguf(out, arch, metadata, entries, produce_ahead, overwrite)
        finally:
            for f in pending.values():
                f.cancel()


def _write_forked(out: Path, arch: str, metadata: Callable[[gguf.GGUFWriter], Any], entries: list[Entry],
                  load: Loader, workers: int, progress: Progress | None, overwrite: bool = True,
                  parts: Callable[[int], list[Callable[[], np.ndarray]] | None] = lambda i: None) -> None:
    """The plain codecs (numpy, holding the GIL) in forked processes that load their tensor (mmap loaders
    inherited) and pwrite it at its final offset while the parent writes the metadata; tiny tensors are encoded
    in the parent. Bytes as ``write_gguf``'s. Costliest tensors first, so no process is left alone with a long one;
    those done before the header is on disk come back through the pipe. A tensor with ``parts`` (stacked experts)
    is encoded and written slice by slice once the header is on disk (blocks never cross rows, so the slices'
    bytes back to back are the whole tensor's)."""
    ctx = multiprocessing.get_context("fork")
    offsets, data_bytes = data_layout(entries)
    small = [i for i, (_, shape, _) in enumerate(entries) if int(np.prod(shape, dtype=np.int64)) < 1 << 16]
    big = sorted(set(range(len(entries))) - set(small),
                 key=lambda i: -(float(np.prod(entries[i][1], dtype=np.float64)) * _COST.get(entries[i][2], 50)))
    data_start = ctx.Value("q", -1, lock=False)  # the data section's file offset once the header is written
    ready = ctx.Event()  # set once data_start is final (or the parent gave up); until then workers hand back

    def place(fd: int, i: int, data: np.ndarray) -> None:
        name, shape, qtype = entries[i]
        if data.nbytes != tensor_nbytes(shape, qtype):
            raise RuntimeError(f"{name}: encoder returned {data.nbytes} bytes, {qtype.name} needs "
                               f"{tensor_nbytes(shape, qtype)}")
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        pos = data_start.value + offsets[i]
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n

    with atomic_path(out, overwrite) as tmp:
        def encode_parts(i: int, slices: list[Callable[[], np.ndarray]]) -> None:
            ready.wait()
            if data_start.value < 0:
                raise RuntimeError("the output header was not written")
            name, shape, qtype = entries[i]
            fd = os.open(tmp, os.O_WRONLY)
            try:
                pos = data_start.value + offsets[i]
                for k, part in enumerate(slices):
                    values = part()
                    if values.shape[-1] != shape[-1]:
                        raise SlimlmError(f"{name}: slice {k} has shape {values.shape}, rows of {shape[-1]} expected")
                    view = memoryview(np.ascontiguousarray(_plain_encode(values, qtype, None, "", threads=1))).cast("B")
                    while view:
                        n = os.pwrite(fd, view, pos)
                        view, pos = view[n:], pos + n
                if pos != data_start.value + offsets[i] + tensor_nbytes(shape, qtype):
                    raise RuntimeError(f"{name}: slices wrote {pos - data_start.value - offsets[i]} bytes, "
                                       f"{qtype.name} needs {tensor_nbytes(shape, qtype)}")
            finally:
                os.close(fd)

        def encode(i: int) -> np.ndarray | None:
            """In a worker: tensor ``i`` into the file, or its bytes when the header is not on disk yet."""
            slices = parts(i)
            if slices is not None:
                encode_parts(i, slices)
                return None
            data = _plain_encode(*load(i), "", threads=1)  # the processes are the parallelism
            if not ready.is_set():
                return data
            if data_start.value < 0:
                raise RuntimeError("the output header was not written")
            fd = os.open(tmp, os.O_WRONLY)
            try:
                place(fd, i, data)
            finally:
                os.close(fd)
            return None

        # The workers fork before the header is written (truncating tmp); they open the file only once ready.
        with ForkPool(encode, big, workers, initializer=keep_heap) as pool:
            try:
                _, data_start.value = write_gguf_header(tmp, arch, metadata, entries)
            finally:
                ready.set()  # the workers write now, or give up if data_start is still -1
            fd = os.open(tmp, os.O_WRONLY)
            try:
                order = ((i, _plain_encode(*load(i), entries[i][0], threads=1)) for i in small)
                for done, (i, data) in enumerate(itertools.chain(order, pool.results()), 1):
                    if data is not None:
                        place(fd, i, data)
                    if progress:
                        progress(done, len(entries), entries[i][0])
                os.ftruncate(fd, data_start.value + data_bytes)
            finally:
                os.close(fd)


# Rough single-thread encoding cost per value (ns) of the plain codecs, to schedule the longest tensors first.
_COST = {T.F32: 1, T.F16: 1, T.BF16: 1, T.Q8_0: 4, T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 4, T.Q5_1: 4, T.IQ4_NL: 30,
         T.Q6_K: 50, T.Q3_K: 60, T.Q5_K: 65, T.Q4_K: 65, T.Q2_K: 70, T.IQ4_XS: 130, T.IQ1_S: 900, T.IQ1_M: 1200,
         T.IQ2_S: 1300, T.IQ3_S: 1900, T.IQ2_XXS: 2000, T.IQ3_XXS: 3200, T.IQ2_XS: 4300}


def _equalize(source: ModelSource, plan: dict[str, T], importance_of: Callable[[str], np.ndarray | None],
              hessians: dict[str, np.ndarray] | None):
    """Fold searched per-channel scales into the norms (AWQ-style); adjust importances and covariances to match."""
    import dataclasses

    from slimlm.algorithms import awq
    from slimlm.algorithms.mappings import gguf_pairs

    by_name = {t.name: t for t in source.tensors}
    scales = awq.equalization_plan(lambda n: by_name[n].load(), set(by_name), plan, source.facts["n_layers"],
                                   importance_of, hessians)
    transforms = awq.apply_equalization(scales, source.facts["n_layers"])
    tensors = [t if t.name not in transforms else
               dataclasses.replace(t, load=lambda t=t, fn=transforms[t.name]: fn(t.load()), parts=None)
               for t in source.tensors]
    new_h = None if hessians is None else dict(hessians)
    cache: dict[tuple[int, int], np.ndarray] = {}
    overrides: dict[str, np.ndarray] = {}
    for pair in gguf_pairs(source.facts["n_layers"]):
        s = scales.get(pair.prev)  # the inputs of pair.linears become x / s
        if s is None:
            continue
        for name in pair.linears:
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


def _gptq_encoder(hessians: dict[str, np.ndarray], damp: float) -> Encoder:
    """GPTQ-compensated blocks for matrices with a Hessian, llama.cpp's plain encoding otherwise."""
    from slimlm.algorithms.gptq import gptq_encode

    def encode(values: np.ndarray, qtype: T, importance: np.ndarray | None, name: str) -> np.ndarray:
        h = hessians.get(name)
        if qtype in _FLOATS or h is None or values.ndim != 2 or h.shape[0] != values.shape[1]:
            return _plain_encode(values, qtype, importance, name)
        return gptq_encode(values, qtype, h, importance, damp)

    return encode


def _plain_encode(values: np.ndarray, qtype: T, importance: np.ndarray | None, name: str,
                  threads: int | None = None) -> np.ndarray:
    from slimlm.formats import ggml

    if qtype == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    return ggml.quantize(values, qtype, importance, threads=threads)
