"""Calibration spread over two processes (gloo on CPU, started as torchrun starts them: RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment) writes the same bytes as one process over the same batches."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from slimlm.quantize.layers import quantize_model
from slimlm.util.process import free_port
from slimlm.writers import synthetic

# GPTQ (Gram matrices), AWQ (Gram and mean |x|), SmoothQuant (max |x|): every statistic that is reduced
METHODS = (("w4a16", "gptq"), ("w4a16", "awq"), ("w8a8", "smoothquant"))
_RANK = """
import sys, torch
from slimlm.quantize.layers import quantize_model
ids = torch.load(sys.argv[3])
for scheme, method in (m.split(":") for m in sys.argv[4:]):
    quantize_model(sys.argv[1], f"{sys.argv[2]}-{method}", scheme=scheme, method=method, calib=ids, batch_size=2,
                   threads=1)
"""


def _digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def test_two_gloo_processes_write_what_one_writes(tmp_path: Path) -> None:
    config = synthetic.qwen2_config(hidden=64, layers=2, ffn=128, heads=4, kv_heads=2, vocab=256)
    src = synthetic.write_checkpoint(tmp_path / "m", config, seed=7)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    for scheme, method in METHODS:
        quantize_model(src, tmp_path / f"one-{method}", scheme=scheme, method=method, calib=ids, batch_size=2,
                       threads=1)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(src), str(tmp_path / "two"), str(tmp_path / "ids.pt"),
                               *(f"{s}:{m}" for s, m in METHODS)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    for _, method in METHODS:
        assert _digest(tmp_path / f"two-{method}") == _digest(tmp_path / f"one-{method}"), method
        assert (tmp_path / f"two-{method}" / "config.json").read_text() == \
            (tmp_path / f"one-{method}" / "config.json").read_text()


_KILLED = """
import os, sys, torch
from slimlm.quantize.layers import quantize_model
def progress(done, total, item):
    if item == "layer 1":
        os._exit(9)  # a hard kill after two of four layers: no cleanup runs
quantize_model(sys.argv[1], sys.argv[2], scheme="w4a16", method="awq", calib=torch.load(sys.argv[3]), batch_size=2,
               threads=1, resume=True, progress=progress)
"""


def test_killed_resumable_run_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    config = synthetic.qwen2_config(hidden=64, layers=4, ffn=128, heads=4, kv_heads=2, vocab=256)
    src = synthetic.write_checkpoint(tmp_path / "m", config, seed=8)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    kw = dict(scheme="w4a16", method="awq", calib=ids, batch_size=2, threads=1)
    quantize_model(src, tmp_path / "whole", **kw)
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(src), str(tmp_path / "out"), str(tmp_path / "ids.pt")],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert killed.returncode == 9 and not (tmp_path / "out").exists()
    state = json.loads((tmp_path / "out.partial" / "state.json").read_text())
    assert state["layers_done"] == 2
    notes: list[str] = []
    result = quantize_model(src, tmp_path / "out", resume=True, say=notes.append, **kw)
    assert any("layers 0-1 were finished" in n for n in notes)
    assert [r["layer"] for r in result.layer_reports] == [0, 1, 2, 3]
    assert _digest(tmp_path / "out") == _digest(tmp_path / "whole")
    assert (tmp_path / "out" / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()
    assert not (tmp_path / "out.partial").exists()


_EXIT = """
import torch, torch.distributed as dist
from slimlm.quantize import distributed
share = distributed.current()
t = torch.ones(1000)
for _ in range(20):
    dist.all_reduce(t)
distributed.barrier(share)
"""


def test_group_set_up_by_slimlm_exits_cleanly() -> None:
    """A gloo group left to the interpreter's exit aborted about one process pair in four (exit -6, "terminate
    called without an active exception"); eight pairs in a row all exit 0 only if slimlm tears its group down."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for _ in range(8):
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, "-c", _EXIT], stderr=subprocess.PIPE,
                                  env={**env, "MASTER_PORT": port, "RANK": str(r)}) for r in range(2)]
        codes = [p.wait(timeout=120) for p in procs]
        assert codes == [0, 0], [p.stderr.read().decode()[-300:] for p in procs]
