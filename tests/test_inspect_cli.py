"""`slimlm inspect` as users run it (a real subprocess): output, --json, and every bad input exiting 2 with
exactly one line on stderr and no traceback."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from test_checkpoint_readers import write_safetensors_dir, write_tiny_gguf

CLI = [sys.executable, "-c", "from slimlm.cli import main; main()"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


def _safetensors_with_header(path: Path, header_len: int, body: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", header_len) + body)
    return path


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path | str, str]]:
    """name -> (argument, a phrase its error line must contain)."""
    empty = tmp / "empty-dir"
    empty.mkdir()
    (empty / "README.md").write_text("no model here")
    good = write_safetensors_dir(tmp / "good")
    header = (good / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", header[:8])
    truncated_st = tmp / "truncated.safetensors"
    truncated_st.write_bytes(header[: 8 + n // 2])
    corrupt_json = tmp / "corrupt.safetensors"
    corrupt_json.write_bytes(header[:8] + b"{" * n + header[8 + n:])
    gguf = write_tiny_gguf(tmp / "tiny.gguf").read_bytes()
    truncated_gguf = tmp / "truncated.gguf"
    truncated_gguf.write_bytes(gguf[:200])
    bad_magic = tmp / "badmagic.gguf"
    bad_magic.write_bytes(b"GGUX" + gguf[4:])
    bad_version = tmp / "badversion.gguf"
    bad_version.write_bytes(gguf[:4] + struct.pack("<I", 99) + gguf[8:])
    bin_file = tmp / "pytorch_model.bin"
    bin_file.write_bytes(b"\x80\x02not really a pickle")
    pt_file = tmp / "model.pt"
    pt_file.write_bytes(b"PK\x03\x04zip-pickle")
    bad_config = tmp / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    return {
        "missing path": (tmp / "nope" / "model.gguf", "does not exist"),
        "dir without config or weights": (empty, "no config.json and no .safetensors or .gguf weights"),
        "truncated safetensors header": (truncated_st, "truncated safetensors header"),
        "corrupt safetensors header": (corrupt_json, "corrupt safetensors header (not valid JSON"),
        "absurd header length": (_safetensors_with_header(tmp / "absurd.safetensors", 2**62, b"{}"),
                                 "exceeds the 100000000 byte limit"),
        "truncated GGUF header": (truncated_gguf, "truncated GGUF header"),
        "GGUF bad magic": (bad_magic, "not a GGUF file (bad magic bytes)"),
        "GGUF bad version": (bad_version, "corrupt GGUF header"),
        "pickle .bin": (bin_file, "pickle weights (.bin) are refused"),
        "pickle .pt": (pt_file, "pickle weights (.pt) are refused"),
        "invalid config.json": (bad_config, "not valid JSON"),
        "unknown catalog name": ("deepseek-r3", "did you mean DeepSeek-R1"),
    }


def test_every_bad_input_exits_2_with_one_line(tmp_path):
    for case, (arg, phrase) in _bad_inputs(tmp_path).items():
        result = run_cli("inspect", str(arg))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (case, result.stderr)
        assert len(lines) == 1, (case, result.stderr)
        assert lines[0].startswith("error: ") and phrase in lines[0], (case, lines[0])
        assert "Traceback" not in result.stderr and result.stdout == "", case


def test_partial_download_prints_a_warning_and_the_count(tmp_path):
    model = write_safetensors_dir(tmp_path / "m")
    file = model / "model.safetensors"
    with file.open("r+b") as f:
        f.truncate(file.stat().st_size - 512)
    result = run_cli("inspect", str(model))
    assert result.returncode == 0, result.stderr
    assert "512 bytes short" in result.stderr and "partial download" in result.stderr
    assert "missing bytes" in result.stdout


def test_catalog_json_deepseek_r1():
    result = run_cli("inspect", "deepseek-r1", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert abs(data["total_params"] / 671e9 - 1) < 0.005
    assert abs(data["active_params"] / 37e9 - 1) < 0.02
    assert data["label"] == "671B" and data["active_label"] == "37B"
    assert "embedding table is excluded" in data["active_definition"] and "lm_head" in data["active_definition"]
    assert data["mtp_params"] > 0 and data["spec"]["mtp_layers"] == 1


def test_ollama_style_name_and_tables():
    result = run_cli("inspect", "deepseek-r1:1.5b")
    assert result.returncode == 0, result.stderr
    assert "1,777,088,000 (1.7B)" in result.stdout and "name says" in result.stdout
    assert "labelled 1.5B but has 1,777,088,000 parameters" in result.stderr


@pytest.mark.slow
def test_smollm2_gguf_prints_count_and_label(smollm2_gguf, smollm2_hf_dir):
    for target in (smollm2_gguf, smollm2_hf_dir):
        result = run_cli("inspect", str(target))
        assert result.returncode == 0, result.stderr
        assert "134,515,008 (135M)" in result.stdout
    gguf = run_cli("inspect", str(smollm2_gguf), "--json")
    data = json.loads(gguf.stdout)
    assert data["total_params"] == 134_515_008 and data["label"] == "135M" and data["format"] == "gguf"
    assert {row["type"] for row in data["gguf"]["quant_mix"]} == {"Q4_1", "Q8_0", "F32"}
