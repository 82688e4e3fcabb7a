"""Generation speed of models on several engines: prefill and decode tokens/s, TTFT, ITL, peak RSS.

Each backend is a small class with ``load`` / ``prefill`` / ``decode`` registered by name in
``BACKENDS``; other areas add theirs with one line (``BACKENDS["w4a16"] = MyBackend``). The candidates (a model on
a backend) are all loaded, warmed up once each, then timed in ``runs`` rounds, round-robin (A B C A B C …: a load
spike hits them all, not one block), with greedy generation (prompt of ``prompt`` random ids, ``gen`` new tokens,
EOS ignored). Each figure is the median of the runs with an order-statistic interval, and the session records
whether other processes were busy meanwhile (:mod:`slimlm.evaluate.noise`).

- prefill tokens/s = batch x prompt / TTFT, TTFT = time until the first new tokens exist;
- decode tokens/s = batch x (gen - 1) / time of the gen - 1 decode steps (KV cache);
- ITL p50/p95 = percentiles of the per-step decode latency;
- peak RSS = the process's baseline before loading (``rss_before_mb``: interpreter, libraries) + what loading
  that candidate added + its largest resident-memory growth during one run (Linux /proc/self/clear_refs), so it
  covers weights + KV cache + activations of that candidate alone although the others are loaded too.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.evaluate.noise import SPREAD_LIMIT, MachineWatch, median_interval, spread
from slimlm.runtime.bench_backends import (
    Backend, NativeBackend, TorchBackend, W4A16Backend, W8A8Backend, W8A16Backend,
)
from slimlm.util.process import peak_rss_mb, reset_peak_rss

Progress = Callable[[int, int, str], None]  # (runs done, runs total, label)


class TorchFp32Backend(TorchBackend):
    name, dtype = "torch-fp32", "fp32"


class TorchBf16Backend(TorchBackend):
    name, dtype = "torch-bf16", "bf16"


class LlamaCppBackend(Backend):
    """llama.cpp through llama-cpp-python's C API: one context with a sequence per batch row.

    The low-level API is used (not ``Llama``) because batches of several sequences need
    ``n_seq_max`` > 1 and per-token sequence ids. Weight repacking (``use_extra_bufts``) is off: its AMX
    path in llama-cpp-python 0.3.36 crashes on some Xeons for quantized weights.
    """

    name = "llama.cpp"

    def load(self, model_path: Path, threads: int) -> dict[str, Any]:
        try:
            import llama_cpp
            import llama_cpp._logger as llama_logger
        except ImportError:
            raise SlimlmError("the llama.cpp backend needs llama-cpp-python: pip install 'slimlm[llama]'") from None
        if not Path(model_path).is_file():
            raise SlimlmError(f"the llama.cpp backend runs GGUF files; {model_path} is not one")
        llama_logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        self.lib, self.threads = llama_cpp, threads
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.model:
            raise SlimlmError(f"llama.cpp cannot load {model_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        self._shape: tuple[int, int] | None = None
        return {"format": "gguf", "dtype": "gguf weights"}

    def vocab_size(self) -> int:
        return self._n_vocab

    def prepare(self, batch: int, max_tokens: int) -> None:
        self._max_tokens = max_tokens

    def _ensure_context(self, batch: int, prompt_len: int) -> None:
        """A context sized for this batch (made once per batch size; reused across runs)."""
        if self._shape == (batch, prompt_len):
            return
        self._free_context()
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_seq_max = batch
        params.n_ctx = batch * max(getattr(self, "_max_tokens", 0), prompt_len + 256)
        params.kv_unified = True
        params.n_batch = batch * prompt_len
        params.n_ubatch = min(512, batch * prompt_len)
        params.n_threads = params.n_threads_batch = self.threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise SlimlmError("llama.cpp could not create a context for this batch size")
        self.prefill_batch = lib.llama_batch_init(batch * prompt_len, 0, 1)
        self.decode_batch = lib.llama_batch_init(batch, 0, 1)
        # Sequence ids and output flags never change: set them once, outside the timed runs.
        for b_ptr, per_seq in ((self.prefill_batch, prompt_len), (self.decode_batch, 1)):
            n = batch * per_seq
            for i in range(n):
                b_ptr.n_seq_id[i] = 1
                b_ptr.seq_id[i][0] = i // per_seq
            logits = np.ctypeslib.as_array(b_ptr.logits, shape=(n,))
            logits[:] = 0
            logits[per_seq - 1::per_seq] = 1  # only each sequence's last position needs logits
            b_ptr.n_tokens = n
        self._shape = (batch, prompt_len)

    def _run(self, batch_ptr: Any, tokens: np.ndarray, positions: np.ndarray, batch: int) -> np.ndarray:
        n = tokens.size
        np.ctypeslib.as_array(batch_ptr.token, shape=(n,))[:] = tokens.reshape(-1)
        np.ctypeslib.as_array(batch_ptr.pos, shape=(n,))[:] = positions.reshape(-1)
        if self.lib.llama_decode(self.ctx, batch_ptr) != 0:
            raise SlimlmError("llama.cpp decode failed")
        # One output row per sequence, in batch order: a view of llama.cpp's logits buffer, no copy.
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(batch, self._n_vocab))
        return logits.argmax(axis=1).astype(np.int64)

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        batch, plen = prompt.shape
        self._ensure_context(batch, plen)
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self._pos = plen
        positions = np.tile(np.arange(plen, dtype=np.int32), batch)
        return self._run(self.prefill_batch, prompt.astype(np.int32), positions, batch)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        batch = tokens.shape[0]
        positions = np.full(batch, self._pos, dtype=np.int32)
        self._pos += 1
        return self._run(self.decode_batch, tokens.astype(np.int32), positions, batch)

    def _free_context(self) -> None:
        if getattr(self, "ctx", None):  # also after a load that failed before making one
            self.lib.llama_batch_free(self.prefill_batch)
            self.lib.llama_batch_free(self.decode_batch)
            self.lib.llama_free(self.ctx)
        self.ctx, self._shape = None, None

    def close(self) -> None:
        self._free_context()
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None


BACKENDS: dict[str, type[Backend]] = {
    "torch-fp32": TorchFp32Backend,
    "torch-bf16": TorchBf16Backend,
    "llama.cpp": LlamaCppBackend,
    **{cls.name: cls for cls in (W8A8Backend, W8A16Backend, W4A16Backend, NativeBackend)},
    "gguf": NativeBackend,  # the runtime on a GGUF file's own types
}


def default_backends(model_path: Path) -> list[str]:
    """torch fp32 and bf16, plus llama.cpp for a GGUF file when llama-cpp-python is installed."""
    names = ["torch-fp32", "torch-bf16"]
    if Path(model_path).is_file() and _llama_cpp_available():
        names.append("llama.cpp")
    return names


@dataclass(frozen=True)
class Candidate:
    """One thing to time: a model file or dir on one backend, under a label for the rows."""

    label: str
    path: Path
    backend: str


def bench(model: str | Path, *, prompt: int = 512, gen: int = 128, batches: tuple[int, ...] | list[int] = (1, 8),
          threads: int | None = None, backends: list[str] | None = None, runs: int = 6, warmup: int = 1,
          seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every (backend, batch) of one model; the result's ``rows`` hold one dict of figures per pair."""
    model_path = Path(model).expanduser()
    if not model_path.exists():
        raise SlimlmError(f"{model_path} does not exist")
    names = backends or default_backends(model_path)
    return {"model": str(model_path), **measure([Candidate(n, model_path, n) for n in names], prompt=prompt,
                                                 gen=gen, batches=batches, threads=threads, runs=runs,
                                                 warmup=warmup, seed=seed, progress=progress)}


