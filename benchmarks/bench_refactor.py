"""Speed of two source trees side by side: quantize (GGUF and compressed-tensors), eval and inspect.

A refactor must not slow the hot paths. Each measurement runs in a fresh interpreter with one tree on
PYTHONPATH (import time excluded: the timer wraps the API call only), the trees alternate run by run so
drift in machine load hits both alike, and the table gives medians and the new/old ratio.

    flock /tmp/slimlm-heavy.lock python benchmarks/bench_refactor.py --old ../wt/base/src --new src [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, publish  # noqa: E402

# Each job: a few lines run in the child; it prints the seconds of the timed call.
PREPARE = """
import tempfile, time
from pathlib import Path
from slimlm import api, resources
model = resources.builtin_hf_dir()
text = resources.wikitext_path("test")
calib = resources.wikitext_path("valid")
tmp = Path(tempfile.mkdtemp())
"""
JOBS = {
    "quantize --to Q4_K_M": "t = time.perf_counter(); api.quantize_gguf(model, 'Q4_K_M', tmp / 'q.gguf')",
    "quantize --to Q8_0": "t = time.perf_counter(); api.quantize_gguf(model, 'Q8_0', tmp / 'q.gguf')",
    "quantize --scheme w4a16 --method rtn": (
        "t = time.perf_counter(); api.quantize_model(model, tmp / 'ct', scheme='w4a16', method='rtn')"),
    "quantize --scheme w4a16 --method gptq (4x256 calib)": (
        "t = time.perf_counter(); api.quantize_model(model, tmp / 'ct', scheme='w4a16', method='gptq', "
        "calib=calib, samples=4, seq_len=256)"),
    "eval fp32, 8 windows": "t = time.perf_counter(); api.evaluate(model, text, chunks=8)",
    "inspect (headers)": "t = time.perf_counter(); api.inspect(model)",
}


def run_job(src: Path, code: str) -> float:
    script = PREPARE + code + "\nprint('SECONDS', time.perf_counter() - t)\n"
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("SECONDS")][-1]
    return float(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip", default="gptq", help="comma-separated words: jobs whose name has one are skipped")
    ap.add_argument("--label", default="before vs after the issue-13 refactor")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()
    rows, raw = [], {}
    skip = [w for w in args.skip.split(",") if w]
    for name, code in JOBS.items():
        if any(w in name for w in skip):
            continue
        times: dict[str, list[float]] = {"old": [], "new": []}
        for i in range(args.runs):
            for tree in (("old", "new") if i % 2 == 0 else ("new", "old")):
                times[tree].append(run_job(getattr(args, tree), code))
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        raw[name] = times
        rows.append([name, f"{old:.2f}", f"{new:.2f}", f"{new / old:.3f}"])
        print(name, times, file=sys.stderr)
    load_after = os.getloadavg()
    body = (markdown_table(["job (SmolLM2-135M)", "old s", "new s", "new/old"], rows)
            + f"\n\nMedians of {args.runs} runs per tree, trees alternating, each run in a fresh process "
            f"(import excluded). Load average before {load_before[0]:.2f}, after {load_after[0]:.2f}.\n\n"
            f"Raw seconds: `{json.dumps(raw)}`")
    publish(f"Refactor speed check: {args.label}", body, args.no_write)


if __name__ == "__main__":
    main()
