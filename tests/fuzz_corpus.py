"""The malformed-input corpus of the fuzz suite, and a capped runner of slimlm's CLI over it (also used by
benchmarks/bench_fuzz.py for the must-show table).

Cases are built from real files: a tiny random Llama HF dir (safetensors + byte tokenizer) and the GGUF slimlm
writes from it. Every case is a model path that is malformed in one way: truncations at every structural
boundary, each numeric header field set to 0, -1, its maximum and a lie about the file, hostile JSON, configs with
missing, wrong-typed or absurd fields, and pickle weights that would create a marker file if ever unpickled. The
GGUF walker here is independent of slimlm's reader on purpose: the reader is what is being tested.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMANDS = ("inspect", "eval", "quantize --to", "quantize --scheme", "quantize --check")
# Commands that read calibration or evaluation text, run on the bad text files of ``data_cases``.
DATA_COMMANDS = ("eval --data", "quantize --to --calib", "quantize --scheme --calib", "imatrix --calib",
                 "distill --data", "distill cache-teacher --data", "recommend --data", "recommend --calib")
WHOLE_TEXT = ("distill cache-teacher --data", "recommend --data", "recommend --calib")  # not given the huge line
MEMORY_CAP = 6 * 2**30  # RLIMIT_AS of a worker (torch + transformers map ~3 GiB of address space on import)
CASE_SECONDS = 20  # per-case time cap
MARKER = "PICKLE_EXECUTED"


@dataclass
class Case:
    """One malformed input; ``data_ok`` marks inputs whose header is whole and only tensor data is missing,
    which inspect (header-only by design) may report on with a warning instead of refusing."""

    name: str
    path: str
    data_ok: bool = False
    tokenizer: str | None = None
    model: str | None = None  # data cases: the (valid) model the bad text is given to


# ------------------------------------------------------------------------------------------ base files

def make_bases(root: Path) -> dict[str, Path]:
    """The tiny HF dir (random Llama, byte tokenizer) and its Q8_0 GGUF; built by slimlm's own writers."""
    from slimlm.quantize.gguf import quantize_gguf

    hf = make_tiny_model(root / "base-hf")
    gguf = root / "base.gguf"
    quantize_gguf(hf, "Q8_0", gguf)
    return {"hf": hf, "gguf": gguf, "text": _text(root)}


def make_tiny_model(path: Path) -> Path:
    """The tiny random Llama with a byte tokenizer every case starts from."""
    sys.path.insert(0, str(HERE))
    from conftest import make_byte_tokenizer, make_tiny_llama

    make_tiny_llama(path, hidden=32, ffn=64, heads=4, kv_heads=2, vocab=258)
    make_byte_tokenizer(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    return path


def _text(root: Path) -> Path:
    path = root / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


# ------------------------------------------------------------------------------------------ GGUF fields

# Metadata values that size the model: 0, -1, max and a lie are each invalid (the others may be anything).
SIZE_KEYS = ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.vocab_size")


@dataclass
class Field:
    pos: int
    width: int  # bytes
    what: str


def gguf_fields(data: bytes) -> tuple[list[Field], list[int]]:
    """Every numeric field of a little-endian GGUF header (position, width, meaning) and the structural
    boundaries (start of each entry, data start, each tensor's data start)."""
    fields = [Field(4, 4, "version"), Field(8, 8, "n_tensors"), Field(16, 8, "n_kv")]
    bounds = [0, 4, 8, 16, 24]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(pos: int, what: str) -> int:
        fields.append(Field(pos, 8, f"{what} length"))
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]

    def value(pos: int, vtype: int, key: str) -> int:
        if vtype in sizes:
            if key in SIZE_KEYS:  # other values (token ids, rope base, eps) may take any value in a valid file
                fields.append(Field(pos, sizes[vtype], f"{key} value"))
            return pos + sizes[vtype]
        if vtype == 8:
            return string(pos, f"{key} string")
        itype, count = struct.unpack_from("<IQ", data, pos)
        fields.append(Field(pos, 4, f"{key} item type"))
        fields.append(Field(pos + 4, 8, f"{key} item count"))
        pos += 12
        for _ in range(count):  # items are data, not structure
            pos = pos + sizes[itype] if itype in sizes else pos + 8 + struct.unpack_from("<Q", data, pos)[0]
        return pos

    for _ in range(n_kv):
        bounds.append(pos)
        key_len = struct.unpack_from("<Q", data, pos)[0]
        key = data[pos + 8:pos + 8 + key_len].decode()
        pos = string(pos, f"kv {key} key")
        fields.append(Field(pos, 4, f"{key} type"))
        pos = value(pos + 4, struct.unpack_from("<I", data, pos)[0], key)
    offsets = []
    for _ in range(n_tensors):
        bounds.append(pos)
        name_len = struct.unpack_from("<Q", data, pos)[0]
        name = data[pos + 8:pos + 8 + name_len].decode()
        pos = string(pos, f"tensor {name} name")
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.append(Field(pos, 4, f"tensor {name} n_dims"))
        for d in range(n_dims):
            fields.append(Field(pos + 4 + 8 * d, 8, f"tensor {name} dim {d}"))
        pos += 4 + 8 * n_dims
        fields.append(Field(pos, 4, f"tensor {name} type"))
        fields.append(Field(pos + 4, 8, f"tensor {name} offset"))
        offsets.append(struct.unpack_from("<Q", data, pos + 4)[0])
        pos += 12
    bounds.append(pos)
    data_start = (pos + 31) // 32 * 32
    bounds += [data_start + o for o in offsets] + [len(data) - 1]
    return fields, sorted(set(bounds))


