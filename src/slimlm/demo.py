"""`slimlm demo`: the whole journey on the built-in SmolLM2-135M-Instruct, offline, in a few minutes.

inspect → explain → make and measure variants → recommend for three situations → one HTML report. Every figure
comes from this run (or the result cache of an earlier identical run). By default a small candidate set, one per
kind of engine and precision a user weighs (fp32 torch, int8 compressed-tensors, 8- and 4-bit GGUF), scored on 4
windows and timed in 6 interleaved rounds (enough for a 95% interval on every speed figure); ``full=True`` measures
every variant ``recommend`` knows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from slimlm import resources
from slimlm.errors import SlimlmError

# Three situations that should lead to different answers: a roomy machine that serves many prompts, a roomy
# machine answering one user, and a small device where only the compact variants fit.
SITUATIONS = (
    {"goal": "throughput", "memory": "8GiB", "context": 4096},
    {"goal": "latency", "memory": "8GiB", "context": 4096},
    {"goal": "quality", "memory": "600MiB", "context": 4096},
)
QUICK = ("FP32 (original)", "W8A8 SmoothQuant", "Q8_0", "Q4_K_M")
# Seconds from a cold cache on 2 cores, scaled by cores for the up-front estimate: the quick set as measured on
# a quiet machine (190 s, BENCHMARKS.md "Issue 19"); the full set from the 9-variant run before issue 19 (657 s,
# on a busy machine, 3-run timing; not re-measured with 6 interleaved rounds).
SECONDS_ON_2_CORES = {"quick": 190, "full": 660}


def plan(full: bool, cores: int | None = None) -> tuple[list[Any], str]:
    """The candidates and the sentence that says, before any work, what the demo will do and how long it takes."""
    from slimlm.evaluate.bench import _llama_cpp_available
    from slimlm.recommend import default_variants

    variants = default_variants(not os.environ.get("SLIMLM_NO_LLAMA_CPP") and _llama_cpp_available())
    if not full:
        variants = [v for v in variants if v.name in QUICK]
    cores = cores or os.cpu_count() or 1
    minutes = SECONDS_ON_2_CORES["full" if full else "quick"] * 2 / min(max(cores, 1), 8) / 60
    text = (f"demo: {len(variants)} variants of {resources.BUILTIN_MODEL_NAME} ({', '.join(v.name for v in variants)}), "
            f"each scored on 4 windows of wikitext-2 and timed in 6 interleaved rounds, then a choice for "
            f"{len(SITUATIONS)} situations; about {minutes:.0f} min on {cores} cores from a cold cache, seconds "
            f"when cached" + ("" if full else "; --full measures all variants"))
    return variants, text


def run_demo(out: Path, *, say: Callable[[str], None] = print,
             show: Callable[[dict[str, Any]], None] | None = None, chunks: int = 4, full: bool = False,
             steps: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    from slimlm.inspect import inspect
    from slimlm.inspect.names import explain
    from slimlm.recommend import recommend
    from slimlm.report.html import write_report

    out = Path(out)
    variants, intro = plan(full)
    say(intro)
    say(f"results and the report go to {out}/")
    out.mkdir(parents=True, exist_ok=True)
    gguf = resources.smollm2_gguf_path()
    say(f"inspect {gguf.name}")
    info = inspect(str(gguf))
    say(f"{info.total_params:,} parameters ({info.label}), shipped as Q4_1; the fp32 reference is its dequantized weights")
    name = f"{resources.BUILTIN_MODEL_NAME}-Q4_K_M"
    explained = explain(name)
    say(f"explain {name}: {explained['summary']}")
    model = resources.builtin_hf_dir()
    # Calibrate AWQ/SmoothQuant on wikitext-2 valid when it is here; otherwise on text the model writes itself.
    try:
        calib = resources.wikitext_path("valid")
    except SlimlmError:  # no shared data here: self-generated calibration, still offline
        calib = None
    results = []
    for situation in SITUATIONS:
        say(f"recommend for {situation['goal']} with {situation['memory']}")
        result = recommend(model, memory=situation["memory"], goal=situation["goal"], context=situation["context"],
                           chunks=chunks, calib=calib, calib_samples=8, variants=variants, progress=say,
                           steps=steps).to_dict()
        roles = info.to_dict()["roles"]
        result["parameters"] = {"total": f"{info.total_params:,}", "label": info.label,
                                "tied embeddings": info.params.tied_embeddings,
                                **{f"role: {k}": f"{v:,}" for k, v in roles.items() if v}}
        result["explained"] = {p["text"]: p["meaning"] for p in explained["parts"]}
        (out / f"recommend-{situation['goal']}.json").write_text(json.dumps(result, indent=1, default=str))
        if show:
            show(result)
        results.append(result)
    written = write_report(results, out / "report.html", overwrite=True)
    return {"model": str(model), "parameters": info.total_params, "label": info.label,
            "choices": {r["goal"]: {"memory": r["memory_bytes"], "choice": r["choice"], "why": r["why"],
                                    "tied": r["tied"], "busy": r["machine"].get("busy", False)} for r in results},
            **written}
