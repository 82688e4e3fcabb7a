"""`slimlm explain`: names as people meet them, split into parts with real sizes; unknowns stay unknown."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slimlm.inspect.names import explain


def kinds(result):
    return [(p["text"], p["kind"]) for p in result["parts"]]


def test_distill_qwen_7b_q4_k_m_must_show():
    r = explain("DeepSeek-R1-Distill-Qwen-7B-Q4_K_M")
    assert r["variant"]["kind"] == "distill"
    assert r["variant"]["teacher"] == "DeepSeek-R1"
    assert r["variant"]["student_architecture"].startswith("Qwen")
    assert ("Qwen", "student") in kinds(r)
    assert r["parameters"]["count"] == 7_615_616_512 and r["parameters"]["label"] == "7B"
    assert abs(r["quantization"]["bits_per_weight"] - 4.9) < 0.1
    assert abs(r["estimated_file_bytes"] / 4.68e9 - 1) < 0.03
    assert r["unknown"] == []
    assert all(p["meaning"] for p in r["parts"])


def test_distill_qwen_1_5b_label_note_mentions_untied_embeddings():
    r = explain("DeepSeek-R1-Distill-Qwen-1.5B")
    assert r["parameters"]["count"] == 1_777_088_000
    assert "untied" in r["parameters"]["note"] and "1.5B" in r["parameters"]["note"]


def test_ollama_tag_resolves_to_the_distill():
    r = explain("deepseek-r1:14b")
    assert r["model"] == "DeepSeek-R1-Distill-Qwen-14B"
    assert r["variant"]["kind"] == "distill" and r["quantization"] is None
    tagged = explain("deepseek-r1:14b-qwen-distill-q8_0")
    assert tagged["model"] == "DeepSeek-R1-Distill-Qwen-14B" and tagged["quantization"]["scheme"] == "Q8_0"


def test_zero_is_rl_only():
    r = explain("DeepSeek-R1-Zero")
    assert r["variant"]["kind"] == "zero" and "reinforcement learning" in r["variant"]["meaning"]
    assert abs(r["parameters"]["count"] / 671e9 - 1) < 0.005


@pytest.mark.parametrize("name, scheme, fmt", [
    ("Qwen2.5-7B-Instruct-AWQ", "AWQ", "AWQ"),
    ("Llama-3.1-8B-Instruct-W8A8", "W8A8", "compressed-tensors"),
])
def test_instruct_checkpoints_with_quantization(name, scheme, fmt):
    r = explain(name)
    assert r["variant"]["kind"] == "instruct"
    assert r["quantization"]["scheme"] == scheme and r["quantization"]["format"] == fmt
    assert r["parameters"]["count"] and r["estimated_file_bytes"]
    assert r["unknown"] == []


@pytest.mark.parametrize("name, scheme, bits", [
    ("Q4_K_S", "Q4_K_S", 4.5), ("IQ2_XS", "IQ2_XS", 2.3125), ("fp16", "F16", 16.0), ("bf16", "BF16", 16.0),
])
def test_bare_quantization_names(name, scheme, bits):
    r = explain(name)
    assert r["quantization"]["scheme"] == scheme
    assert r["quantization"]["bits_per_weight"] == pytest.approx(bits)
    assert r["model"] is None and r["parameters"]["count"] is None


def test_int4_leaves_its_layout_unknown():
    r = explain("int4")
    assert r["quantization"]["bits_per_weight"] == 4.0
    assert r["unknown"], "the grouping and format of 'int4' must be reported unknown"


def test_gguf_suffix_and_publisher():
    r = explain("bartowski/DeepSeek-R1-Distill-Qwen-7B-GGUF")
    assert ("GGUF", "format") in kinds(r)
    assert r["model"] == "DeepSeek-R1-Distill-Qwen-7B"
    file = explain("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert file["model"] == "SmolLM2-135M" and file["quantization"]["scheme"] == "Q4_1"


def test_unknown_parts_are_reported_not_guessed():
    r = explain("Foo-Bar-7B-Q4_K_M")
    assert ("Foo", "unknown") in kinds(r) and ("Bar", "unknown") in kinds(r)
    assert r["model"] is None and r["parameters"]["count"] is None
    assert r["parameters"]["name_label"] == "7B"
    assert any("Foo" in u for u in r["unknown"])


def test_cli_json_and_bad_input():
    from slimlm.cli import app

    out = CliRunner().invoke(app, ["explain", "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M", "--json"])
    assert out.exit_code == 0
    assert json.loads(out.stdout)["parameters"]["label"] == "7B"
    proc = subprocess.run([sys.executable, "-c", "from slimlm.cli import main; main()", "explain", "  "],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