def measure(candidates: list[Candidate], *, prompt: int, gen: int, batches: tuple[int, ...] | list[int] = (1,),
            threads: int | None = None, runs: int = 6, warmup: int = 1, seed: int = 0,
            progress: Progress | None = None, skip_failed: bool = False) -> dict[str, Any]:
    """Time ``candidates`` round-robin (A B C A B C …, after one warm-up each), so a change in the machine's load
    hits all of them alike; rows (per candidate, then batch) give each figure's median and its interval
    (:mod:`slimlm.evaluate.noise`), and ``machine`` says whether the machine was busy meanwhile.

    All candidates stay loaded together, so a row's peak RSS is rebuilt from its own parts: the process's
    baseline before any load + what loading this candidate added + its largest growth during one of its runs.
    ``skip_failed``: a candidate that cannot load (a SlimlmError) is listed under ``failed`` instead of raising.
    """
    if prompt < 1 or gen < 2:
        raise SlimlmError("--prompt must be at least 1 and --gen at least 2 (one prefill token + decode steps)")
    if runs < 1 or not batches or any(b < 1 for b in batches):
        raise SlimlmError("--runs and every --batch size must be at least 1")
    threads = threads or os.cpu_count() or 1
    unknown = [c.backend for c in candidates if c.backend not in BACKENDS]
    if unknown:
        raise SlimlmError(f"unknown backend {unknown[0]!r}; available: {', '.join(BACKENDS)}")
    total = len(candidates) * len(batches) * (runs + warmup)
    tick = progress or (lambda _d, _t, _l: None)
    base_rss = reset_peak_rss()
    loaded: list[tuple[Candidate, Backend, dict[str, Any], float]] = []
    failed: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    watch = MachineWatch()
    try:
        for c in candidates:
            tick(0, total, f"loading {c.label}")
            before = reset_peak_rss()
            backend = BACKENDS[c.backend]()
            try:
                facts = backend.load(c.path, threads)
            except SlimlmError as exc:
                backend.close()
                if not skip_failed:
                    raise
                failed.append({"name": c.label, "reason": str(exc)})
                continue
            loaded.append((c, backend, facts, max(0.0, reset_peak_rss() - before)))
        total = len(loaded) * len(batches) * (runs + warmup)
        with watch:
            per_batch = [_rounds(loaded, batch, prompt, gen, runs, warmup, seed, tick, total, k)
                         for k, batch in enumerate(batches)]
        for i, (c, _backend, facts, load_mb) in enumerate(loaded):
            for batch, (samples, growth) in zip(batches, per_batch):
                rows.append({"backend": c.backend, "label": c.label, **facts, "batch": batch, "prompt": prompt,
                             "gen": gen, **_figures(samples[i]), "peak_rss_mb": base_rss + load_mb + growth[i],
                             "rss_before_mb": base_rss, "runs": runs, "threads": threads})
    finally:
        for _c, backend, _f, _m in loaded:
            backend.close()
        gc.collect()
    tick(total, total, "done")
    return {"threads": threads, "rows": rows, "machine": watch.load.to_dict() if loaded else None,
            "order": "round-robin",
            "interval": "order-statistic interval of the median (binomial; >= 95% from 6 runs, below that "
                        "[min, max] at the coverage given per row)", "failed": failed}


