"""Our type plan must equal, tensor for tensor, what llama.cpp's quantizer writes.

The oracle is the llama.cpp bundled with llama-cpp-python: we quantize with ``llama_model_quantize`` and read
every tensor's type back with ``gguf.GGUFReader``.
"""

import ctypes
import functools
import logging
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
import gguf  # noqa: E402

from slimlm.formats.gguf_mix import ArchFacts, PlanTensor, plan_types  # noqa: E402

pytestmark = pytest.mark.llamacpp

MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
         "Q4_0", "Q5_1", "F16", "F32"]
# Q4_1/Q5_0 follow the same rules as Q4_0/Q5_1 and BF16 as F16 (all checked by hand, omitted for time).
# IQ4_NL/IQ4_XS/IQ3_S/IQ3_M also agree (checked by hand) but take llama.cpp ~30 s each on SmolLM2.


def llama_quantize(src: Path, dst: Path, ftype: str, overrides: list[tuple[str, int]] = (),
                   imatrix: Path | None = None) -> None:
    """Run llama.cpp's quantizer (requantizing allowed), quietly; ``imatrix`` (either file form) is handed over
    as llama-quantize --imatrix does: each tensor's per-column importance."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if ftype == "F32" else f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, qtype) in enumerate(overrides):
            arr[i].pattern, arr[i].type = pattern.encode(), int(qtype)
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if imatrix is not None:
        from slimlm.quantize.imatrix import read_imatrix

        im = read_imatrix(imatrix)
        names = sorted(im.entries)
        keep = [np.ascontiguousarray(im.importance(n), dtype=np.float32) for n in names]  # alive for the call
        data = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        for i, (name, values) in enumerate(zip(names, keep)):
            data[i].name, data[i].size = name.encode(), values.size
            data[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        data[len(names)].name = None
        params.imatrix = ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama.cpp failed to quantize {src} to {ftype}"


def read_types(path: Path) -> dict[str, gguf.GGMLQuantizationType]:
    from slimlm.checkpoint.gguf_file import read_gguf  # header-only: faster than GGUFReader

    return {t.name: gguf.GGMLQuantizationType[t.ggml_type] for t in read_gguf(path)[0]}


@functools.lru_cache(maxsize=4)
def tensor_list(path: Path) -> tuple[list[PlanTensor], ArchFacts]:
    reader = gguf.GGUFReader(path)
    tensors = [PlanTensor(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type) for t in reader.tensors]
    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def u32(key: str, default: int = 0) -> int:
        field = reader.fields.get(f"{arch_name}.{key}")
        return int(field.parts[field.data[0]][0]) if field else default

    arch = ArchFacts(u32("block_count"), u32("attention.head_count"), u32("attention.head_count_kv"),
                     u32("expert_count"), arch_name)
    return tensors, arch


def assert_same_plan(src: Path, quantized: Path, ftype: str, **kw) -> None:
    tensors, arch = tensor_list(src)
    ours = plan_types(tensors, arch, ftype, **kw)
    theirs = read_types(quantized)
    assert set(ours) == set(theirs)
    diff = {k: (theirs[k].name, ours[k].name) for k in theirs if theirs[k] != ours[k]}
    assert not diff, f"{ftype}: llama.cpp vs ours differ on {len(diff)} tensors, e.g. {list(diff.items())[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("ftype", MIXES)
def test_smollm2_plan_and_file_size_equal_llama_cpp(smollm2_gguf, tmp_path, ftype):
    out = tmp_path / f"smollm2-{ftype}.gguf"
    llama_quantize(smollm2_gguf, out, ftype)
    assert_same_plan(smollm2_gguf, out, ftype)
    # File size: from the GGUF's tensor list and metadata, and from the config alone (SmolLM2-135M's
    # catalog entry, metadata estimated from the vocabulary size): both within 2% of llama.cpp's file.
    from slimlm.inspect import catalog
    from slimlm.inspect.memory import estimate_memory
    from slimlm.spec import ModelSpec

    real = out.stat().st_size
    tensors, _ = tensor_list(smollm2_gguf)
    spec = ModelSpec.from_config(catalog.lookup("SmolLM2-135M").config)
    from_file = estimate_memory(spec, ftype, tensors=tensors, metadata_bytes=source_metadata_bytes(smollm2_gguf))
    from_config = estimate_memory(spec, ftype)
    assert abs(from_file.file_bytes / real - 1) < 0.02
    assert abs(from_config.file_bytes / real - 1) < 0.02


@pytest.mark.slow
def test_smollm2_overrides_equal_llama_cpp(smollm2_gguf, tmp_path):
    T = gguf.GGMLQuantizationType
    rules = [(r"blk\.[0-4]\.ffn_down", T.Q8_0), ("attn_q", T.Q4_K)]
    out = tmp_path / "smollm2-override.gguf"
    llama_quantize(smollm2_gguf, out, "Q4_K_M", overrides=rules)
    assert_same_plan(smollm2_gguf, out, "Q4_K_M", overrides=rules)


@functools.lru_cache(maxsize=1)
def source_metadata_bytes(path: Path) -> int:
    from slimlm.inspect.memory import gguf_metadata_bytes

    return gguf_metadata_bytes(str(path))


def write_synthetic_llama(path: Path, *, layers: int, hidden: int, heads: int, kv: int, ffn: int,
                          n_expert: int = 0, tied: bool = False) -> Path:
    """A random llama-architecture GGUF (F32) with the shapes we want llama.cpp's rules to see."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_file_type(0)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        w.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))

    hd = hidden // heads
    add("token_embd.weight", 64, hidden)
    add("output_norm.weight", hidden)
    if not tied:
        add("output.weight", 64, hidden)
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", hidden)
        add(b + "ffn_norm.weight", hidden)
        add(b + "attn_q.weight", heads * hd, hidden)
        add(b + "attn_k.weight", kv * hd, hidden)
        add(b + "attn_v.weight", kv * hd, hidden)
        add(b + "attn_output.weight", hidden, heads * hd)
        if n_expert:
            add(b + "ffn_gate_inp.weight", n_expert, hidden)
            add(b + "ffn_gate_exps.weight", n_expert, ffn, hidden)
            add(b + "ffn_up_exps.weight", n_expert, ffn, hidden)
            add(b + "ffn_down_exps.weight", n_expert, hidden, ffn)
        else:
            add(b + "ffn_gate.weight", ffn, hidden)
            add(b + "ffn_up.weight", ffn, hidden)
            add(b + "ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SYNTHETIC = {
    # GQA 8, untied output, 16 layers: the attn_v rules that need n_gqa >= 4, use_more_bits patterns.
    "gqa8-untied": (dict(layers=16, hidden=256, heads=8, kv=1, ffn=512),
                    ["Q2_K", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M"]),
    # 8 experts: Mixtral's special cases (attn_v/attn_k to Q8_0, attn_output to Q5_K), layer from the name.
    "moe8": (dict(layers=8, hidden=256, heads=8, kv=2, ffn=256, n_expert=8), ["Q2_K", "Q3_K_M", "Q4_K_M"]),
    # 80 layers with GQA: llama.cpp treats it as a 70B and bumps attn_v.
    "llama70b-shape": (dict(layers=80, hidden=256, heads=8, kv=1, ffn=256, tied=True), ["Q3_K_S", "Q4_K_M"]),
}


@pytest.mark.parametrize("model", SYNTHETIC)
def test_synthetic_plans_equal_llama_cpp(tmp_path, model):
    shape, mixes = SYNTHETIC[model]
    src = write_synthetic_llama(tmp_path / "src.gguf", **shape)
    for ftype in mixes:
        out = tmp_path / f"{ftype}.gguf"
        llama_quantize(src, out, ftype)
        assert_same_plan(src, out, ftype)
