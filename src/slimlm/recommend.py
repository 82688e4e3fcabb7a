"""Choose a variant for a device and goal from measurements made on this machine.

Candidates that fit the memory budget (`fit`'s model) are made and scored (`eval` KLD against one saved
reference), then timed together round-robin in one `bench` session (medians with intervals, busy-machine watch),
within a time budget; quality and speed are cached apart, by model fingerprint + variant + settings. The pick per
goal goes by the goal's figure, but candidates whose intervals overlap are *tied* on it and the next figure
decides between them (:data:`CRITERIA`), so noise never passes for a finding.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from slimlm.errors import SlimlmError
from slimlm.evaluate.noise import BUSY_NOTE, SPREAD_LIMIT, overlaps, spread
from slimlm.inspect.fit import format_bytes, parse_memory
from slimlm.writers.atomic import Claim, atomic_path

GOALS = ("throughput", "latency", "quality", "size")
Progress = Callable[[str], None]  # one line per stage
Steps = Callable[[int, int, str], None]  # (done, total, what): progress within a stage


@dataclass(frozen=True)
class Variant:
    """One way to run the model: how to make it, how to size it, which engine benchmarks it."""

    name: str
    kind: str  # "original" | "bf16" | "gguf" | "budget" (a GGUF budget mix) | "compressed-tensors" | "student"
    memory_variant: str | None  # name in slimlm.inspect.memory.VARIANTS (None: size from the files)
    quant: str | None = None  # GGUF mix or compressed-tensors scheme
    method: str | None = None
    backend: str = "torch-fp32"
    path: str | None = None  # students: their own dir
    fit: tuple[int, int, int] | None = None  # budget mixes: (memory bytes, context, batch) the file is made to fit

    def settings(self) -> dict[str, Any]:
        return asdict(self)


def default_variants(llama_cpp: bool) -> list[Variant]:
    """The candidate set a user of llama.cpp, vLLM and transformers would weigh."""
    from slimlm.quantize.schemes import W4A16Config as W4, W8A8Config as W8

    gguf_engine = "llama.cpp" if llama_cpp else "gguf"
    return [
        Variant("FP32 (original)", "original", "F32", backend="torch-fp32"),
        Variant("BF16", "bf16", "BF16", backend="torch-bf16"),
        Variant("W8A8 SmoothQuant", "compressed-tensors", "W8A8", W8.name, W8.default_method, backend="native"),
        Variant("W4A16 AWQ", "compressed-tensors", "W4A16", W4.name, W4.default_method, backend="native"),
        Variant("Q8_0", "gguf", "Q8_0", "Q8_0", backend=gguf_engine),
        Variant("Q6_K", "gguf", "Q6_K", "Q6_K", backend=gguf_engine),
        Variant("Q4_K_M", "gguf", "Q4_K_M", "Q4_K_M", backend=gguf_engine),
        Variant("Q3_K_M", "gguf", "Q3_K_M", "Q3_K_M", backend=gguf_engine),
        Variant("Q2_K", "gguf", "Q2_K", "Q2_K", backend=gguf_engine),
    ]


ENGINES = ("slimlm", "llama.cpp", "vllm")


def engine_variants(engine: str | None, llama_cpp: bool) -> list[Variant]:
    """The candidates measured on ``engine``: None mixes engines (GGUF on llama.cpp when installed, the rest on
    slimlm's runtime); slimlm runs every variant on its own runtime; llama.cpp runs the GGUF mixes; vllm runs
    BF16, W8A8 and W4A16 (the compressed-tensors it serves)."""
    if engine is None:
        return default_variants(llama_cpp)
    if engine not in ENGINES:
        raise SlimlmError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "slimlm":
        return default_variants(False)
    if engine == "llama.cpp":
        if not llama_cpp:
            raise SlimlmError("--engine llama.cpp needs llama-cpp-python: pip install 'slimlm[llama]'")
        return [v for v in default_variants(True) if v.backend == "llama.cpp"]
    from slimlm.runtime.vllm_engine import vllm_python

    vllm_python()  # says how to get vLLM before anything is made
    return [replace(v, backend="vllm") for v in default_variants(False) if v.kind in ("bf16", "compressed-tensors")]


def engine_version(engine: str | None, llama_cpp: bool = False) -> str:
    """What the report names: the engine and its version."""
    import slimlm

    if engine == "vllm":
        from slimlm.runtime.vllm_engine import version

        return f"vLLM {version()}"
    if engine == "llama.cpp":
        import importlib.metadata

        return f"llama.cpp (llama-cpp-python {importlib.metadata.version('llama-cpp-python')})"
    return f"slimlm {slimlm.__version__}" + (" + llama.cpp for GGUF" if engine is None and llama_cpp else "")


@dataclass
class Settings:
    """Everything that changes a measurement; part of every cache key."""

    data: str
    calib: str | None
    calib_samples: int = 16
    chunks: int = 4
    ctx: int = 512
    prompt: int = 128
    gen: int = 32
    batch: int = 1
    runs: int = 6
    threads: int | None = None


QUALITY_SETTINGS = ("data", "calib", "calib_samples", "chunks", "ctx")  # the rest only changes speed figures


@dataclass
class Recommendation:
    model: str
    fingerprint: str
    goal: str
    memory_bytes: int
    context: int
    batch: int
    max_kld: float
    choice: str | None
    why: str
    tied: list[str] = field(default_factory=list)  # names tied with the choice on the goal's first figure
    tie: str = ""  # which candidates were tied (overlapping intervals) and what decided
    lead: dict[str, Any] | None = None  # the choice's lead over the runner-up on the goal's figure
    machine: dict[str, Any] = field(default_factory=dict)  # busy machine while timing? (noise.MachineWatch)
    measured: list[dict[str, Any]] = field(default_factory=list)
    pareto: list[str] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    engine: str = ""  # the engine the speed figures come from, with its version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_fingerprint(model: Path) -> str:
    """Hashes the JSON files, each weight file's size and 64 KiB at 16 evenly spaced offsets: milliseconds instead
    of hashing tens of GB (a deliberate trade: an in-place edit of a few bytes could slip by)."""
    h = hashlib.sha256()
    files = sorted(p for p in (model.iterdir() if model.is_dir() else [model])
                   if p.suffix in (".safetensors", ".gguf", ".json") and p.is_file())
    if not files:
        raise SlimlmError(f"{model} holds no config.json, .safetensors or .gguf file to measure")
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            if path.suffix == ".json":
                h.update(f.read(1 << 20))
                continue
            for i in range(16):
                f.seek(max(0, (size - 65536) * i // 15))
                h.update(f.read(65536))
    return h.hexdigest()[:16]


# Part of every quality cache key: a change to how variants are scored retires the figures cached before it.
# 2: W8A8 files scored with their activation quantization (before: the weights alone, i.e. as W8A16).
QUALITY_VERSION = 2


class ResultCache:
    """JSON files under cache_dir/recommend/<fingerprint>/, one per (variant, settings)."""

    def __init__(self, root: Path, fingerprint: str):
        self.dir = root / "recommend" / fingerprint
        self.files = self.dir / "files"
        self.files.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with atomic_path(self.dir / f"{key}.json", wait=True) as tmp:  # concurrent runs: the last complete one
            tmp.write_text(json.dumps(value, indent=1, default=str))


def _file_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return path.stat().st_size


def _make(variant: Variant, model: Path, cache: ResultCache, settings: Settings) -> tuple[Path, float]:
    """Produce the variant's files (cached); return its path and the seconds it took to make."""
    start = time.perf_counter()
    if variant.kind in ("original", "bf16"):
        return model, 0.0
    if variant.kind == "student":
        return Path(variant.path or ""), 0.0
    key = cache.key("file", variant.settings(), settings.calib, settings.calib_samples)
    gguf = variant.kind in ("gguf", "budget")
    out = cache.files / (f"{key}.gguf" if gguf else key)
    with Claim(out, wait=True):  # a concurrent run making the same file: wait for it, then use its file
        if variant.kind == "gguf" and not out.is_file():
            from slimlm.quantize.gguf import quantize_gguf

            quantize_gguf(model, variant.quant or "", out)
        elif variant.kind == "budget" and not out.is_file():
            _make_budget_mix(variant, model, out, settings)
        elif not gguf and not (out / "config.json").is_file():
            from slimlm.quantize.layers import quantize_model
            from slimlm.quantize.schemes import get_scheme

            quantize_model(model, out, scheme=get_scheme(variant.quant or "w4a16"), method=variant.method,
                           calib=settings.calib, samples=settings.calib_samples, overwrite=True)
    return out, time.perf_counter() - start


def _make_budget_mix(variant: Variant, model: Path, out: Path, settings: Settings) -> None:
    """The GGUF budget mix that fits ``variant.fit`` (quantize --fit), measured on the calibration text when it is
    a file, else on wikitext-2 valid (a dataset name or self-generated text has no windows to measure on)."""
    from slimlm import resources
    from slimlm.quantize.budget import Budget
    from slimlm.quantize.gguf import quantize_gguf

    memory, context, batch = variant.fit
    given = Path(settings.calib) if settings.calib else None
    calib = given if given is not None and given.is_file() else resources.wikitext_path("valid")
    quantize_gguf(model, None, out, calib=calib, calib_chunks=settings.calib_samples,
                  budget=Budget(fit_memory=memory, context=context, batch=batch))


def budget_variant(memory: int, context: int, batch: int, backend: str) -> Variant:
    """The GGUF budget mix made for exactly this memory, context and batch (recommend --budget-mix)."""
    return Variant("budget mix", "budget", None, "budget", backend=backend, fit=(memory, context, batch))


def _quality(variant: Variant, path: Path, ref_file: Path, settings: Settings, steps: Steps | None,
             tokenizer: Path | None = None) -> dict[str, Any]:
    """KLD, top-1 and perplexity of one variant against the saved reference (deterministic: cached for good).
    ``tokenizer``: the original's, so a GGUF variant is scored on the reference's own token ids."""
    from slimlm.evaluate import evaluate

    start = time.perf_counter()
    dtype = "bf16" if variant.kind == "bf16" else "fp32"
    tick = (lambda d, t: steps(d, t, f"scoring {variant.name}")) if steps else None
    quality = evaluate(path, settings.data, ref=ref_file, ctx=settings.ctx, chunks=settings.chunks, dtype=dtype,
                       tokenizer=tokenizer, progress=tick)
    kld = quality["kld"]
    return {"kld_mean": kld["kld_mean"], "kld_p99": kld["kld_p99"], "top1": kld["top1_agreement"],
            "ppl": quality["perplexity"]["ppl"], "ppl_err": quality["perplexity"]["ppl_stderr"],
            "quality_seconds": time.perf_counter() - start}


SPEED_FIGURES = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_p50_ms", "itl_p95_ms", "peak_rss_mb", "intervals",
                 "interval_coverage", "spread", "unstable")