def _rounds(loaded: list, batch: int, prompt: int, gen: int, runs: int, warmup: int, seed: int,
            tick: Callable[[int, int, str], None], total: int, k: int) -> tuple[list[list[dict]], list[float]]:
    """Warm-ups, then ``runs`` rounds over all candidates at one batch size: each candidate's samples and the
    largest RSS growth during any one of its runs."""
    n = len(loaded)
    done = k * n * (runs + warmup)
    samples: list[list[dict]] = [[] for _ in loaded]
    growth = [0.0] * n
    prompts = []
    for _c, backend, _f, _m in loaded:
        rng = np.random.default_rng(seed)
        vocab = backend.vocab_size()
        prompts.append(rng.integers(low=min(100, vocab - 1), high=vocab, size=(batch, prompt), dtype=np.int64))
        backend.prepare(batch, prompt + gen)
    for r in range(warmup + runs):
        step = "warm-up" if r < warmup else f"round {r - warmup + 1}/{runs}"
        for i, (c, backend, _f, _m) in enumerate(loaded):
            tick(done, total, f"{step}: {c.label}" + (f" batch {batch}" if batch > 1 else ""))
            start_rss = reset_peak_rss()
            sample = _one_run(backend, prompts[i], gen if r >= warmup else min(gen, 8))
            growth[i] = max(growth[i], peak_rss_mb() - start_rss)
            if r >= warmup:
                samples[i].append(sample)
            done += 1
    return samples, growth


def _one_run(backend: Backend, ids: np.ndarray, gen: int) -> dict[str, Any]:
    batch = ids.shape[0]
    start = time.perf_counter()
    tokens = backend.prefill(ids)
    ttft = time.perf_counter() - start
    steps = []
    for _ in range(gen - 1):  # sequential by nature: each step needs the previous token
        t0 = time.perf_counter()
        tokens = backend.decode(tokens)
        steps.append(time.perf_counter() - t0)
    return {"ttft": ttft, "steps": steps, "batch": batch, "prompt": ids.shape[1]}


def _figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs, its interval, and whether the runs disagree too much to rank on."""
    batch, prompt = samples[0]["batch"], samples[0]["prompt"]
    per_run = {
        "prefill_tok_s": [batch * prompt / s["ttft"] for s in samples],
        "decode_tok_s": [batch * len(s["steps"]) / sum(s["steps"]) for s in samples],
        "ttft_ms": [1000 * s["ttft"] for s in samples],
        "itl_p50_ms": [1000 * float(np.percentile(s["steps"], 50)) for s in samples],
        "itl_p95_ms": [1000 * float(np.percentile(s["steps"], 95)) for s in samples],
    }
    out: dict[str, Any] = {}
    intervals, coverage = {}, 0.0
    for key, values in per_run.items():
        out[key], low, high, coverage = median_interval(values)
        intervals[key] = [low, high]
    widest = max(spread(*intervals[k], out[k]) for k in ("prefill_tok_s", "decode_tok_s"))
    return {**out, "intervals": intervals, "interval_coverage": coverage, "spread": widest,
            "unstable": widest > SPREAD_LIMIT}


def _llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


__all__ = ["BACKENDS", "Backend", "Candidate", "LlamaCppBackend", "TorchBackend", "bench", "default_backends", "measure"]
