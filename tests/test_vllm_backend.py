"""vLLM as an engine: the driver protocol and argument handling (fast, no vLLM needed), and, marked ``vllm``,
vLLM itself loading slimlm's W8A8 and W4A16 outputs of SmolLM2 with greedy tokens compared to slimlm's runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.evaluate.vllm_bench import Target, parse_sse, round_figures, server_command, summarize
from slimlm.evaluate.vllm_eval import scored_nll
from slimlm.quantize.schemes import vllm_cpu_w4a16_verdict
from slimlm.runtime import vllm_driver, vllm_engine

# vLLM 0.32's own log lines, as its CPU build printed them for slimlm's outputs
LOG = """(EngineCore pid=1) INFO 12-02 15:40:01 [compressed_tensors_wNa16.py:138] Using CPUWNA16LinearKernel for CompressedTensorsWNA16
(EngineCore pid=1) INFO 12-02 15:40:01 [__init__.py:923] Using CPUWNA16LinearKernel for mixed-precision linear
(EngineCore pid=1) INFO 12-02 15:40:02 [__init__.py:700] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8
(EngineCore pid=1) INFO 12-02 15:40:02 [default_loader.py:501] Loading weights took 1.95 seconds
"""


def test_cpu_binding_gives_each_rank_its_share_of_the_cores() -> None:
    assert vllm_driver.cpu_binding([0, 1], 1) == "0,1"
    assert vllm_driver.cpu_binding([0, 1], 2) == "0|1"
    assert vllm_driver.cpu_binding([0, 1, 2, 3], 2) == "0,1|2,3"
    with pytest.raises(ValueError, match="1 cores cannot serve tensor parallel 2"):
        vllm_driver.cpu_binding([0], 2)


def test_engine_env_and_kwargs_from_a_request() -> None:
    env = vllm_driver.engine_env({"kv_cache_gb": 2, "cores": [0, 1]})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    tp2 = vllm_driver.engine_env({"tensor_parallel_size": 2, "cores": [0, 1]})
    assert tp2["VLLM_CPU_OMP_THREADS_BIND"] == "0|1" and "VLLM_ENABLE_V1_MULTIPROCESSING" not in tp2
    kw = vllm_driver.engine_kwargs({"model": "/m", "tokenizer": "/t", "tensor_parallel_size": 2})
    assert kw == {"model": "/m", "dtype": "auto", "max_model_len": 1024, "tensor_parallel_size": 2, "seed": 0,
                  "enforce_eager": True, "tokenizer": "/t"}
    assert vllm_driver.engine_kwargs({"model": "/m/x.gguf", "tokenizer": "/t"})["load_format"] == "gguf"


def test_gguf_is_staged_as_a_model_dir(tmp_path: Path) -> None:
    hf, stage = tmp_path / "hf", tmp_path / "stage"
    hf.mkdir(), stage.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (hf / name).write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    req = vllm_driver.stage_gguf({"model": str(tmp_path / "m.gguf"), "tokenizer": str(hf)}, str(stage))
    assert req["staged_model"] == str(stage)
    assert sorted(p.name for p in stage.iterdir()) == ["config.json", "m.gguf", "tokenizer.json"]


def _driver(tmp_path: Path, request: dict | None) -> tuple[int, dict]:
    args = [sys.executable, str(vllm_engine.DRIVER)]
    if request is not None:
        (tmp_path / "req.json").write_text(json.dumps(request))
        args += [str(tmp_path / "req.json"), str(tmp_path / "resp.json")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    resp = tmp_path / "resp.json"
    return proc.returncode, json.loads(resp.read_text()) if resp.is_file() else {}


def test_driver_usage_and_unknown_op(tmp_path: Path) -> None:
    assert _driver(tmp_path, None) == (2, {})
    rc, answer = _driver(tmp_path, {"model": "/m", "tasks": [{"op": "train"}]})
    assert rc == 3 and answer["error"].startswith("unknown driver op 'train'")


@pytest.mark.skipif(vllm_engine.available(), reason="checks the path where vLLM is missing")
def test_run_without_vllm_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))
    with pytest.raises(SlimlmError, match=r"pip install 'slimlm\[vllm\]'"):
        vllm_engine.vllm_python()
    # a python without vLLM: the driver's own error comes back as one SlimlmError
    with pytest.raises(SlimlmError, match="vLLM could not run /m: ModuleNotFoundError"):
        vllm_engine.run("/m", [], python=sys.executable)


def test_vllm_python_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm_engine.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(SlimlmError, match="is not a file"):
        vllm_engine.vllm_python()
    monkeypatch.setenv(vllm_engine.ENV_VAR, sys.executable)
    assert vllm_engine.vllm_python() == sys.executable


def test_kernels_and_refusal_read_from_vllms_log() -> None:
    assert vllm_engine.kernels_from_log(LOG) == [
        "CPUWNA16LinearKernel for CompressedTensorsWNA16", "CPUWNA16LinearKernel for mixed-precision linear",
        "CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"]
    log = "Traceback (most recent call last):\n  File x\nValueError: Input size (100) not supported by CPUWNA16\n"
    assert vllm_engine.refusal_from_log(log) == "ValueError: Input size (100) not supported by CPUWNA16"
    assert vllm_engine.refusal_from_log("all fine") is None
    tp = ("(Worker_TP1 pid=7) ERROR 12-02 20:18:57 [multiproc_executor.py:953] ValueError: Weight "
          "input_size_per_partition=448 for layer 'o_proj' is not divisible by group_size=128.\n"
          "(EngineCore pid=6) ERROR 12-02 20:19:00 [core.py:1510] Exception: WorkerProc initialization failed due "
          "to an exception in a background process. See stack trace for root cause.\n"
          "RuntimeError: Engine core initialization failed. See root cause above.\n")
    assert vllm_engine.refusal_from_log(tp).startswith("ValueError: Weight input_size_per_partition=448")


def test_sse_stream_timing_and_round_figures() -> None:
    lines = [b'data: {"choices": [{"text": "a"}]}\n', b"\n", b'data: {"choices": [{"text": "b"}]}\n',
             b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n', b"data: [DONE]\n", b"data: junk\n"]
    clock = iter([1.0, 1.5]).__next__
    assert parse_sse(iter(lines), clock) == ([1.0, 1.5], 2)
    done = [{"ttft": 0.1, "gaps": [0.01, 0.03], "tokens": 3}, {"ttft": 0.3, "gaps": [0.02], "tokens": 2}]
    fig = round_figures(done, wall=2.0)
    assert fig["requests_per_s"] == 1.0 and fig["output_tok_s"] == 2.5
    assert fig["ttft_p50_ms"] == pytest.approx(200) and fig["itl_p50_ms"] == pytest.approx(20)
    s = summarize([fig, {**fig, "requests_per_s": 3.0}, {**fig, "requests_per_s": 2.0}])
    assert s["requests_per_s"] == 2.0 and s["intervals"]["requests_per_s"] == [1.0, 3.0]


def test_server_command_and_scored_half() -> None:
    cmd = server_command("/py", Target("x", Path("/m")), 8000, 400, tp=2)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and "--enforce-eager" in cmd
    row = [None] + [-float(i) for i in range(1, 8)]  # ctx 8: tokens 5..7 are scored
    assert scored_nll([row, row], 8).tolist() == [[5.0, 6.0, 7.0]] * 2
    with pytest.raises(SlimlmError, match="returned 3 prompt log-probs for a window of 8"):
        scored_nll([[None, -1.0, -2.0]], 8)


def test_check_states_vllm_cpu_w4a16_limits_in_vllms_words() -> None:
    assert vllm_cpu_w4a16_verdict(576, 1536, 64) == "ok"
    assert vllm_cpu_w4a16_verdict(100, 64, None).startswith("Input size (100) not supported by CPUWNA16")
    assert vllm_cpu_w4a16_verdict(64, 48, 32).startswith("Output size (48) not supported by CPUWNA16")
    assert vllm_cpu_w4a16_verdict(64, 64, 33).startswith("Group size (33) not supported by CPUWNA16")


def test_check_warns_where_vllm_cpu_ignores_static_activation_scales() -> None:
    from slimlm.quantize.schemes import vllm_cpu_static_acts_verdict

    assert vllm_cpu_static_acts_verdict([(100, 48)]) == "ok"  # oneDNN path: the static scale is used
    verdict = vllm_cpu_static_acts_verdict([(576, 576), (576, 1536), (100, 48)])
    assert verdict.startswith("2 of 3 Linears fit vLLM's CPU SGL int8 kernel") and "ignores input_scale" in verdict


def test_cli_refuses_vllm_options_it_cannot_honour(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "slimlm", "bench", str(tmp_path), "--backend", "vllm,torch-fp32"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "--backend vllm runs alone" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ vLLM itself (its own venv)
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not vllm_engine.available(),
                    reason=f"vLLM not found: set {vllm_engine.ENV_VAR} (benchmarks/vllm_venv.sh makes its venv)")
@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_vllm_serves_slimlm_output_with_slimlms_greedy_tokens(scheme: str, smollm2_hf_dir: Path,
                                                              tmp_path: Path) -> None:
    from slimlm.quantize.layers import quantize_model
    from slimlm.runtime import open_model
    from slimlm.runtime.generate import forward_logits

    out = tmp_path / scheme
    quantize_model(smollm2_hf_dir, out, scheme=scheme, method="rtn", group_size=64 if scheme == "w4a16" else "default")
    ids = [504, 1463, 282, 260, 7510, 1757, 5634, 281]  # "The history of the printing press begins in"
    answer = vllm_engine.greedy_tokens(out, [ids], 16)
    assert answer["quantization"] == "compressed-tensors"
    kernel = "CPUWNA16LinearKernel" if scheme == "w4a16" else "Int8ScaledMM"
    assert any(kernel in k for k in answer["kernels"]), answer["kernels"]
    net, _, _ = open_model(out, "native", with_tokenizer=False)
    theirs = answer["tokens"][0]
    # vLLM's greedy continuation, read by slimlm's own kernels: most tokens vLLM chose are slimlm's choice too,
    # and the rest within a bf16-sized logit margin of it (two bf16 engines: up to 0.75 logits seen on SmolLM2
    # W8A8 with AMX). Equal token ids are not asserted: a near tie flips with the kernel, the thread count or
    # AMX vs no AMX, and one flip changes every later token.
    logits = forward_logits(net, torch.tensor([ids + theirs]), logits_to_keep=len(theirs) + 1)[0, :-1].float()
    chosen = logits.gather(-1, torch.tensor(theirs)[:, None])[:, 0]
    gap = logits.max(-1).values - chosen
    assert float(gap.max()) <= 1.0 and int((gap == 0).sum()) >= 12, gap.tolist()


def test_recommend_measures_on_the_engine_asked_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from slimlm.recommend import engine_variants, engine_version

    assert {v.backend for v in engine_variants("llama.cpp", True)} == {"llama.cpp"}
    assert {v.kind for v in engine_variants("llama.cpp", True)} == {"gguf"}
    with pytest.raises(SlimlmError, match=r"slimlm\[llama\]"):
        engine_variants("llama.cpp", False)
    assert {v.backend for v in engine_variants("slimlm", True)} >= {"torch-fp32", "native", "gguf"}
    with pytest.raises(SlimlmError, match="unknown engine 'tgi'"):
        engine_variants("tgi", True)
    monkeypatch.setenv(vllm_engine.ENV_VAR, sys.executable)
    on_vllm = engine_variants("vllm", False)
    assert [v.name for v in on_vllm] == ["BF16", "W8A8 SmoothQuant", "W4A16 AWQ"]
    assert {v.backend for v in on_vllm} == {"vllm"}
    assert engine_version("slimlm").startswith("slimlm ")
    monkeypatch.setenv(vllm_engine.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(SlimlmError, match="is not a file"):
        engine_variants("vllm", False)


def test_server_processes_count_as_our_own_work_in_the_machine_watch() -> None:
    from slimlm.evaluate.noise import MachineWatch

    spent = iter([0.0, 5.0])  # our helper processes used 5 CPU seconds during the watch
    with MachineWatch(helpers_cpu=lambda: next(spent)) as watch:
        pass
    assert watch.load.own_cpu_s >= 5.0


def test_driver_errors_come_back_as_one_line() -> None:
    err = ValueError("1 validation error for VllmConfig\n  Value error, Total number of attention heads (9) must be "
                     "divisible by tensor parallel size (2). [type=value_error, input_value=...]\n    For more")
    assert vllm_driver.one_line(err) == ("ValueError: Total number of attention heads (9) must be divisible by "
                                         "tensor parallel size (2).")
    assert vllm_driver.one_line(RuntimeError("boom")) == "RuntimeError: boom"
