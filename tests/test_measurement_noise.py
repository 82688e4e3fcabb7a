"""Speed figures that know when they are noise: intervals, ties, the busy-machine flag, tables that fit 80 columns."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from slimlm.evaluate.bench import bench
from slimlm.evaluate.noise import MachineLoad, judge, median_interval
from slimlm.recommend import choose, lead


def test_median_interval_is_the_order_statistic_interval():
    # 6 runs: [x(1), x(6)] covers the median with 1 - 2/64 = 96.9%; no narrower pair reaches 95%
    assert median_interval([5, 1, 3, 2, 6, 4]) == (3.5, 1.0, 6.0, pytest.approx(1 - 2 / 64))
    # 9 runs: [x(2), x(8)] covers with 1 - 2·(1 + 9)/512 = 96.1%, [x(3), x(7)] only 82%
    mid, low, high, cov = median_interval(list(range(1, 10)))
    assert (mid, low, high) == (5, 2, 8) and cov == pytest.approx(1 - 2 * 10 / 512)
    # 3 runs: no 95% interval exists; [min, max] at its true coverage, 75%
    assert median_interval([3, 1, 2]) == (2, 1, 3, 0.75)


def _row(name, kld, mem, speed, low, high):
    return {"name": name, "kld_mean": kld, "memory_bytes": mem, "prefill_tok_s": speed, "itl_p50_ms": 1000 / speed,
            "intervals": {"prefill_tok_s": [low, high], "itl_p50_ms": [1000 / high, 1000 / low]}, "top1": 1.0}


def test_overlapping_intervals_are_a_tie_decided_by_the_next_figure():
    # "fast" has the higher median, but its interval overlaps "exact"'s: a tie, and the lower KLD decides
    rows = [_row("exact", 0.001, 100, 280, 250, 300), _row("fast", 0.02, 60, 300, 290, 330),
            _row("slow", 0.0, 200, 100, 90, 110)]
    best, note, tied = choose(rows, "throughput", 0.1)
    assert best["name"] == "exact"
    assert set(tied) == {"exact", "fast"}
    assert note.startswith("tied on prefill tok/s (intervals overlap): fast, exact") and "exact chosen by KLD" in note
    # apart, the faster one wins outright and no tie is reported; its lead over the runner-up is an interval
    rows[1] = _row("fast", 0.02, 60, 400, 380, 420)
    best, note, tied = choose(rows, "throughput", 0.1)
    assert (best["name"], note, tied) == ("fast", "", [])
    assert lead(best, rows, "prefill_tok_s", True) == {"runner_up": "exact", "figure": "prefill_tok_s",
                                                       "difference": 120, "interval": [80, 170], "ratio": 400 / 280}
    # latency: lower ITL wins; overlap again hands the choice to KLD
    rows[1] = _row("fast", 0.02, 60, 290, 260, 320)
    assert choose(rows, "latency", 0.1)[0]["name"] == "exact"


def test_judge_flags_other_processes_and_load():
    quiet = MachineLoad(cores=2, own_cpu_per_wall=1.9, others_share=0.02, loadavg_after=2.3)
    judge(quiet)
    assert not quiet.busy and quiet.reasons == []
    busy = MachineLoad(cores=2, own_cpu_per_wall=1.0, others_share=0.45, loadavg_after=3.1)
    judge(busy)
    assert busy.busy and "other processes used 45% of the 2 cores" in busy.reasons[0]
    no_proc = MachineLoad(cores=2, own_cpu_per_wall=1.0, others_share=None, loadavg_after=3.5)
    judge(no_proc)
    assert no_proc.busy and "load average 3.50" in no_proc.reasons[0]


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="the busy-machine watch reads /proc/stat (Linux)")
def test_bench_flags_a_busy_machine(tiny_lm_dir: Path):
    """A CPU-heavy child on every core while a short bench runs: the session must say the machine was busy."""
    import os

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        report = bench(tiny_lm_dir, prompt=32, gen=24, batches=[1], backends=["torch-fp32"], runs=6, threads=1)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    machine = report["machine"]
    assert machine["busy"], machine
    assert machine["others_share"] >= 0.15 and any("other processes used" in r for r in machine["reasons"])
    row = report["rows"][0]
    low, high = row["intervals"]["prefill_tok_s"]
    assert low <= row["prefill_tok_s"] <= high and row["interval_coverage"] > 0.95
    assert report["order"] == "round-robin"


def test_recommend_table_keeps_names_whole_at_80_columns():
    from slimlm.cli.recommend_cmds import _render

    def row(name, mem, kld, speed):
        return {"name": name, "kind": "gguf", "memory_bytes": mem, "kld_mean": kld, "top1": 0.9, "ppl": 18.5,
                "prefill_tok_s": speed, "decode_tok_s": 20.0, "itl_p50_ms": 50.0, "engine": "llama.cpp",
                "intervals": {"prefill_tok_s": [speed - 12, speed + 9]}, "interval_coverage": 0.969}

    result = {"model": "/m/SmolLM2-135M-Instruct", "goal": "throughput", "memory_bytes": 8 << 30,
              "choice": "Q4_K_M", "tied": ["Q4_K_M", "W8A8 SmoothQuant"], "pareto": ["Q4_K_M"],
              "measured": [row("FP32 (original)", 955 << 20, 0.0, 298.0), row("W8A8 SmoothQuant", 652 << 20, 0.0034, 301.0),
                           row("Q4_K_M", 541 << 20, 0.0436, 305.0)],
              "excluded": [], "skipped": [], "why": "Q4_K_M: ...", "settings": {"runs": 6},
              "machine": {"busy": True, "reasons": ["other processes used 48% of the 2 cores"],
                          "note": "measured while the machine was busy: speed figures unreliable"}}
    console = Console(width=80, record=True)
    _render(result, console)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    table = "\n".join(line for line in lines if line.startswith(("┃", "│")))
    for word in ("variant", "memory", "KLD", "prefill", "Q4_K_M", "W8A8 SmoothQuant", "FP32 (original)",
                 "305 (293-314)", "← chosen", "tied"):
        assert word in table, word
    assert "measured while the machine was busy: speed figures unreliable" in text
    assert "97% interval" in text
