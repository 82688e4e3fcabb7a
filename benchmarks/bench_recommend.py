"""slimlm recommend on a test model: every candidate that fits the memory, made, scored and timed on this machine,
and the pick for each goal from those same measurements (quality and speed are cached, so the later goals cost
nothing).

    flock /tmp/slimlm-heavy.lock python benchmarks/bench_recommend.py [--model qwen2] [--memory 1.5GiB]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section, markdown_table  # noqa: E402
from bench_eval import MODELS  # noqa: E402

from slimlm.recommend import GOALS, recommend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2")
    ap.add_argument("--memory", default="1.5GiB")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    name, _, hf_dir = MODELS[args.model]
    model = hf_dir()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    recs = {goal: recommend(model, memory=args.memory, goal=goal, context=args.context, chunks=args.chunks,
                            runs=args.runs, progress=say) for goal in GOALS}
    seconds = time.perf_counter() - start
    first = recs[GOALS[0]]
    rows = [[r["name"], f"{r['file_bytes'] / 2**20:.0f}", f"{r['memory_bytes'] / 2**30:.2f}", f"{r['kld_mean']:.4f}",
             f"{r['top1']:.3f}", f"{r['ppl']:.2f}", f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
             f"{r['make_seconds']:.0f}"] for r in first.measured]
    picks = "\n".join(f"- **{goal}**: {rec.choice or 'nothing'}. {rec.why}" for goal, rec in recs.items())
    left = [f"{x['name']} ({x.get('reason') or 'does not fit'})" for x in first.excluded + first.skipped]
    body = (f"{name} (fp32 HF dir from the shipped GGUF), device memory {args.memory}, context "
            f"{args.context} x batch 1, engine {first.engine}. KLD / top-1 / ppl against the original on wikitext-2 "
            f"test ({args.chunks} windows of 512); speed: one `bench` session, {args.runs} rounds round-robin, "
            f"prompt {first.settings.get('prompt')} + {first.settings.get('gen')} new tokens, medians. "
            f"Whole run (all {len(GOALS)} goals, later ones from the cache): {seconds:.0f} s.\n\n"
            + markdown_table(["variant", "file MiB", "needs GiB", "KLD", "top-1", "ppl", "prefill tok/s",
                              "decode tok/s", "make s"], rows)
            + "\n\nPicks, with recommend's own reasons:\n" + picks
            + ("\n\nLeft out: " + "; ".join(left) if left else "")
            + f"\n\nMachine while timing: {'busy (' + ', '.join(first.machine['reasons']) + ')' if first.machine.get('busy') else 'quiet'}"
            + f"\n\nCommand: `python benchmarks/bench_recommend.py --model {args.model} --memory {args.memory}`")
    if args.no_append:
        print(body)
    else:
        append_section(f"slimlm recommend: {name}, {args.memory} (bench_recommend.py)", body)


if __name__ == "__main__":
    main()
