"""Outputs that survive faults, the quantize writers' own cases (the kill loops, full disk, concurrent runs and
read-only folders of every writer are in tests/test_faults_runs.py): `-o` equal to the input, a GGUF re-quantized
onto itself included, is refused with the input untouched; a run killed while swapping dirs loses nothing."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import fault_runs as fr


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _leftovers(folder: Path, out: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}."))


def test_output_equal_to_input_is_refused(tmp_path):
    import slimlm.cli  # noqa: F401 - imported before the children fork

    model, _ = fr.tiny_inputs(tmp_path)
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    before = _digest(copy)
    gguf = tmp_path / "in.gguf"
    code, err, _ = fr.run(["quantize", str(copy), "--to", "Q8_0", "-o", str(gguf)], tmp_path / "make.log")
    assert code == 0, err
    gguf_before = _digest(gguf)
    cases = [(copy, ["--scheme", "w8a16"], copy), (copy, ["--scheme", "w8a16"], copy / "sub"),
             (gguf, ["--to", "Q8_0"], gguf)]
    for i, (source, args, out) in enumerate(cases):
        code, err, _ = fr.run(["quantize", str(source), *args, "-o", str(out), "--overwrite"], tmp_path / f"{i}.log")
        assert fr.clean_refusal(code, err) and "would overwrite the input" in err, err
    assert _digest(copy) == before and _digest(gguf) == gguf_before


def test_a_run_killed_while_swapping_dirs_restores_the_previous_output(tmp_path):
    """Killed between moving the old output aside and moving the new one in: the next run puts the previous
    complete output back (and removes the dead run's half-written temporary)."""
    from slimlm.writers.atomic import publish, remove_stale, temp_dir

    done = subprocess.Popen(["true"])
    done.wait()  # a pid that is no longer alive
    out = tmp_path / "out-ct"
    old = tmp_path / f".out-ct.{done.pid}.old.tmp"
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    (tmp_path / f".out-ct.{done.pid}.tmp").mkdir()
    remove_stale(out)
    assert (out / "model.safetensors").read_text() == "previous" and _leftovers(tmp_path, out) == []
    new = temp_dir(out)
    (new / "model.safetensors").write_text("new")
    publish(new, out, overwrite=True)
    assert (out / "model.safetensors").read_text() == "new" and _leftovers(tmp_path, out) == []
