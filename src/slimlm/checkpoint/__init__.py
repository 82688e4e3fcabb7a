"""Open model checkpoints lazily: HF dirs (single or sharded safetensors), .safetensors, .gguf, config.json.

Only headers and JSON are read on opening, so a 700 GB checkpoint opens in milliseconds and a partial download
opens too (with a warning); tensors are then mapped one at a time. Pickle weights are refused: they can run code.
slimlm's one reader: GGUF header (gguf_file), safetensors header (safetensors_header), HF<->GGUF names (names).

    from slimlm.checkpoint import open_checkpoint
    ckpt = open_checkpoint("path/to/model")   # Checkpoint(format=..., tensors=[TensorInfo...], config=...)
    w = ckpt.load_array("model.layers.0.mlp.down_proj.weight")   # float32
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimlm.checkpoint import fp8
from slimlm.checkpoint.gguf_file import config_from_gguf, read_gguf_header
from slimlm.checkpoint.safetensors_header import read_safetensors_header
from slimlm.checkpoint.types import Checkpoint, TensorInfo
from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    import torch

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint", "read_config", "read_state_dict", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_JSON_BYTES = 50_000_000
_INDEX_NAME = "model.safetensors.index.json"


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a model file or folder from its headers only; bad input raises a one-line SlimlmError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SlimlmError(f"{path} does not exist")
    if path.is_dir():
        return _open_dir(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise SlimlmError(f"{path}: pickle weights ({path.suffix}) are refused because loading them can run arbitrary "
                          "code; use a safetensors or GGUF export of this model")
    if suffix == ".safetensors":
        return _open_safetensors_files(path, [path], "safetensors", _config_in(path.parent))
    if suffix == ".gguf" or _has_gguf_magic(path):
        return _open_gguf(path)
    if suffix == ".json":
        return Checkpoint(path=path, format="config", config=read_config(path))
    raise SlimlmError(f"{path}: unrecognised file type (expected .safetensors, .gguf, config.json or a model dir)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a complete checkpoint, as private torch copies in their stored dtypes, in safetensors'
    own key order (file by file, names sorted): writers that follow the dict's order write the same bytes."""
    ckpt = open_checkpoint(path)
    if not ckpt.tensors:
        raise SlimlmError(f"{path} holds no .safetensors file")
    ckpt.check_complete()
    return {t.name: ckpt.load_torch(t) for t in sorted(ckpt.tensors, key=lambda t: (t.file or "", t.name))}


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict; unreadable or non-object JSON is a user error."""
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise SlimlmError(f"{path}: too large for a config file ({path.stat().st_size} bytes)")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SlimlmError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SlimlmError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    except RecursionError:
        raise SlimlmError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise SlimlmError(f"{path}: expected a JSON object")
    return data


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _config_in(folder: Path) -> dict[str, Any] | None:
    candidate = folder / "config.json"
    return read_config(candidate) if candidate.is_file() else None


def _open_dir(path: Path) -> Checkpoint:
    config = _config_in(path)
    index = path / _INDEX_NAME
    files = (_shards_from_index(index) if index.is_file()
             else sorted(p for p in path.glob("*.safetensors") if p.is_file()))
    if files:
        if config is None:
            raise SlimlmError(f"{path}: has safetensors weights but no config.json")
        return _open_safetensors_files(path, files, "hf-dir", config)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1 and config is None:
        return _open_gguf(ggufs[0])
    if len(ggufs) > 1 and config is None:
        names = ", ".join(p.name for p in ggufs[:5])
        raise SlimlmError(f"{path}: holds several GGUF files ({names}); name the one to inspect")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise SlimlmError(f"{path}: only pickle weights ({', '.join(pickles[:3])}) which slimlm refuses to load "
                          "because they can run arbitrary code; use a safetensors or GGUF export")
    if config is None:
        raise SlimlmError(f"{path}: no config.json and no .safetensors or .gguf weights in this folder")
    return Checkpoint(path=path, format="config", config=config)


def _shards_from_index(index: Path) -> list[Path]:
    data = read_config(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise SlimlmError(f"{index}: no valid weight_map")
    files = []
    for name in sorted(set(weight_map.values())):
        shard = (index.parent / name)
        if Path(name).name != name:
            raise SlimlmError(f"{index}: shard name {name!r} is not a plain file name")
        if not shard.is_file():
            raise SlimlmError(f"{index}: lists shard {name} which is not in the folder (incomplete download?)")
        files.append(shard)
    return files


def _open_safetensors_files(path: Path, files: list[Path], fmt: str, config: dict[str, Any] | None) -> Checkpoint:
    ckpt = Checkpoint(path=path, format=fmt, config=config)  # type: ignore[arg-type]
    seen: set[str] = set()
    for file in files:
        tensors, _meta, expected, actual = read_safetensors_header(file)
        for t in tensors:
            if t.name in seen:
                raise SlimlmError(f"{file}: tensor {t.name!r} appears in more than one shard")
            seen.add(t.name)
        ckpt.tensors.extend(tensors)
        ckpt.file_bytes += actual
        _note_missing(ckpt, file, expected, actual)
    ckpt.fp8_block = fp8.block_size(config)
    if ckpt.fp8_block is not None:
        ckpt.fp8_scales = fp8.pair_scales(ckpt.tensors, ckpt.fp8_block, str(path))
    return ckpt


def _open_gguf(path: Path) -> Checkpoint:
    header = read_gguf_header(path)
    tensors, metadata, expected, actual = header.tensors, header.metadata(), header.data_end, header.file_size
    ckpt = Checkpoint(path=path, format="gguf", tensors=tensors, gguf_metadata=metadata, file_bytes=actual,
                      gguf_header=header)
    try:
        ckpt.config = config_from_gguf(metadata, tensors)
    except (TypeError, ValueError, AttributeError):
        ckpt.config = None  # metadata values of the wrong type: fall back to the tensor table
    if ckpt.config is None:
        ckpt.warnings.append(f"GGUF architecture {metadata.get('general.architecture')!r} has no config mapping; "
                             "counts come from the tensor table only")
    _note_missing(ckpt, path, expected, actual)
    return ckpt


def _note_missing(ckpt: Checkpoint, file: Path, expected: int, actual: int) -> None:
    if actual < expected:
        missing = expected - actual
        ckpt.missing_bytes += missing
        ckpt.warnings.append(f"{file.name}: tensor data is {missing:,} bytes short of what its header describes "
                             f"({actual:,} of {expected:,} bytes; a partial download?); inspected from the header")
