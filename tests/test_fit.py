"""`slimlm fit`: memory strings, the choice of variant, the nothing-fits answer, CLI exit codes."""

import json

import pytest
from typer.testing import CliRunner

from slimlm.errors import SlimlmError
from slimlm.inspect.fit import fit, parse_memory


def test_parse_memory_units():
    assert parse_memory("8GiB") == 8 * 2**30
    assert parse_memory("16GB") == 16 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5 TiB") == int(1.5 * 2**40)
    assert parse_memory("8G") == 8 * 2**30
    for bad in ("8", "eight GB", "8XB", "-1GB", "0GiB", ""):
        with pytest.raises(SlimlmError):
            parse_memory(bad)


def test_best_variant_is_the_highest_quality_that_fits():
    r = fit("DeepSeek-R1-Distill-Qwen-7B", "8GiB")
    rows = {row["variant"]: row for row in r["variants"]}
    assert r["best"] == "Q6_K"
    assert not rows["Q8_0"]["fits"] and rows["Q6_K"]["fits"]
    for row in r["variants"]:
        assert row["total_bytes"] == row["weights_bytes"] + row["kv_cache_bytes"] + row["overhead_bytes"]
        assert row["headroom_bytes"] == 8 * 2**30 - row["total_bytes"]
        assert row["fits"] == (row["headroom_bytes"] >= 0)
    # A longer context needs more KV cache, so the best choice can only get smaller.
    long = fit("DeepSeek-R1-Distill-Qwen-7B", "8GiB", context=65536)
    assert long["variants"][0]["kv_cache_bytes"] == 16 * r["variants"][0]["kv_cache_bytes"]
    assert long["best"] in ("Q5_K_M", "Q5_K_S", "Q4_K_M", "W4A16", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")


def test_fit_offers_the_budget_mix_for_what_is_left():
    """fit names the bits per weight a budget mix (quantize --fit) would spend, from the same KV cache and
    overhead as every variant, and the command that makes it."""
    r = fit("DeepSeek-R1-Distill-Qwen-7B", "8GiB", context=8192)
    mix, row = r["budget_mix"], r["variants"][0]
    assert mix["weights_bytes"] == 8 * 2**30 - row["kv_cache_bytes"] - row["overhead_bytes"]
    params = row["weights_bytes"] * 8 / row["bits_per_weight"]
    assert mix["bits_per_weight"] == pytest.approx(mix["weights_bytes"] * 8 / params, abs=0.02)
    assert mix["possible"] and "--fit 8GiB --context 8192" in mix["command"]
    assert not fit("DeepSeek-R1-Distill-Qwen-7B", "1TiB")["budget_mix"]["possible"]  # F16 fits: nothing to choose
    small = fit("DeepSeek-R1-Distill-Qwen-7B", "2GiB")["budget_mix"]
    assert not small["possible"] and small["weights_bytes"] < small["smallest_bytes"]  # below the smallest mix
    assert 2.06 <= small["smallest_bits_per_weight"] < 2.2  # 3584-wide rows take IQ2_XXS's 256-blocks


def test_f32_is_not_preferred_over_a_bf16_original():
    r = fit("SmolLM2-135M", "8GiB")  # everything fits; the catalog model is published in bf16
    assert r["best"] == "BF16"


def test_nothing_fits_is_an_answer():
    r = fit("deepseek-r1", "64GiB")
    assert r["best"] is None and not r["fits_any"]
    assert r["smallest"]["variant"] == "Q2_K"
    assert "nothing fits" in r["message"] and "Q2_K" in r["message"]


def test_fit_a_checkpoint_lists_it_as_stored(smollm2_gguf):
    r = fit(smollm2_gguf, "1GiB", context=1024)
    stored = r["variants"][-1]
    assert stored["variant"] == "as stored (gguf)"
    assert stored["weights_bytes"] < smollm2_gguf.stat().st_size


def test_cli_exit_codes():
    from slimlm.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["fit", "--memory", "8GiB", "DeepSeek-R1-Distill-Qwen-7B", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["best"] == "Q6_K"
    none = runner.invoke(app, ["fit", "--memory", "1GiB", "deepseek-r1"])
    assert none.exit_code == 0 and "nothing fits" in none.stdout


@pytest.mark.parametrize("args", [["fit", "--memory", "lots", "SmolLM2-135M"],
                                  ["fit", "--memory", "8GiB", "no-such-model-xyz"],
                                  ["fit", "--memory", "8GiB", "--context", "0", "SmolLM2-135M"]])
def test_cli_bad_input_exits_2_with_one_line(args):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from slimlm.cli import main; main()", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
