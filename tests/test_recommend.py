"""recommend / report on a tiny random model: choices per goal, the result cache, bad input."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from slimlm.errors import SlimlmError
from slimlm.recommend import Variant, choose, contenders, pareto_front, recommend
from slimlm.report.html import load_results, write_report

VARIANTS = [
    Variant("FP32 (original)", "original", "F32", backend="torch-fp32"),
    Variant("BF16", "bf16", "BF16", backend="torch-bf16"),
    Variant("W8A8 RTN", "compressed-tensors", "W8A8", "w8a8", "rtn", backend="native"),
    Variant("W4A16 RTN", "compressed-tensors", "W4A16", "w4a16", "rtn", backend="native"),
]


@pytest.fixture
def text_file(tmp_path: Path, wikitext_test: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(wikitext_test.read_text()[:6000])
    return path


def _run(model: Path, text: Path, cache: Path, **kw):
    kw.setdefault("memory", "4GiB")
    return recommend(model, data=text, calib=text, variants=VARIANTS, chunks=2, prompt=16, gen=4, runs=1,
                     cache_dir=cache, context=256, **kw)


def test_recommend_measures_chooses_and_caches(tiny_lm_dir: Path, text_file: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    first = _run(tiny_lm_dir, text_file, cache, goal="quality")
    names = {r["name"] for r in first.measured}
    assert names == {v.name for v in VARIANTS}
    original = next(r for r in first.measured if r["kind"] == "original")
    assert original["kld_mean"] == pytest.approx(0.0, abs=1e-4)  # reference stored as f16 log-probs and original["top1"] == 1.0
    assert first.choice == "FP32 (original)"  # nothing beats the original on quality when it fits
    w4 = next(r for r in first.measured if r["name"] == "W4A16 RTN")
    assert w4["kld_mean"] > 0 and w4["file_bytes"] < original["file_bytes"]
    assert all(not r["cached"] for r in first.measured)
    again = _run(tiny_lm_dir, text_file, cache, goal="size", max_kld=10.0)
    assert all(r["cached"] for r in again.measured)  # second run: every figure from the cache
    assert again.seconds < first.seconds
    smallest = min(again.measured, key=lambda r: r["memory_bytes"])
    assert again.choice == smallest["name"]
    assert again.choice in again.pareto


def test_nothing_fits_names_the_smallest(tiny_lm_dir: Path, text_file: Path, tmp_path: Path):
    with pytest.raises(SlimlmError, match=r"nothing fits .* the smallest variant, W4A16 RTN, needs"):
        _run(tiny_lm_dir, text_file, tmp_path / "c", memory="1KiB")


def test_budget_too_small_says_what_was_skipped(tiny_lm_dir: Path, text_file: Path, tmp_path: Path):
    with pytest.raises(SlimlmError,
                       match=r"nothing could be measured: skipped FP32 \(original\) \(time budget used up\); BF16"):
        _run(tiny_lm_dir, text_file, tmp_path / "c", budget_minutes=1e-9)


def _row(name, kld, mem, speed):
    return {"name": name, "kld_mean": kld, "memory_bytes": mem, "prefill_tok_s": speed, "itl_p50_ms": 1000 / speed,
            "top1": 1.0}


def test_choose_and_pareto_per_goal():
    rows = [_row("big", 0.0, 100, 10), _row("fast", 0.01, 60, 30), _row("small", 0.05, 20, 20),
            _row("lossy", 0.5, 10, 40), _row("dominated", 0.06, 70, 5)]
    assert choose(rows, "throughput", 0.1)[0]["name"] == "fast"
    assert choose(rows, "throughput", 1.0)[0]["name"] == "lossy"
    assert choose(rows, "size", 0.1)[0]["name"] == "small"
    assert choose(rows, "quality", 0.1)[0]["name"] == "big"
    assert set(pareto_front(rows, "prefill_tok_s")) == {"big", "fast", "small", "lossy"}


def test_why_compares_with_the_runner_up_when_no_baseline_fits():
    """A small device holds neither BF16 nor the original: the reason names the runner-up, never 'nan'."""
    from slimlm.recommend import _why

    rows = [{**_row("Q6_K", 0.0004, 90, 272), "kind": "gguf"}, {**_row("Q8_0", 0.0002, 95, 265), "kind": "gguf"}]
    best = choose(rows, "throughput", 0.1)[0]
    why = _why(best, rows, rows, "throughput", 100, "")
    assert "nan" not in why and "1.03x Q8_0 (the runner-up; BF16 and the original do not fit)" in why
    why = _why(rows[0], rows, rows, "latency", 100, "")
    assert "nan" not in why and "faster than Q8_0 (the runner-up" in why
    base = {**_row("BF16", 0.0, 99, 300), "kind": "bf16"}
    assert "1.10x Q6_K (the runner-up)," in _why(base, [base, *rows], [base, *rows], "throughput", 100, "")
    assert "0.91x BF16," in _why(rows[0], [base, *rows], [base, *rows], "throughput", 100, "")
    assert "x" not in _why(rows[0], rows[:1], rows[:1], "throughput", 100, "").split("interval")[1].split(" at ")[0]
    lossy = {**_row("Q2_K", 0.5, 80, 280), "kind": "gguf"}  # faster, but over the KLD limit: not a rival
    rivals = contenders([*rows, lossy], "throughput", 0.1)
    assert "Q2_K" not in _why(rows[0], [*rows, lossy], rivals, "throughput", 100, "")
    assert "Q2_K" in _why(rows[0], [*rows, lossy], [*rows, lossy], "throughput", 100, "")


def test_report_html_and_refuses_mixed_models(tiny_lm_dir: Path, text_file: Path, tmp_path: Path):
    result = _run(tiny_lm_dir, text_file, tmp_path / "cache", goal="throughput", max_kld=10.0).to_dict()
    a = tmp_path / "a.json"
    a.write_text(json.dumps(result))
    written = write_report(load_results([a]), tmp_path / "r.html")
    page = Path(written["report"]).read_text()
    assert "data:image/png;base64," in page and "Recommended: " + result["choice"] in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched at view time
    assert all(Path(p).stat().st_size > 5000 for p in written["plots"])
    other = dict(result, fingerprint="0" * 16, model="/elsewhere/other-model")
    b = tmp_path / "b.json"
    b.write_text(json.dumps(other))
    with pytest.raises(SlimlmError, match="different models"):
        load_results([a, b])
    with pytest.raises(SlimlmError, match="exists; pass --overwrite"):
        write_report(load_results([a]), tmp_path / "r.html")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium): the headless screenshot check is skipped")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path/'u'}",
                    f"--screenshot={shot}", "--window-size=1200,1600", f"file://{written['report']}"],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert image.size == (1200, 1600) and len(colors) > 50  # plots rendered, not a blank page
    # the plot's marker colors (GGUF blue / compressed-tensors red / original black) appear on screen
    pixels = set(c for _, c in colors)
    assert (214, 39, 40) in pixels or any(abs(r - 214) < 8 and abs(g - 39) < 8 and abs(b - 40) < 8 for r, g, b in pixels)
