"""Real-size runs on synthetic real-shape checkpoints (benchmarks/make_synthetic.py): one command per call, its
wall time and peak memory, saved as JSON; ``table`` renders the saved runs as one markdown table.

Peak memory is sampled every 0.1 s with psutil over the command's whole process tree (slimlm's GGUF writer forks
encoder processes): ``tree`` is the largest sum of RSS seen at one instant, ``largest`` the largest single
process, ``anon`` the largest sum of private (anonymous) resident memory, without mapped file pages. The load
average (``/proc/loadavg``) is recorded before and after.

    python benchmarks/bench_real_size.py run NAME RESULTS_DIR -- python -m slimlm quantize DIR --to Q4_K_M -o X
    python benchmarks/bench_real_size.py llama-quantize NAME RESULTS_DIR SRC.gguf DST.gguf Q4_K_M
    python benchmarks/bench_real_size.py table RESULTS_DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

_LLAMA_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3]); p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _rss_anon(pid: int) -> int:
    """Private (anonymous) resident bytes: RSS without the file pages a process maps (safetensors read through
    mmap stay resident and count in RSS until the kernel needs the memory back)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, exit code, peak RSS (tree sum and largest process) in MB, load before/after."""
    before = _load()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = {"tree": 0, "largest": 0, "anon": 0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = [p.memory_info().rss for p in procs]
                anon = sum(_rss_anon(p.pid) for p in procs)
            except (psutil.Error, OSError):
                rss, anon = [], 0
            if rss:
                peak["tree"] = max(peak["tree"], sum(rss))
                peak["largest"] = max(peak["largest"], max(rss))
                peak["anon"] = max(peak["anon"], anon)
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = proc.wait()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(wall, 1), "peak_tree_mb": round(peak["tree"] / 2**20),
            "peak_largest_mb": round(peak["largest"] / 2**20), "peak_anon_mb": round(peak["anon"] / 2**20),
            "load_before": before, "load_after": _load(),
            "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run")
    run.add_argument("name")
    run.add_argument("results")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    lq = sub.add_parser("llama-quantize")
    for arg in ("name", "results", "src", "dst", "ftype"):
        lq.add_argument(arg)
    tab = sub.add_parser("table")
    tab.add_argument("results")
    args = ap.parse_args()
    if args.what == "table":
        rows = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("*.json"))]
        print("| run | wall s | peak RSS tree MB | largest process MB | load before/after | exit |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['wall_s']} | {r['peak_tree_mb']} | {r['peak_largest_mb']} | "
                  f"{r['load_before']} / {r['load_after']} | {r['rc']} |")
        return
    if args.what == "llama-quantize":
        cmd = [sys.executable, "-c", _LLAMA_QUANTIZE, args.src, args.dst, args.ftype]
    else:
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    result = {"name": args.name, **measure(cmd)}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