def _mutations(width: int, current: int, file_size: int) -> dict[str, int]:
    top = 2 ** (8 * width)
    return {"0": 0, "-1": top - 1, "max": top // 2 - 1, "lie": min(file_size + 1, top - 1), "+1": (current + 1) % top}


def gguf_cases(base: Path, out: Path, rng: random.Random, per_field: int = 2) -> list[Case]:
    data = base.read_bytes()
    fields, bounds = gguf_fields(data)
    cases: list[Case] = []

    def add(name: str, blob: bytes, data_ok: bool = False) -> None:
        path = out / f"{name}.gguf"
        path.write_bytes(blob)
        cases.append(Case(name, str(path), data_ok))

    header_end = bounds[-len(bounds)]
    for b in bounds:
        for cut in {b - 1, b, b + 1} - {len(data)}:
            if 0 <= cut < len(data):
                add(f"gguf-cut-{cut}", data[:cut], data_ok=cut >= _data_start(data))
    del header_end
    for f in fields:
        current = int.from_bytes(data[f.pos:f.pos + f.width], "little")
        muts = _mutations(f.width, current, len(data))
        if f.what.endswith(" type") and not f.what.startswith("tensor "):
            del muts["+1"]  # UINT32 -> INT32 holds the same small value: a valid file
        muts = {label: value for label, value in muts.items() if value != current}  # a no-op is no case
        for label in rng.sample(sorted(muts), per_field) if per_field < len(muts) else sorted(muts):
            blob = bytearray(data)
            blob[f.pos:f.pos + f.width] = muts[label].to_bytes(f.width, "little")
            add(f"gguf-{f.what.replace(' ', '_').replace('.', '_')}={label}", bytes(blob))
    return cases + _gguf_specials(data, fields, out)


def _data_start(data: bytes) -> int:
    fields, bounds = gguf_fields(data)
    offsets = [f for f in fields if f.what.endswith("offset")]
    last = offsets[-1].pos + 8
    return (last + 31) // 32 * 32


def _gguf_specials(data: bytes, fields: list[Field], out: Path) -> list[Case]:
    """The hand-made cases of the issue: alignment 0, huge block_count, zero-sized and duplicate tensors, and
    a metadata array nested deeper than any parser's stack."""
    import gguf

    cases = []

    def add(name: str, blob: bytes) -> None:
        path = out / f"{name}.gguf"
        path.write_bytes(blob)
        cases.append(Case(name, str(path)))

    def field(what: str) -> Field:
        return next(f for f in fields if f.what == what)

    block = field("llama.block_count value")
    for value in (0, 10**9, 2**32 - 1):
        blob = bytearray(data)
        struct.pack_into("<I", blob, block.pos, value)
        add(f"gguf-block_count-{value}", bytes(blob))
    for key, value in (("llama.embedding_length", 10**9), ("llama.attention.head_count", 0),
                       ("llama.attention.head_count", 5), ("llama.vocab_size", 2**32 - 1)):
        f = next((f for f in fields if f.what == f"{key} value"), None)
        if f is not None:
            blob = bytearray(data)
            blob[f.pos:f.pos + f.width] = value.to_bytes(f.width, "little")
            add(f"gguf-{key}-{value}", bytes(blob))
    # general.alignment 0 / 3 / 2^31: a new file with the key written by gguf's own writer
    for align in (0, 3, 2**31):
        add(f"gguf-alignment-{align}", _with_kv(data, "general.alignment", gguf.GGUFValueType.UINT32, align))
    names = [f for f in fields if f.what.endswith(" name length")]
    # duplicate tensor names: a tensor renamed to an earlier one of the same name length
    lengths = [struct.unpack_from("<Q", data, f.pos)[0] for f in names]
    i, j = next((i, j) for j in range(len(names)) for i in range(j) if lengths[i] == lengths[j])
    blob = bytearray(data)
    blob[names[j].pos + 8:names[j].pos + 8 + lengths[j]] = data[names[i].pos + 8:names[i].pos + 8 + lengths[i]]
    add("gguf-duplicate-tensor", bytes(blob))
    dims = [f for f in fields if f.what.endswith("dim 1")]
    blob = bytearray(data)
    struct.pack_into("<Q", blob, dims[0].pos, 0)
    add("gguf-zero-dim", bytes(blob))
    blob = bytearray(data)
    struct.pack_into("<Q", blob, dims[0].pos, 2**31)
    add("gguf-dims-product-overflow", bytes(blob))
    # a metadata array of arrays nested 100,000 deep
    nested = struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQ", 4, 0)
    add("gguf-nested-array", _with_raw_kv(data, "fuzz.nested", 9, nested))
    # a version 1 and a big-endian lie
    blob = bytearray(data)
    struct.pack_into("<I", blob, 4, 1)
    add("gguf-version-1", bytes(blob))
    add("gguf-magic-only", b"GGUF")
    add("gguf-empty", b"")
    return cases


def _with_raw_kv(data: bytes, key: str, vtype: int, raw: bytes) -> bytes:
    """The file with one more metadata entry (appended after the last one; tensor offsets are relative to the
    aligned data start, so the data block is re-aligned)."""
    fields, _ = gguf_fields(data)
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    first_tensor = next(f for f in fields if f.what.endswith(" name length")).pos
    entry = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + raw
    start = _data_start(data)
    table_end = next(f for f in reversed(fields) if f.what.endswith("offset")).pos + 8
    head = data[:16] + struct.pack("<Q", n_kv + 1) + data[24:first_tensor] + entry + data[first_tensor:table_end]
    return head + b"\0" * (-len(head) % 32) + data[start:]


def _with_kv(data: bytes, key: str, vtype, value: int) -> bytes:
    return _with_raw_kv(data, key, int(vtype), struct.pack("<I", value))


# ------------------------------------------------------------------------------------ safetensors

def safetensors_cases(base_dir: Path, out: Path, rng: random.Random) -> list[Case]:
    original = (base_dir / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", original, 0)
    header = json.loads(original[8:8 + n])
    payload = original[8 + n:]
    cases: list[Case] = []

    def add(name: str, blob: bytes, data_ok: bool = False) -> None:
        folder = out / name
        shutil.copytree(base_dir, folder)
        (folder / "model.safetensors").write_bytes(blob)
        cases.append(Case(name, str(folder), data_ok))

    def with_header(h: object, raw: bytes | None = None, length: int | None = None) -> bytes:
        text = raw if raw is not None else json.dumps(h).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text) if length is None else length) + text + payload

    quotes = [i for i in range(8, 8 + n) if original[i:i + 1] == b'"']
    bounds = {0, 4, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1, len(original) - 1}
    bounds |= set(rng.sample(quotes, min(12, len(quotes))))
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry:
            bounds.add(8 + n + entry["data_offsets"][0] + 1)
    for cut in sorted(bounds):
        add(f"st-cut-{cut}", original[:cut], data_ok=cut >= 8 + n)
    for label, length in (("0", 0), ("-1", 2**64 - 1), ("max", 2**63 - 1), ("lie", len(original)),
                          ("short", n - 5), ("1", 1)):
        add(f"st-header_len={label}", struct.pack("<Q", length) + original[8:])
    names = [k for k in header if k != "__metadata__"]
    victim = rng.choice(names)
    entry = header[victim]
    begin, end = entry["data_offsets"]
    for label, change in (
            ("dtype=XX", {"dtype": "XX"}), ("dtype=int", {"dtype": 7}), ("shape=neg", {"shape": [-1, 4]}),
            ("shape=float", {"shape": [32.5, 2]}), ("shape=str", {"shape": "32"}), ("shape=huge", {"shape": [2**40, 2**40]}),
            ("shape=max", {"shape": [2**63 - 1]}), ("shape=zero", {"shape": [0, 32]}), ("shape=lie", {"shape": [32, 33]}),
            ("shape=deep", {"shape": [1] * 10_000}), ("offsets=rev", {"data_offsets": [end, begin]}),
            ("offsets=past", {"data_offsets": [begin + 10**9, end + 10**9]}), ("offsets=neg", {"data_offsets": [-4, end]}),
            ("offsets=one", {"data_offsets": [begin]}), ("offsets=max", {"data_offsets": [begin, 2**64]}),
            ("entry=list", None)):
        h = json.loads(json.dumps(header))
        h[victim] = [1, 2] if change is None else {**entry, **change}
        add(f"st-{label}", with_header(h))
    other = rng.choice([k for k in names if k != victim])
    h = json.loads(json.dumps(header))
    h[victim] = {**entry, "data_offsets": header[other]["data_offsets"], "shape": header[other]["shape"],
                 "dtype": header[other]["dtype"]}
    add("st-overlap", with_header(h))
    h = {k: v for k, v in header.items() if k == "__metadata__"}
    add("st-no-tensors", with_header(h, length=None)[:8 + len(json.dumps(h)) + (-len(json.dumps(h)) % 8)])
    add("st-missing-tensor", with_header({k: v for k, v in header.items() if k != victim}))
    add("st-json-list", with_header([1, 2, 3]))
    add("st-not-json", with_header(None, raw=b"{not json"))
    add("st-not-utf8", with_header(None, raw=b'{"\xff\xfe": 1}'))
    add("st-nested", with_header(None, raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    dup = json.dumps(header)[:-1] + ", " + json.dumps(victim) + ": " + json.dumps(entry) + "}"
    add("st-duplicate-name", with_header(None, raw=dup.encode()))
    add("st-metadata-list", with_header({**header, "__metadata__": [1]}))
    add("st-empty", b"")
    return cases


# ----------------------------------------------------------------------------------------- configs

def config_cases(base_dir: Path, out: Path) -> list[Case]:
    config = json.loads((base_dir / "config.json").read_text())
    cases: list[Case] = []

    def add(name: str, text: str | bytes) -> None:
        folder = out / name
        shutil.copytree(base_dir, folder)
        path = folder / "config.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        cases.append(Case(name, str(folder)))

    add("cfg-not-json", "{this is not json")
    add("cfg-list", "[1, 2, 3]")
    add("cfg-empty-object", "{}")
    add("cfg-empty-file", "")
    add("cfg-binary", bytes(range(256)))
    add("cfg-nested", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    add("cfg-model_type-unknown", json.dumps({**config, "model_type": "gpt-zzz", "architectures": ["Zzz"]}))
    add("cfg-model_type-int", json.dumps({**config, "model_type": 7}))
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size",
                "model_type"):
        bad = {k: v for k, v in config.items() if k != key}
        if key == "model_type":
            bad.pop("architectures", None)
        add(f"cfg-missing-{key}", json.dumps(bad))
    values = {"str": "576", "float": 576.5, "null": None, "true": True, "list": [576], "object": {"a": 1},
              "zero": 0, "neg": -1, "absurd": 10**9, "huge": 10**12, "max": 2**63, "exp": "1e9"}
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "head_dim", "max_position_embeddings"):
        for label, value in values.items():
            if value is None and key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
                continue  # null means "the default" for these
            add(f"cfg-{key}={label}", json.dumps({**config, key: value}))
    add("cfg-heads-not-dividing-hidden", json.dumps({**config, "num_attention_heads": 5, "num_key_value_heads": 5}))
    add("cfg-kv-not-dividing-heads", json.dumps({**config, "num_key_value_heads": 3}))
    add("cfg-hidden-lies-about-weights", json.dumps({**config, "hidden_size": 64}))
    add("cfg-vocab-lies-about-weights", json.dumps({**config, "vocab_size": 1000}))
    add("cfg-layers-lie-about-weights", json.dumps({**config, "num_hidden_layers": 3}))
    add("cfg-rope_theta-str", json.dumps({**config, "rope_theta": "big"}))
    add("cfg-torch_dtype-bogus", json.dumps({**config, "torch_dtype": "float7"}))
    add("cfg-tie-str", json.dumps({**config, "tie_word_embeddings": "yes"}))
    add("cfg-layer_types-wrong-length", json.dumps({**config, "layer_types": ["full"]}))
    return cases


# ----------------------------------------------------------------------------------------- pickles

class _Boom:
    """Unpickling this runs ``open(marker, 'w')``: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_cases(base_dir: Path, out: Path, marker: Path) -> list[Case]:
    blob = pickle.dumps({"model.embed_tokens.weight": _Boom(str(marker))})
    cases = []
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        path = out / f"weights{suffix}"
        path.write_bytes(blob)
        cases.append(Case(f"pickle-file{suffix}", str(path)))
    folder = out / "pickle-dir"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / name, folder / name)
    (folder / "pytorch_model.bin").write_bytes(blob)
    cases.append(Case("pickle-dir", str(folder)))
    disguised = out / "disguised.safetensors"
    disguised.write_bytes(blob)
    cases.append(Case("pickle-as-safetensors", str(disguised)))
    disguised = out / "disguised.gguf"
    disguised.write_bytes(blob)
    cases.append(Case("pickle-as-gguf", str(disguised)))
    return cases


def build_corpus(root: Path, seed: int = 0, per_field: int = 2) -> tuple[list[Case], dict[str, Path]]:
    """Every case, under ``root``; returns (cases, bases)."""
    rng = random.Random(seed)
    bases = make_bases(root)
    corpus = root / "corpus"
    corpus.mkdir()
    cases = gguf_cases(bases["gguf"], corpus, rng, per_field)
    for case in cases:
        case.tokenizer = str(bases["hf"])
    cases += safetensors_cases(bases["hf"], corpus, rng)
    cases += config_cases(bases["hf"], corpus)
    cases += pickle_cases(bases["hf"], corpus, root / MARKER)
    cases.append(Case("missing-path", str(root / "no-such-model")))
    empty = corpus / "empty-dir"
    empty.mkdir()
    cases.append(Case("empty-dir", str(empty)))
    return cases, bases


def data_cases(model: Path, out: Path) -> list[Case]:
    """Bad calibration/evaluation text: missing, empty, a folder, binary garbage, non-UTF-8 (Latin-1 and a UTF-16
    file with its BOM), a JSONL that is not JSON or holds no text; and a huge single line (1 MiB, no newline),
    which is valid text: a command may use it (exit 0, within the time cap) or refuse it in one line. Commands
    whose work grows with the whole text by design (`recommend` measures nine variants, `cache-teacher` runs the
    teacher over every token) are not run on it (:data:`WHOLE_TEXT`)."""
    out.mkdir(parents=True, exist_ok=True)
    m = str(model)

    def add(name: str, content: bytes | None, suffix: str = ".txt", data_ok: bool = False) -> Case:
        path = out / f"{name}{suffix}"
        if content is not None:
            path.write_bytes(content)
        return Case(f"data-{name}{suffix}", str(path), data_ok, model=m)

    folder = out / "a-folder"
    folder.mkdir(exist_ok=True)
    (folder / "text.txt").write_text("text inside a folder " * 20)
    rng = random.Random(18)
    return [add("missing", None), add("empty", b""), add("blank", b" \n\n\t \n"),
            Case("data-folder", str(folder), model=m),
            add("binary", bytes(rng.randrange(256) for _ in range(65536)), ".bin"),
            add("binary-nul-ascii", b"text\0" * 4096), add("latin1", "caf\xe9 na\xefve r\xe9sum\xe9 ".encode("latin-1") * 200),
            add("utf16", ("UTF-16 text with a BOM. " * 200).encode("utf-16")),
            add("not-json", b"{not json\n" * 10, ".jsonl"), add("empty", b"", ".jsonl"),
            add("no-text-field", b'{"n": 1}\n' * 10, ".jsonl"),
            add("huge-line", b"abcdefgh" * (1 << 17), data_ok=True)]


# ------------------------------------------------------------------------------------------- running

def argv_for(command: str, case: Case, text: Path, out: Path) -> list[str]:
    if command in DATA_COMMANDS:
        return data_argv(command, case, text, out)
    if command == "inspect":
        return ["inspect", case.path]
    if command == "eval":
        return ["eval", case.path, "--data", str(text), "--ctx", "32", "--chunks", "1"] + (
            ["--tokenizer", case.tokenizer] if case.tokenizer else [])
    if command == "quantize --to":
        return ["quantize", case.path, "--to", "Q8_0", "-o", str(out / "out.gguf")]
    if command == "quantize --scheme":
        return ["quantize", case.path, "--scheme", "w8a16", "-o", str(out / "out-ct")]
    return ["quantize", case.path, "--check"]


def data_argv(command: str, case: Case, text: Path, out: Path) -> list[str]:
    """The bad text given to one command, with settings that keep a run on valid text to a few seconds."""
    m, d = case.model or "", case.path
    return {
        "eval --data": ["eval", m, "--data", d, "--ctx", "32", "--chunks", "1"],
        "quantize --to --calib": ["quantize", m, "--to", "Q8_0", "--calib", d, "--calib-chunks", "1", "-o",
                                  str(out / "out.gguf")],
        "quantize --scheme --calib": ["quantize", m, "--scheme", "w8a16", "--method", "gptq", "--calib", d,
                                      "--samples", "2", "--seq-len", "32", "-o", str(out / "out-ct")],
        "imatrix --calib": ["imatrix", m, "--calib", d, "--chunks", "1", "--ctx", "32", "-o", str(out / "im.gguf")],
        "distill --data": ["distill", "--teacher", m, "--data", d, "--out", str(out / "run"), "--prune-layers", "1",
                           "--steps", "1", "--seq-len", "32", "--batch-size", "1", "--alpha", "1",
                           "--eval-every", "0"],
        "distill cache-teacher --data": ["distill", "cache-teacher", "--teacher", m, "--data", d, "-o",
                                         str(out / "cache.safetensors"), "--seq-len", "32", "--top-k", "2",
                                         "--eval-sequences", "1"],
        "recommend --data": ["recommend", m, "--memory", "4GiB", "--data", d, "--calib", str(text)],
        "recommend --calib": ["recommend", m, "--memory", "4GiB", "--data", str(text), "--calib", d],
    }[command]


@dataclass
class Outcome:
    case: str
    command: str
    exit: int | str  # an exit code, or "timeout"
    stderr: str
    seconds: float
    traceback: bool = False
    left_behind: list[str] = field(default_factory=list)
    input_changed: bool = False
    data_ok: bool = False


def hash_tree(path: str) -> str:
    """One hash of a file or every file under a folder (names and bytes)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.exists() else []
    for q in files:
        h.update(str(q.relative_to(p.parent)).encode())
        h.update(q.read_bytes())
    return h.hexdigest()


def peak_rss_kib() -> int:
    """This process's own peak RSS (VmHWM; ru_maxrss would include the parent's peak, which survives exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_worker(jobs_path: str, results_path: str) -> None:
    """Run each job in this process (the CLI's own main, stderr captured), each under a time cap."""
    import contextlib
    import io
    import signal

    from slimlm.cli import run as cli_run

    class _Timeout(BaseException):
        pass

    def alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    jobs = json.loads(Path(jobs_path).read_text())
    with open(results_path, "w") as results:
        for job in jobs:
            out = Path(job["out"])
            out.mkdir(parents=True, exist_ok=True)
            before = hash_tree(job["case"]["path"])
            err, std = io.StringIO(), io.StringIO()
            start = time.perf_counter()
            signal.alarm(job["seconds"])
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
                    code: int | str = cli_run(job["argv"])
            except _Timeout:
                code = "timeout"
            finally:
                signal.alarm(0)
            text = err.getvalue()
            outcome = Outcome(job["case"]["name"], job["command"], code, text.strip(), time.perf_counter() - start,
                              traceback="Traceback" in text or "Traceback" in std.getvalue(),
                              left_behind=sorted(p.name for p in out.iterdir()) if code != 0 else [],
                              input_changed=hash_tree(job["case"]["path"]) != before, data_ok=job["case"]["data_ok"])
            shutil.rmtree(out, ignore_errors=True)
            results.write(json.dumps(asdict(outcome)) + "\n")
            results.flush()
        results.write(json.dumps({"peak_rss_kib": peak_rss_kib()}) + "\n")


def run_batch(cases: list[Case], commands: tuple[str, ...], work: Path, text: Path, *, seconds: int = CASE_SECONDS,
              memory: int = MEMORY_CAP, total_timeout: float = 900) -> tuple[list[Outcome], int]:
    """Run every (case, command) in one subprocess capped at ``memory`` bytes of address space; returns the
    outcomes and the worker's peak RSS (KiB). Jobs a crashed worker did not reach are rerun in a new one."""
    pairs = [(c, cmd) for cmd in commands for c in cases if not (c.data_ok and cmd in WHOLE_TEXT)]
    jobs = [{"case": asdict(c), "command": cmd, "argv": argv_for(cmd, c, text, work / "out" / f"{i}"),
             "out": str(work / "out" / f"{i}"), "seconds": seconds} for i, (c, cmd) in enumerate(pairs)]
    outcomes: list[Outcome] = []
    peak = 0
    while jobs:
        jobs_path, results_path = work / "jobs.json", work / "results.jsonl"
        jobs_path.write_text(json.dumps(jobs))

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)]),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", "import sys, fuzz_corpus; fuzz_corpus.run_worker(*sys.argv[1:])",
                               str(jobs_path), str(results_path)], env=env, preexec_fn=cap, capture_output=True,
                              text=True, timeout=total_timeout)
        lines = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
        done = [Outcome(**r) for r in lines if "case" in r]
        peak = max([peak] + [r["peak_rss_kib"] for r in lines if "peak_rss_kib" in r])
        outcomes += done
        jobs = jobs[len(done):]
        if jobs:  # the worker died on this job (a crash is an outcome too), go on after it
            job = jobs.pop(0)
            outcomes.append(Outcome(job["case"]["name"], job["command"], f"crash {proc.returncode}",
                                    proc.stderr.strip()[-300:], 0.0, traceback=True))
    return outcomes, peak


def verdict(o: Outcome) -> str:
    """clean (exit 2, one line), accepted (exit 0 on a header-only command reading a data-truncated file),
    or the failure: traceback, timeout, crash, multi-line, unexpected-success, internal-error."""
    if o.exit == "timeout":
        return "timeout"
    if isinstance(o.exit, str):
        return "crash"
    if o.traceback:
        return "traceback"
    if o.exit == 2:
        errors = [line for line in o.stderr.splitlines() if line.startswith("error:")]
        return "clean" if len(errors) == 1 else "multi-line"
    if o.exit == 0:
        if o.data_ok and o.command in DATA_COMMANDS:
            return "accepted"  # valid (if odd) text, used within the time cap
        if o.data_ok and o.command in ("inspect", "quantize --check"):
            return "accepted"  # header-only commands on a file whose header is whole
        if o.command == "inspect" and "warning:" in o.stderr:
            return "warned"  # inspect reports what it can from the tensor table, saying what it could not read
        return "unexpected-success"
    return "internal-error"
