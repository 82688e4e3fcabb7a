"""Write a synthetic real-shape checkpoint (slimlm.writers.synthetic) after checking the disk has room.

    python benchmarks/make_synthetic.py r1-distill-qwen-7b /work/scratch/i15/qwen7b [--seed 0] [--min-free-gb 0]
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

from slimlm.writers import synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("preset", choices=sorted(synthetic.PRESETS))
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-free-gb", type=float, default=0.0, help="refuse unless this much is free after writing")
    args = ap.parse_args()
    config = synthetic.PRESETS[args.preset]
    need = synthetic.total_bytes(config)
    parent = Path(args.out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free - need < args.min_free_gb * 1e9:
        sys.exit(f"{args.preset} needs {need / 1e9:.1f} GB; {free / 1e9:.1f} GB free leaves less than "
                 f"{args.min_free_gb} GB")
    start = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int, name: str) -> None:
        if time.perf_counter() - last[0] > 10 or done == total:
            last[0] = time.perf_counter()
            print(f"{done / 1e9:6.1f}/{total / 1e9:.1f} GB  {time.perf_counter() - start:6.0f} s  {name}", flush=True)

    synthetic.write_checkpoint(args.out, config, seed=args.seed, progress=progress)
    print(f"wrote {args.out}: {need / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
