"""Outputs that survive faults (issue 18): every writer through tests/fault_runs.py with more kills than the tests
run, and the table of outcomes: kill loop (cases, kills that left every artifact absent or complete, resumes with
the uninterrupted run's bytes), full disk, two concurrent runs, a read-only folder, the output equal to an input.

    flock /tmp/cpu.lock python benchmarks/bench_faults.py [--kills 10] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT / "src")]
import fault_runs as fr  # noqa: E402
from _common import markdown_table, publish  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs (each followed by a resume) per writer")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--only", default="", help="run only writers whose name contains this")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    import slimlm.cli  # noqa: F401 - imported once, before the children fork
    import slimlm.distill.recipe  # noqa: F401
    import slimlm.recommend  # noqa: F401
    import slimlm.zero.train  # noqa: F401

    rows, notes = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimlm-faults-") as tmp:
        root = Path(tmp)
        model, text = fr.tiny_inputs(root)
        for name, writer in fr.writers(model, text, root).items():
            if args.only not in name:
                continue
            work = root / f"work-{writer.name.replace(' ', '_')}"
            work.mkdir()
            ref, seconds = fr.reference(writer, work)
            kills = fr.kill_loop(writer, ref, seconds, work, cases=args.kills, seed=args.seed)
            faults = {f.__name__: f(writer, ref, work) for f in (fr.full_disk, fr.concurrent)}
            faults["read_only"] = fr.read_only(writer, work)
            same = fr.same_as_input(writer, work) if writer.same_as_input else None
            mark = {True: "ok", False: "FAIL"}
            rows.append([name, len(ref), f"{seconds:.1f}", kills.cases, kills.killed_with_output, kills.ok,
                         kills.identical, mark[faults["full_disk"].ok], mark[faults["concurrent"].ok],
                         mark[faults["read_only"].ok], mark[same.ok] if same else "n/a"])
            notes.append(f"- {name}: full disk: {faults['full_disk'].detail}; concurrent: "
                         f"{faults['concurrent'].detail}; read-only: {faults['read_only'].detail}"
                         + (f"; output = input: {same.detail}" if same else "; output = input: n/a (the cache "
                            "writes only under CACHE/recommend/<fingerprint>/, never onto a path given as input)"))
            notes += [f"  - {p[:400]}" for p in kills.problems[:5]]
            print(rows[-1], flush=True)
    seconds = time.perf_counter() - start
    headers = ["writer", "artifacts", "run s", "kills", "kills after some output existed",
               "kills leaving each artifact absent or complete", "resumes byte-identical", "full disk",
               "2 concurrent runs", "read-only folder", "output = input"]
    body = (f"Every writer on a tiny random Llama (hidden 32, 2 layers, byte tokenizer), {args.kills} SIGKILLs each "
            f"(seed {args.seed}, {seconds:.0f} s in all), through `tests/fault_runs.py`: each run is a child "
            "forked from one process (imports done once) in its own process group; a kill goes to the group at a "
            "uniform random time in [0.05, 1.05] x the uninterrupted run's duration (\"run s\"), while the "
            "previous (complete) output is still there: `quantize` with `--overwrite`, `distill`/`zero` with "
            "`--overwrite` (which removes their outputs first), the recommend cache cleared. After each kill every "
            "artifact (published file) of the uninterrupted run is absent or has its bytes (a log such as "
            "metrics.jsonl may hold its first rows, each whole); then the resume (`--resume` for distill/zero, the "
            "same command otherwise) must give the uninterrupted run's artifacts exactly and leave no temporary or "
            "claim behind. Byte-identical means every byte, except JSON fields that measure the run (seconds, "
            "tokens/s, timestamps, speed figures) and zero's `resumed_from`, removed before hashing. Full disk: "
            "RLIMIT_FSIZE (20 KB; zero 60 KB) with SIGXFSZ ignored: exit 2, one line, no partial artifact, no "
            "temporary, and the resume then completes with identical bytes. Concurrent: two runs at once into an "
            "empty output without `--overwrite`: one writes the reference bytes, the other refuses at once in one "
            "line (exit 2); the recommend cache is shared, so there both finish, the second waiting for what the "
            "first is making. Read-only: the output in a 0555 folder (as root, the child drops CAP_DAC_OVERRIDE): "
            "exit 2, one line, nothing created. Output = input: `-o`/`--out` equal to the model dir or the text "
            "file: exit 2, one line, inputs unchanged (hashes).\n\n"
            + markdown_table(headers, rows) + "\n\n" + "\n".join(notes)
            + f"\n\nCommand: `flock /tmp/cpu.lock python benchmarks/bench_faults.py --kills {args.kills}`")
    publish("Outputs that survive faults: kill loops, full disk, concurrent runs per writer (issue 18)", body,
            args.no_write)


if __name__ == "__main__":
    main()
