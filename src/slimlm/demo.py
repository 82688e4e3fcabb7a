"""`slimlm demo`: the whole journey on the built-in SmolLM2-135M-Instruct, offline, in a few minutes.

inspect → explain → make and measure variants → recommend for three situations → one HTML report. Every figure
comes from this run (or the result cache of an earlier identical run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from slimlm import resources
from slimlm.errors import SlimlmError

# Three situations that should lead to three different answers: a roomy machine that serves many prompts,
# a roomy machine answering one user, and a small device where only the compact variants fit.
SITUATIONS = (
    {"goal": "throughput", "memory": "8GiB", "context": 4096},
    {"goal": "latency", "memory": "8GiB", "context": 4096},
    {"goal": "quality", "memory": "560MiB", "context": 4096},
)


def run_demo(out: Path, *, say: Callable[[str], None] = print,
             show: Callable[[dict[str, Any]], None] | None = None, chunks: int = 4) -> dict[str, Any]:
    from slimlm.inspect import inspect
    from slimlm.inspect.names import explain
    from slimlm.recommend import recommend
    from slimlm.report.html import write_report

    out = Path(out)
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
                           chunks=chunks, calib=calib, calib_samples=8, progress=say).to_dict()
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
            "choices": {r["goal"]: {"memory": r["memory_bytes"], "choice": r["choice"], "why": r["why"]}
                        for r in results},
            **written}
