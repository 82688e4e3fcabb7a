"""Hostile and broken input (issue 18): the whole fuzz corpus of tests/fuzz_corpus.py through every command that
reads a model, one capped worker per command (RLIMIT_AS 6 GiB, 20 s per case), and the table of outcomes.

The test suite (tests/test_fuzz_inputs.py) runs a seeded sample of the GGUF field mutations for the commands that
load weights; this runs every case for every command. A control row per command runs the valid base files the
corpus is made from, so a clean error is the input's fault, not a broken setup.

    flock /tmp/cpu.lock python benchmarks/bench_fuzz.py [--no-write]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT / "src")]
import fuzz_corpus as fc  # noqa: E402
from _common import markdown_table, publish  # noqa: E402

BOUND_MIB = 2048


def _row(label: str, outcomes: list, peak: int, root: Path, ok: list) -> list:
    verdicts = collections.Counter(fc.verdict(o) for o in outcomes)
    slowest = max(outcomes, key=lambda o: o.seconds)
    return [label, len(outcomes), verdicts["clean"], verdicts["accepted"] + verdicts["warned"],
            verdicts["traceback"] + verdicts["crash"] + verdicts["multi-line"], verdicts["internal-error"],
            verdicts["timeout"], verdicts["unexpected-success"], f"{peak / 1024:.0f} (≤ {BOUND_MIB})",
            f"{slowest.seconds:.1f}", int((root / fc.MARKER).exists()), sum(bool(o.left_behind) for o in outcomes),
            sum(o.input_changed for o in outcomes), "/".join("ok" if o.exit == 0 else f"exit {o.exit}" for o in ok)
            or "—"]


def _notes(command: str, outcomes: list) -> list[str]:
    bad = [o for o in outcomes if fc.verdict(o) not in ("clean", "accepted", "warned")]
    return [f"- `{command}` {o.case}: {fc.verdict(o)}: {o.stderr[-200:]}" for o in bad[:5]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slimlm-fuzz-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        cases, bases = fc.build_corpus(root, seed=0)
        control = [fc.Case("control-hf", str(bases["hf"])),
                   fc.Case("control-gguf", str(bases["gguf"]), tokenizer=str(bases["hf"]))]
        rows, notes = [], []
        for command in fc.COMMANDS:
            work = root / command.replace(" ", "_").replace("-", "")
            work.mkdir()
            outcomes, peak = fc.run_batch(cases, (command,), work, bases["text"])
            ok, _ = fc.run_batch(control, (command,), work, bases["text"])
            rows.append(_row(f"`{command}`", outcomes, peak, root, ok))
            notes += _notes(command, outcomes)
        data = fc.data_cases(bases["hf"], root / "data-cases")
        for command in fc.DATA_COMMANDS:
            work = root / command.replace(" ", "_").replace("-", "")
            work.mkdir()
            outcomes, peak = fc.run_batch(data, (command,), work, bases["text"])
            control = [fc.Case("control-text", str(bases["text"]), model=str(bases["hf"]))]
            ok, _ = (fc.run_batch(control, (command,), work, bases["text"]) if command not in fc.WHOLE_TEXT
                     else ([], 0))
            rows.append(_row(f"`{command.split(' --')[0]}` {command[len(command.split(' --')[0]):].strip()} "
                             "(bad text)", outcomes, peak, root, ok))
            notes += _notes(command, outcomes)
        seconds = time.perf_counter() - start
    headers = ["command", "cases", "clean errors (exit 2, one line)", "header-only report (warning) / text used",
               "tracebacks", "internal errors (exit 1)", "time-outs", "unexpected successes",
               "worst peak RSS MiB (bound)", "slowest case s", "marker files", "partial outputs",
               "inputs modified", "control (HF dir / GGUF; text)"]
    body = (f"{len(cases)} malformed inputs per command, seed 0 ({seconds:.0f} s in all): GGUF files truncated at "
            "every structural boundary (±1 byte) and with every numeric header field (counts, lengths, value and "
            "item types, array counts, n_dims, dims, tensor types, offsets, the sizing metadata) set to 0, −1, "
            "max, a lie about the file or +1; alignment 0/3/2^31, block_count 10^9, duplicate tensors, zero and "
            "overflowing dims, 100,000-deep nested arrays; safetensors truncations, header lengths and entries "
            "(dtype, shape, offsets) set to lies, overlap, duplicate names, non-JSON, non-UTF-8, deep nesting; "
            "config.json missing keys, wrong types, 0/−1/10^9/10^12/2^63 values, heads not dividing, lying about "
            "the weights; pickle weights (.bin/.pt/.pth/.ckpt, a dir, disguised as .safetensors/.gguf) that "
            "create a marker file if unpickled. Each command runs in one worker process capped at "
            f"{fc.MEMORY_CAP >> 30} GiB of address space and {fc.CASE_SECONDS} s per case; peak RSS is the "
            "worker's VmHWM (imports of torch and transformers included). \"header-only report\": `inspect` (and "
            "`--check`) reading a file whose header is whole but whose data is short, or reporting from the tensor "
            "table with a warning naming the config field it could not use. The \"(bad text)\" rows give a valid "
            "model bad calibration or evaluation text: missing, empty, only whitespace, a folder, 64 KiB of random "
            "bytes, text with NUL bytes, Latin-1, UTF-16 with its BOM, JSONL that is not JSON, empty or without a "
            "text field, and a 1 MiB single line, which is valid text (\"text used\": the command ran on it within "
            "the cap; `cache-teacher` and `recommend`, whose work grows with the whole text by design, are not "
            "given it); their control is the valid text file (— for `cache-teacher` and `recommend`, not run on valid text here).\n\n"
            + markdown_table(headers, rows)
            + ("\n\nNot clean:\n" + "\n".join(notes) if notes else "")
            + "\n\nCommand: `flock /tmp/cpu.lock python benchmarks/bench_fuzz.py`")
    publish("Hostile and broken input: the fuzz corpus through every command (issue 18)", body, args.no_write)


if __name__ == "__main__":
    main()