def _speed_vllm(todo: list[tuple[Variant, Path]], settings: Settings, say: Progress) -> dict[str, dict[str, Any]]:
    """The variants on vLLM's server, round-robin, ``settings.batch`` concurrent streams. Throughput there is
    requests served under load: ``prefill_tok_s`` is prompt tokens served per second (prompt x requests/s),
    ``decode_tok_s`` output tokens per second, both over all streams; ``ttft_ms`` and ITL are per request."""
    from slimlm.evaluate.vllm_bench import Target, serve_bench

    started = time.perf_counter()
    session = serve_bench([Target(v.name, path) for v, path in todo], concurrency=(settings.batch,),
                          prompt=settings.prompt, gen=settings.gen, runs=settings.runs, progress=say)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = {}
    for r in session["rows"]:
        iv = r["intervals"]
        figures = {"prefill_tok_s": settings.prompt * r["requests_per_s"], "decode_tok_s": r["output_tok_s"],
                   "ttft_ms": r["ttft_p50_ms"], "itl_p50_ms": r["itl_p50_ms"], "itl_p95_ms": r["itl_p95_ms"],
                   "peak_rss_mb": r["peak_rss_mb"], "interval_coverage": r["interval_coverage"],
                   "intervals": {"prefill_tok_s": [settings.prompt * x for x in iv["requests_per_s"]],
                                 "decode_tok_s": iv["output_tok_s"], "ttft_ms": iv["ttft_p50_ms"],
                                 "itl_p50_ms": iv["itl_p50_ms"], "itl_p95_ms": iv["itl_p95_ms"]}}
        widest = max(spread(*figures["intervals"][k], figures[k]) for k in ("prefill_tok_s", "decode_tok_s"))
        out[r["label"]] = {**figures, "spread": widest, "unstable": widest > SPREAD_LIMIT, "engine": "vllm",
                           "speed_session": {"at": stamp, "candidates": len(todo),
                                             "seconds": time.perf_counter() - started, "machine": session["machine"]}}
    return out


