"""Zero on a GPU machine: the same recipe as bench_zero.py (baseline eval, GRPO from rewards alone, eval after,
paired difference ± SE) at a larger size: more completions per step, bigger groups, longer completions, a
harder task, and vLLM generation (colocated) when vLLM is installed there.

    python benchmarks/gpu_zero.py --model /path/to/Qwen2.5-0.5B-Instruct --minutes 30
    python benchmarks/gpu_zero.py --no-vllm ...       # transformers generation even where vLLM is installed

The machine is offline: --model must be a local HF dir (the default is the built-in SmolLM2-135M-Instruct,
which exists only where slimlm has made it). Figures are appended to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil

import torch

from bench_zero import add_recipe_args, run_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_args(ap, difficulty=2, n=500, minutes=30.0, steps=300, batch=64, group=16, lr=3e-6,
                    max_completion=512, eval_batch=128)
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run benchmarks/bench_zero.py on CPU instead")
    args.vllm = not args.no_vllm and importlib.util.find_spec("vllm") is not None
    name = torch.cuda.get_device_name(0)
    result = run_recipe(args, f"Zero on GPU ({name}, {'vLLM' if args.vllm else 'transformers'} generation)",
                        "zero-curves-gpu.png")
    if args.keep is None:
        shutil.rmtree(result["run_dir"])


if __name__ == "__main__":
    main()