def _speed(todo: list[tuple[Variant, Path]], settings: Settings, steps: Steps | None,
           say: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Time the variants together, round-robin, in one session; name -> its figures and the session's machine
    load. A variant whose engine cannot load it is left out (the caller lists it as skipped)."""
    from slimlm.evaluate.bench import Candidate, measure

    if todo and all(v.backend == "vllm" for v, _ in todo):
        return _speed_vllm(todo, settings, say or (lambda _m: None))
    started = time.perf_counter()
    session = measure([Candidate(v.name, path, v.backend) for v, path in todo], prompt=settings.prompt,
                      gen=settings.gen, batches=(settings.batch,), threads=settings.threads, runs=settings.runs,
                      progress=steps, skip_failed=True)
    seconds = time.perf_counter() - started
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = {row["label"]: {**{k: row[k] for k in SPEED_FIGURES}, "engine": row["backend"],
                          "speed_session": {"at": stamp, "candidates": len(todo), "seconds": seconds,
                                            "machine": session["machine"]}}
           for row in session["rows"]}
    for f in session["failed"]:
        out[f["name"]] = {"error": f["reason"]}
    return out


def _check_text(data: Path, calib: str | None) -> None:
    """Bad --data or --calib text is refused before anything is made or measured (not met variant by variant)."""
    from slimlm.data.calibration import check_text_path, read_text_file
    from slimlm.data.text import read_text

    read_text(data)
    path = Path(calib) if calib else None
    if path is not None and (path.exists() or path.suffix or "/" in str(calib)):
        check_text_path(path, "calibration file")
        if not read_text_file(path).strip():
            raise SlimlmError(f"calibration file {path} is empty")


def pareto_front(rows: list[dict[str, Any]], speed_key: str) -> list[str]:
    """Names not dominated on (lower KLD, lower memory, higher speed)."""
    front = []
    for a in rows:
        dominated = any(
            b is not a and b["kld_mean"] <= a["kld_mean"] and b["memory_bytes"] <= a["memory_bytes"]
            and b[speed_key] >= a[speed_key]
            and (b["kld_mean"] < a["kld_mean"] or b["memory_bytes"] < a["memory_bytes"] or b[speed_key] > a[speed_key])
            for b in rows)
        if not dominated:
            front.append(a["name"])
    return front


SPEED_KEY = {"throughput": "prefill_tok_s", "latency": "decode_tok_s", "quality": "decode_tok_s",
             "size": "decode_tok_s"}

# goal -> what decides, in order: (figure, higher is better). A speed figure with an interval only decides when
# the best one's interval does not overlap the others'; candidates that overlap are tied and the next figure
# decides among them.
CRITERIA = {
    "throughput": (("prefill_tok_s", True), ("kld_mean", False), ("memory_bytes", False)),
    "latency": (("itl_p50_ms", False), ("kld_mean", False), ("memory_bytes", False)),
    "quality": (("kld_mean", False), ("memory_bytes", False)),
    "size": (("memory_bytes", False), ("kld_mean", False)),
}
LABEL = {"prefill_tok_s": "prefill tok/s", "itl_p50_ms": "ITL p50", "kld_mean": "KLD", "memory_bytes": "memory"}

ABSURD_KLD = 5.0  # nats: no working quantization is this far from its reference; the file or its eval is broken


def absurd(row: dict[str, Any]) -> bool:
    """A measured KLD that says the variant is broken (or not a number at all): flagged, never chosen."""
    return not row["kld_mean"] <= ABSURD_KLD


def interval(row: dict[str, Any], key: str) -> tuple[float, float]:
    """A figure's interval (low, high); a figure measured without one is its own point."""
    low, high = row.get("intervals", {}).get(key, (row[key], row[key]))
    return float(low), float(high)


def choose(rows: list[dict[str, Any]], goal: str, max_kld: float
           ) -> tuple[dict[str, Any] | None, str, list[str]]:
    """The pick for ``goal`` among measured rows that fit; a note (why nothing was picked, or which candidates
    were tied on which figure, by overlapping intervals, and what decided); the names tied with the pick.
    Rows with an absurd KLD are never chosen."""
    usable = contenders(rows, goal, max_kld)
    if not usable:
        return None, "no measured variant that fits stays under the KLD limit", []
    pool, notes, tied_names = usable, [], []
    for key, higher in CRITERIA.get(goal, CRITERIA["quality"]):
        best = (max if higher else min)(pool, key=lambda r: r[key])
        tied = [r for r in pool if r is best or overlaps(interval(r, key), interval(best, key))]
        if len(tied) == 1:
            if notes:
                notes.append(f"{best['name']} chosen by {LABEL.get(key, key)}")
            return best, "; ".join(notes), tied_names
        tied_names = tied_names or [r["name"] for r in tied]
        notes.append(f"tied on {LABEL.get(key, key)} (intervals overlap): "
                     + ", ".join(r["name"] for r in sorted(tied, key=lambda r: r is not best)))
        pool = tied
    best = pool[0]
    notes.append(f"{best['name']} chosen as the first of the tied")
    return best, "; ".join(notes), tied_names


def contenders(rows: list[dict[str, Any]], goal: str, max_kld: float) -> list[dict[str, Any]]:
    """The rows ``goal`` may pick from: never an absurd KLD, and for the speed and size goals none above
    ``max_kld`` (so a runner-up is always a variant that could have been picked)."""
    rows = [r for r in rows if not absurd(r)]
    return rows if goal == "quality" else [r for r in rows if r["kld_mean"] <= max_kld]


def lead(best: dict[str, Any], rows: list[dict[str, Any]], key: str, higher: bool) -> dict[str, Any] | None:
    """How far ``best`` is ahead of the runner-up on ``key``: the difference's interval, from the two intervals."""
    others = [r for r in rows if r is not best]
    if not others:
        return None
    runner = (max if higher else min)(others, key=lambda r: r[key])
    (bl, bh), (rl, rh) = interval(best, key), interval(runner, key)
    low, high = (bl - rh, bh - rl) if higher else (rl - bh, rh - bl)
    return {"runner_up": runner["name"], "figure": key, "difference": best[key] - runner[key] if higher
            else runner[key] - best[key], "interval": [low, high], "ratio": (best[key] / runner[key] if higher
                                                                             else runner[key] / best[key])}


def _why(best: dict[str, Any], rows: list[dict[str, Any]], rivals: list[dict[str, Any]], goal: str, budget: int,
         tie: str) -> str:
    """The pick's reason; speed goals compare it with BF16 (or the original), else with the runner-up among
    ``rivals`` (:func:`contenders`)."""
    fit_text = f"fits {format_bytes(budget)} with {format_bytes(budget - best['memory_bytes'])} headroom"
    quality = f"KLD {best['kld_mean']:.4f}, top-1 {100 * best['top1']:.1f}%"
    tie_text = f" ({tie})" if tie else ""
    cover = f"{best['interval_coverage']:.0%}" if "interval_coverage" in best else "no"
    if goal == "throughput":
        lo, hi = interval(best, "prefill_tok_s")
        return (f"{best['name']}: {best['prefill_tok_s']:.0f} prefill tok/s ({cover} interval {lo:.0f}–{hi:.0f})"
                f"{_against(best, rows, rivals, 'prefill_tok_s', True, '')} at {quality}; {fit_text}{tie_text}")
    if goal == "latency":
        lo, hi = interval(best, "itl_p50_ms")
        return (f"{best['name']}: {best['itl_p50_ms']:.1f} ms per token (p50; {cover} interval {lo:.1f}–{hi:.1f})"
                f"{_against(best, rows, rivals, 'itl_p50_ms', False, ' faster than')} at {quality}; "
                f"{fit_text}{tie_text}")
    if goal == "size":
        return (f"{best['name']}: the smallest that stays under the KLD limit, "
                f"{format_bytes(best['memory_bytes'])} in memory at {quality}; {fit_text}{tie_text}")
    return f"{best['name']}: the lowest KLD among the variants that fit ({quality}); {fit_text}{tie_text}"


def _against(best: dict[str, Any], rows: list[dict[str, Any]], rivals: list[dict[str, Any]], key: str,
             higher: bool, verb: str) -> str:
    """", 1.43x BF16," against the unquantized baseline when it was measured; when it does not fit the device
    or is the pick itself, against the runner-up on the same figure; nothing when the pick was the only one."""
    base = next((r for r in rows if r["name"] == "BF16"), None) or next(
        (r for r in rows if r.get("kind") == "original"), None)
    label = base["name"] if base is not None else ""
    if base is None or base is best:
        runner = lead(best, rivals, key, higher)
        if runner is None:
            return ""
        base = next(r for r in rivals if r["name"] == runner["runner_up"])
        label = f"{base['name']} (the runner-up{'' if label else '; BF16 and the original do not fit'})"
    ratio = best[key] / base[key] if higher else base[key] / best[key]
    return f", {ratio:.2f}x{verb} {label},"


def machine_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Were any of these rows' speed figures measured on a busy machine? (rows may come from several sessions)"""
    sessions = {json.dumps(r["speed_session"], sort_keys=True, default=str): r["speed_session"] for r in rows
                if r.get("speed_session")}
    busy = [s for s in sessions.values() if (s.get("machine") or {}).get("busy")]
    reasons = sorted({reason for s in busy for reason in s["machine"]["reasons"]})
    unstable = [r["name"] for r in rows if r.get("unstable")]
    return {"busy": bool(busy), "reasons": reasons, "sessions": len(sessions), "unstable": unstable,
            "note": BUSY_NOTE if busy else ""}


def _budget_row(sizing: dict[str, Any], memory: int, tensor_bytes: int | None = None) -> dict[str, Any]:
    """fit's row for the budget mix: its tensor data (or, before it is made, the whole allowance) + the KV cache
    and overhead every variant shares."""
    from slimlm.inspect.fit import fit_row

    mix, shared = sizing["budget_mix"], sizing["variants"][0]
    weights = mix["weights_bytes"] if tensor_bytes is None else tensor_bytes
    row = fit_row("budget mix", mix["bits_per_weight"], weights, shared["kv_cache_bytes"], shared["overhead_bytes"],
                  None, None, memory)
    row["fits"] = row["fits"] and mix["weights_bytes"] >= mix["smallest_bytes"]
    return row


def recommend(model: str | Path, *, memory: str | int, goal: str = "throughput", context: int = 4096,
              batch: int = 1, budget_minutes: float | None = None, calib: str | Path | None = None,
              data: str | Path | None = None, students: list[str | Path] = (), variants: list[Variant] | None = None,
              max_kld: float = 0.1, chunks: int = 4, calib_samples: int = 16, prompt: int = 128, gen: int = 32, runs: int = 6,
              threads: int | None = None, cache_dir: str | Path | None = None, engine: str | None = None,
              budget_mix: bool = False, progress: Progress | None = None, steps: Steps | None = None
              ) -> Recommendation:
    """Measure the variants of ``model`` that fit ``memory`` and pick the one that best serves ``goal``.
    ``budget_mix`` adds the GGUF mix made to fit ``memory`` at ``context`` x ``batch`` (quantize --fit)."""
    from slimlm import resources
    from slimlm.evaluate import evaluate
    from slimlm.evaluate.bench import _llama_cpp_available
    from slimlm.inspect.fit import fit

    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    if goal not in GOALS:
        raise SlimlmError(f"unknown goal {goal!r}; choose one of: {', '.join(GOALS)}")
    model = Path(model).expanduser()
    if not model.exists():
        raise SlimlmError(f"{model} does not exist")
    if not (model / "config.json").is_file():
        raise SlimlmError(f"{model} is not a Hugging Face model dir: recommend makes its variants from one")
    budget = parse_memory(memory) if isinstance(memory, str) else int(memory)
    data = Path(data) if data else resources.wikitext_path("test")
    calib = str(calib) if calib else None
    _check_text(data, calib)
    settings = Settings(data=str(data), calib=calib, calib_samples=calib_samples, chunks=chunks, prompt=prompt,
                        gen=gen, batch=batch, runs=runs, threads=threads)
    fingerprint = model_fingerprint(model)
    cache = ResultCache(Path(cache_dir) if cache_dir else resources.cache_dir(), fingerprint)
    llama_cpp = not os.environ.get("SLIMLM_NO_LLAMA_CPP") and _llama_cpp_available()
    candidates = list(variants or engine_variants(engine, llama_cpp))
    for s in students:
        candidates.append(Variant(f"student {Path(s).name}", "student", None, backend="torch-fp32", path=str(s)))
    if budget_mix:
        if engine == "vllm":
            raise SlimlmError("--budget-mix makes a GGUF file, which vLLM does not run; use --engine llama.cpp "
                              "or slimlm")
        candidates.append(budget_variant(budget, context, batch, "llama.cpp" if llama_cpp and engine != "slimlm"
                                         else "gguf"))

    sizing = fit(model, budget, context=context, batch=batch,
                 variants=[v.memory_variant for v in candidates if v.memory_variant])
    need = {r["variant"]: r for r in sizing["variants"]}
    memory_rows, fitting, excluded = [], [], []
    for v in candidates:
        if v.kind == "budget":  # made to fit: until it is made, it takes the whole allowance
            row = _budget_row(sizing, budget)
        elif v.memory_variant is None:  # a student: size it with its own spec
            row = fit(v.path, budget, context=context, batch=batch, variants=["F32"])["variants"][0]
        else:
            row = need[v.memory_variant]
        memory_rows.append({"name": v.name, **row})
        (fitting if row["fits"] else excluded).append((v, row))
    if not fitting:
        smallest = min(memory_rows, key=lambda r: r["total_bytes"])
        raise SlimlmError(f"nothing fits {format_bytes(budget)} at context {context} x batch {batch}: the smallest "
                          f"variant, {smallest['name']}, needs {format_bytes(smallest['total_bytes'])}")

    ref_key = cache.key("ref", str(data), settings.ctx, settings.chunks)
    ref_file = cache.dir / f"ref-{ref_key}.safetensors"
    with Claim(ref_file, wait=True):  # a concurrent run scoring it: wait, then use its reference
        reference = cache.get(f"ref-{ref_key}")
        if reference is None or not ref_file.is_file():
            say(f"reference: scoring the original once ({settings.chunks} windows of {settings.ctx} tokens)")
            tick = (lambda d, t: steps(d, t, "scoring the original")) if steps else None
            report = evaluate(model, data, ctx=settings.ctx, chunks=settings.chunks, save_ref=ref_file,
                              overwrite=True, progress=tick)
            reference = {"ppl": report["perplexity"]["ppl"], "ppl_err": report["perplexity"]["ppl_stderr"],
                         "chunks": report["chunks"], "ref_file": str(ref_file)}
            cache.put(f"ref-{ref_key}", reference)

    deadline = started + budget_minutes * 60 if budget_minutes else None
    quality_settings = {k: v for k, v in asdict(settings).items() if k in QUALITY_SETTINGS}
    speed_settings = {k: v for k, v in asdict(settings).items() if k not in QUALITY_SETTINGS}
    rows, skipped, todo = [], [], []
    for i, (v, mem) in enumerate(fitting):
        key = cache.key("quality", QUALITY_VERSION, v.settings(), quality_settings, ref_key)
        hit = cache.get(key)
        speed = cache.get(cache.key("speed", v.settings(), speed_settings))
        cached = hit is not None and speed is not None
        if hit is None:
            if deadline is not None and time.perf_counter() > deadline:
                skipped.append({"name": v.name, "reason": "time budget used up"})
                continue
            say(f"[{i + 1}/{len(fitting)}] {v.name}: making")
            try:
                path, make_seconds = _make(v, model, cache, settings)
                say(f"[{i + 1}/{len(fitting)}] {v.name}: scoring {settings.chunks} windows")
                hit = {"file_bytes": _file_bytes(path), "make_seconds": make_seconds,
                       **_quality(v, path, ref_file, settings, steps,
                                    model if v.kind in ("gguf", "budget") else None)}
            except SlimlmError as exc:
                skipped.append({"name": v.name, "reason": str(exc)})
                continue
            if v.kind == "budget":
                from slimlm.checkpoint.gguf_file import read_gguf

                hit["weights_bytes"] = sum(t.nbytes for t in read_gguf(path)[0])  # tensor data, as fit counts
            cache.put(key, hit)
        if v.kind == "budget":  # sized by the file it became
            mem = _budget_row(sizing, budget, hit["weights_bytes"])
            next(r for r in memory_rows if r["name"] == v.name).update(mem)
        row = {"name": v.name, "kind": v.kind, "quant": v.quant, "method": v.method, "cached": cached,
               "memory_bytes": mem["total_bytes"], "headroom_bytes": mem["headroom_bytes"], **hit, **(speed or {})}
        if speed is None:
            todo.append((v, row))
        rows.append(row)
    if todo and deadline is not None and time.perf_counter() > deadline:
        skipped += [{"name": v.name, "reason": "time budget used up before timing it"} for v, _ in todo]
        rows = [r for r in rows if all(r is not t for _, t in todo)]
    elif todo:
        say(f"timing {len(todo)} variants together, round-robin: {settings.runs} rounds of prompt {settings.prompt} "
            f"+ {settings.gen} new tokens")
        timed = _speed([(v, _make(v, model, cache, settings)[0]) for v, _ in todo], settings, steps, say)
        for v, row in todo:
            figures = timed.get(v.name) or {"error": "not timed"}
            if "error" in figures:
                skipped.append({"name": v.name, "reason": figures["error"]})
                rows.remove(row)
                continue
            cache.put(cache.key("speed", v.settings(), speed_settings), figures)
            row.update(figures)
    if not rows:
        raise SlimlmError("nothing could be measured: skipped "
                          + "; ".join(f"{s['name']} ({s['reason']})" for s in skipped))

    best, note, tied = choose(rows, goal, max_kld)
    rivals = contenders(rows, goal, max_kld)
    why = _why(best, rows, rivals, goal, budget, note) if best else note
    key, higher = CRITERIA[goal][0]
    machine = machine_summary(rows)
    if best and machine["busy"]:
        why += f". Note: {BUSY_NOTE}"
    return Recommendation(
        model=str(model), fingerprint=fingerprint, goal=goal, memory_bytes=budget, context=context, batch=batch,
        max_kld=max_kld, choice=best["name"] if best else None, why=why, tie=note if best else "", tied=tied,
        lead=lead(best, rivals, key, higher) if best else None, machine=machine, measured=rows,
        pareto=pareto_front(rows, SPEED_KEY[goal]),
        excluded=[{"name": v.name, "needs_bytes": r["total_bytes"], "reason": "does not fit"} for v, r in excluded]
        + [{"name": r["name"], "kld_mean": r["kld_mean"], "reason": f"KLD above {max_kld}"}
           for r in rows if r["kld_mean"] > max_kld and goal != "quality" and not absurd(r)]
        + [{"name": r["name"], "kld_mean": r["kld_mean"], "reason": f"KLD absurd (over {ABSURD_KLD} nats): "
            "a broken file, flagged and never chosen"} for r in rows if absurd(r)],
        skipped=skipped, reference=reference, memory=memory_rows, settings=asdict(settings),
        seconds=time.perf_counter() - started, engine=engine_version(engine, llama_cpp))
