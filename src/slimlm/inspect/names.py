"""`slimlm explain`: what each part of a model name means, as people meet names on hubs and in Ollama.

Each recognized part of a name (family, variant, student, size, quantization, format) gets one plain sentence;
an unrecognized part is reported as unknown, never guessed. For catalog models the real parameter count, true
bits per weight (llama.cpp's per-tensor mix for GGUF types), file size and memory to run are computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gguf import GGMLQuantizationType as T

from slimlm.errors import SlimlmError
from slimlm.formats.gguf_mix import FTYPE_DEFAULT, type_bpw

if TYPE_CHECKING:
    from slimlm.inspect.catalog import CatalogEntry
    from slimlm.spec import ModelSpec

# ----------------------------------------------------------------------------------- quantizations

_GGUF_MIX_NOTE = {
    "Q2_K": "2-bit k-quant mix: most matrices Q2_K, attn_v and ffn_down Q3_K/Q4_K, output Q6_K",
    "Q3_K_S": "3-bit k-quant, small: nearly all matrices Q3_K, output Q6_K",
    "Q3_K_M": "3-bit k-quant, medium: attn_v, attn_output and ffn_down get Q4_K/Q5_K, output Q6_K",
    "Q3_K_L": "3-bit k-quant, large: attn_v, attn_output and ffn_down get Q5_K, output Q6_K",
    "Q4_K_S": "4-bit k-quant, small: Q4_K, with the first attn_v and ffn_down layers at Q5_K, output Q6_K",
    "Q4_K_M": "4-bit k-quant, medium: Q4_K, with half of the attn_v and ffn_down layers at Q6_K, output Q6_K",
    "Q5_K_S": "5-bit k-quant, small: Q5_K everywhere except the output (Q6_K)",
    "Q5_K_M": "5-bit k-quant, medium: Q5_K, with half of the attn_v and ffn_down layers at Q6_K, output Q6_K",
    "Q6_K": "6-bit k-quant: Q6_K everywhere",
    "Q8_0": "8-bit: blocks of 32 weights, each with one 16-bit scale",
    "Q4_0": "legacy 4-bit: blocks of 32 weights with one scale, output Q6_K",
    "Q4_1": "legacy 4-bit: blocks of 32 weights with a scale and a minimum, output Q6_K",
    "Q5_0": "legacy 5-bit: blocks of 32 weights with one scale, output Q6_K",
    "Q5_1": "legacy 5-bit: blocks of 32 weights with a scale and a minimum, output Q6_K",
    "F16": "16-bit floats (IEEE half): no quantization",
    "BF16": "16-bit bfloat16: no quantization, the format most models are trained and published in",
    "F32": "32-bit floats: no quantization, twice the size of the 16-bit original",
}


def _iq_note(name: str) -> str:
    return (f"i-quant {name}: weights coded with a lattice codebook at very low bits; llama.cpp needs an "
            "importance matrix (imatrix) from calibration text to make it well")


_16BIT = ["embeddings, lm_head and norms stay 16-bit"]
_ALIAS = {"FP16": "F16", "FP32": "F32", "FLOAT16": "F16", "FLOAT32": "F32", "BFLOAT16": "BF16", "HALF": "F16",
          "F8": "FP8", "FP8_DYNAMIC": "FP8"}
# scheme -> (format, sentence, nominal bits per weight, memory-model variant, what the name leaves unknown);
# all of them keep embeddings, lm_head and norms at 16 bits.
_NAMED_QUANTS: dict[str, tuple[str, str, float, str | None, list[str]]] = {
    "AWQ": ("AWQ", "Activation-aware Weight Quantization: 4-bit integer weights in groups of 128 with a 16-bit "
            "scale and a 4-bit zero point per group, scaled by activation statistics; activations stay 16-bit",
            4.156, "AWQ", []),
    "GPTQ": ("GPTQ", "GPTQ: 4-bit integer weights (usually groups of 128 with scales and zero points) whose "
             "rounding errors are corrected with second-order (Hessian) information; activations stay 16-bit",
             4.156, "GPTQ", ["bits and group size (the name does not say; 4-bit/128 is the common default)"]),
    "W8A8": ("compressed-tensors", "8-bit integer weights with one scale per output channel, and activations "
             "quantized to 8 bits per token at run time (int8 matrix multiplies)", 8.0, "W8A8", []),
    "W4A16": ("compressed-tensors", "4-bit integer weights in groups of 128 with one 16-bit scale per group; "
              "activations stay 16-bit", 4.125, "W4A16", []),
    "FP8": ("compressed-tensors", "8-bit floating-point (E4M3) weights with per-channel or block scales", 8.0, None,
            ["scale granularity"]),
}


@dataclass
class QuantInfo:
    scheme: str
    format: str  # "GGUF", "compressed-tensors", "AWQ", "GPTQ", "float", "unknown"
    sentence: str
    nominal_bits: float | None = None  # bits per weight of the base type, before the mix
    high_precision: list[str] = field(default_factory=list)
    variant: str | None = None  # the memory-model variant that sizes it (memory.normalize_variant)
    unknown: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "format": self.format, "sentence": self.sentence,
                "nominal_bits_per_weight": self.nominal_bits, "high_precision": list(self.high_precision),
                **({"unknown": list(self.unknown)} if self.unknown else {})}


def _bits(t: T) -> float:
    return round(type_bpw(t), 4)


def quant_info(token: str) -> QuantInfo | None:
    """Explain a quantization token (Q4_K_M, IQ2_XS, AWQ, W8A8, fp16, int4, ...); None if it is not one."""
    key = token.strip().upper().replace("-", "_")
    key = _ALIAS.get(key, key)
    if key in FTYPE_DEFAULT:
        base = FTYPE_DEFAULT[key]
        fmt = "float" if key in ("F16", "BF16", "F32") else "GGUF"
        sentence = _GGUF_MIX_NOTE.get(key) or (_iq_note(key) if key.startswith("IQ") else f"llama.cpp type mix {key}")
        high = [] if fmt == "float" else ["norms and other 1-D tensors stay F32",
                                           "the output matrix (and a tied embedding) get more bits (Q6_K or Q8_0)"]
        return QuantInfo(key, fmt, sentence, _bits(base), high, key)
    if key in _NAMED_QUANTS:
        fmt, sentence, bits, variant, unknown = _NAMED_QUANTS[key]
        return QuantInfo(key, fmt, sentence, bits, list(_16BIT), variant, unknown=list(unknown))
    m = re.fullmatch(r"W(\d+)A(\d+)(?:_?(FP8|INT8))?", key)
    if m:
        return QuantInfo(key, "compressed-tensors", f"{m.group(1)}-bit weights, {m.group(2)}-bit activations",
                         float(m.group(1)), [], None, unknown=["grouping and scale layout"])
    if key in ("INT4", "INT8", "4BIT", "8BIT"):
        bits = 4 if "4" in key else 8
        return QuantInfo(key, "unknown", f"{bits}-bit integer weights; the name does not say how they are grouped "
                         "or scaled, or which file format holds them", float(bits), [], None,
                         unknown=["grouping, scales and file format"])
    return None


_QUANT_TOKEN = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d(?:_[0-9A-Za-z]{1,3}){0,2}|BF16|FP16|FP32|F16|F32|FP8|INT4|INT8|AWQ|GPTQ|"
    r"W\d+A\d+(?:[-_]?(?:FP8|INT8))?|[48]BIT)(?![A-Za-z0-9])", re.IGNORECASE)

# ------------------------------------------------------------------------------------------- parts

_FAMILY_WORDS = {
    "deepseek": "DeepSeek: models from the Chinese lab DeepSeek-AI",
    "meta": "Meta: the company that publishes Llama",
    "r1": "R1: DeepSeek's first reasoning model, trained with reinforcement learning to think step by step "
          "before it answers (built on the DeepSeek-V3 architecture, 671B parameters, mixture of experts)",
    "v3": "V3: DeepSeek's 671B mixture-of-experts base model, with multi-head latent attention",
    "v2": "V2: DeepSeek's second mixture-of-experts generation, with multi-head latent attention",
    "qwen": "Qwen: Alibaba's model family",
    "llama": "Llama: Meta's open-weight model family",
    "smollm2": "SmolLM2: Hugging Face's family of small models (135M to 1.7B)",
    "mistral": "Mistral: Mistral AI's model family",
    "mixtral": "Mixtral: Mistral AI's mixture-of-experts models",
    "gemma": "Gemma: Google's open-weight model family",
    "phi": "Phi: Microsoft's small-model family",
}
_VARIANT_WORDS = {
    "zero": ("variant", "Zero: trained by reinforcement learning alone, with no supervised fine-tuning first "
                        "(a research model; readable answers were not the goal); make one with "
                        "`slimlm zero MODEL --task NAME -o DIR`"),
    "distill": ("variant", "Distill: a smaller student model fine-tuned on answers written by a bigger teacher; "
                           "it has the student's architecture, not the teacher's; make one with "
                           "`slimlm distill --method sequence` (a Zero teacher: --verifier answers)"),
    "instruct": ("variant", "Instruct: fine-tuned to follow instructions and chat, after pretraining"),
    "chat": ("variant", "Chat: fine-tuned for conversation"),
    "it": ("variant", "it: instruction-tuned (Google's word for Instruct)"),
    "base": ("variant", "Base: pretrained only, not tuned to follow instructions"),
    "math": ("variant", "Math: specialised by further training on mathematics"),
    "coder": ("variant", "Coder: specialised by further training on code"),
    "lite": ("variant", "Lite: a smaller sibling of the main model"),
}
_FORMAT_WORDS = {
    "gguf": "GGUF: the single-file format of llama.cpp (also used by Ollama and LM Studio); the quantization "
            "is named by a type such as Q4_K_M",
    "mlx": "MLX: the format of Apple's MLX framework for Apple-silicon Macs",
    "safetensors": "safetensors: Hugging Face's safe tensor file format",
    "hf": "HF: Hugging Face (transformers) format",
}
_SIZE = re.compile(r"^(?:(\d+)x)?(\d+(?:\.\d+)?)([bmkt])$", re.IGNORECASE)
_VERSION = re.compile(r"^v?\d+(?:\.\d+)*$", re.IGNORECASE)
_FAMILY_VERSION = re.compile(r"^(qwen|llama|smollm|gemma|phi|mistral)(\d+(?:\.\d+)?)$", re.IGNORECASE)


def _size_sentence(token: str) -> str | None:
    m = _SIZE.match(token)
    if not m:
        return None
    experts, num, unit = m.group(1), m.group(2), m.group(3).lower()
    word = {"b": "billion", "m": "million", "k": "thousand", "t": "trillion"}[unit]
    if experts:
        return (f"{token}: a mixture of {experts} experts of about {num} {word} parameters each (the total is "
                "smaller because attention is shared)")
    return f"{token}: about {num} {word} parameters, as the vendor labels it (labels are rounded; see parameters)"


@dataclass
class Part:
    text: str
    kind: str  # family, version, variant, student, size, quantization, format, ollama_tag, unknown
    meaning: str

    def to_dict(self) -> dict[str, str]:
        return {"text": self.text, "kind": self.kind, "meaning": self.meaning}


def split_name(name: str) -> tuple[str, list[Part], QuantInfo | None, list[str]]:
    """Split a name into parts; returns (model part of the name, parts, quantization, notes)."""
    raw = name.strip()
    if not raw:
        raise SlimlmError("explain needs a model name, e.g. DeepSeek-R1-Distill-Qwen-7B-Q4_K_M")
    notes: list[str] = []
    text = re.sub(r"\.gguf$", "-GGUF", raw, flags=re.IGNORECASE)
    if "/" in text:
        org, text = text.rsplit("/", 1)
        notes.append(f"{org}/ is the publisher's account on the Hub")
    tag = None
    if ":" in text:
        text, tag = text.split(":", 1)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", "-", text)  # 'Instruct.Q4_1' -> 'Instruct-Q4_1'; keep '2.5'

    quant = quant_text = None
    for m in _QUANT_TOKEN.finditer(text + (f"-{tag}" if tag else "")):
        info = quant_info(m.group(1))
        if info is not None:
            quant, quant_text = info, m.group(1)
    model_text = _QUANT_TOKEN.sub("", text).strip("-_ .")
    tokens = [t for t in re.split(r"[-_\s]+", model_text) if t]
    parts = [_classify(tok) for tok in tokens]
    if tag is not None:
        tag_rest = _QUANT_TOKEN.sub("", tag).strip("-_ ")
        parts.append(Part(f":{tag}", "ollama_tag", f":{tag}: an Ollama tag; "
                          + ("it picks the model size" if _SIZE.match(tag_rest.split("-")[0] or "") else
                             "it picks a variant of the model")))
    _mark_student(parts)
    if quant is not None and quant_text is not None:
        parts.append(Part(quant_text, "quantization", quant.sentence))
    model_name = "-".join(tokens)
    return model_name, parts, quant, notes


def _classify(tok: str) -> Part:
    low = tok.lower()
    if low in _FAMILY_WORDS:
        return Part(tok, "family", _FAMILY_WORDS[low])
    m = _FAMILY_VERSION.match(tok)
    if m and m.group(1).lower() in _FAMILY_WORDS:
        return Part(tok, "family", f"{_FAMILY_WORDS[m.group(1).lower()]}, generation {m.group(2)}")
    if low in _VARIANT_WORDS:
        kind, sentence = _VARIANT_WORDS[low]
        return Part(tok, kind, sentence)
    if low in _FORMAT_WORDS:
        return Part(tok, "format", _FORMAT_WORDS[low])
    size = _size_sentence(tok)
    if size:
        return Part(tok, "size", size)
    if _VERSION.match(tok):
        return Part(tok, "version", f"{tok}: the version of the family before it")
    return Part(tok, "unknown", f"{tok}: not recognised")


def _mark_student(parts: list[Part]) -> None:
    """In 'X-Distill-Qwen-7B' the family word after Distill names the student's architecture."""
    for i, part in enumerate(parts):
        if part.text.lower() == "distill" and i + 1 < len(parts) and parts[i + 1].kind == "family":
            student = parts[i + 1]
            student.kind = "student"
            student.meaning = (f"{student.text}: the student — this model is a {student.text} architecture "
                               "network, fine-tuned on the teacher's outputs")


# ----------------------------------------------------------------------------------------- explain

def _catalog_entry(model_name: str, parts: list[Part]):
    """The catalog entry a name refers to, trying the name, then without Instruct/Base/Chat words."""
    from slimlm.inspect import catalog

    if not model_name:
        return None, None
    tag = next((p.text[1:] for p in parts if p.kind == "ollama_tag"), None)
    if tag:
        for candidate in (f"{model_name}:{tag}", f"{model_name}:{re.split(r'[-_]', tag)[0]}"):
            entry = catalog.find(candidate)
            if entry is not None:
                return entry, f"Ollama's {model_name}:{tag} is {entry.name}"
    entry = catalog.find(model_name)
    if entry is not None:
        return entry, None
    stripped = "-".join(p.text for p in parts if p.kind not in ("variant", "format", "ollama_tag", "quantization")
                        or p.text.lower() in ("distill", "zero", "math", "coder"))
    if stripped and stripped != model_name:
        entry = catalog.find(stripped)
        if entry is not None:
            dropped = [p.text for p in parts if p.kind == "variant" and p.text.lower() in ("instruct", "chat", "base", "it")]
            return entry, (f"parameters are those of {entry.name}: the {'/'.join(dropped)} variant of a model has "
                           "the same architecture and size") if dropped else None
    return None, None


def explain(name: str, *, context: int = 4096, batch: int = 1) -> dict[str, Any]:
    """Explain a model name: parts, family, variant, parameters, quantization, file size and memory."""
    model_name, parts, quant, notes = split_name(name)
    entry, entry_note = _catalog_entry(model_name, parts)
    if entry_note:
        notes.append(entry_note)
    out: dict[str, Any] = {"input": name, "parts": [p.to_dict() for p in parts], "notes": notes}
    unknown = [p.text for p in parts if p.kind == "unknown"]
    family = next((p.text for p in parts if p.kind == "family"), None)
    out["family"] = entry.family if entry else family
    out["variant"] = _variant(parts, entry, family)
    out["architecture"] = entry.architecture if entry else None
    spec = _explain_parameters(out, parts, entry, model_name, unknown)
    if quant is not None:
        out.update(_explain_quant(quant, spec, context, batch))
        unknown += quant.unknown
    else:
        out["quantization"] = None
        if spec is not None:
            out.update(_original_size(spec, entry, parts, notes, context, batch))
    if not parts:
        raise SlimlmError(f"nothing to explain in {name!r}")
    out["unknown"] = unknown
    out["summary"] = _summary(out)
    return out


def _variant(parts: list[Part], entry: CatalogEntry | None, family: str | None) -> dict[str, Any] | None:
    """What the variant words (Instruct, Distill, Zero, Base) say about how the model was trained."""
    words = {p.text.lower() for p in parts if p.kind in ("variant", "student")}
    if "zero" in words:
        return {"kind": "zero", "meaning": "trained by reinforcement learning alone (no supervised fine-tuning)"}
    if "distill" in words:
        student = next((p.text for p in parts if p.kind == "student"), None)
        variant = {"kind": "distill", "teacher": entry.teacher if entry and entry.teacher else
                   (family if family and family.lower() != "deepseek" else None),
                   "student_architecture": entry.architecture if entry else student,
                   "student_base": entry.student_base if entry else None}
        if entry is None and "r1" in {p.text.lower() for p in parts}:
            variant["teacher"] = "DeepSeek-R1"
        variant["meaning"] = (f"{variant['teacher'] or 'a teacher model'} distilled into a "
                              f"{variant['student_architecture'] or 'student (architecture unknown)'} student"
                              + (f" ({variant['student_base']})" if variant.get("student_base") else ""))
        return variant
    if entry is not None and entry.teacher:
        return {"kind": "distill", "teacher": entry.teacher, "student_architecture": entry.architecture,
                "student_base": entry.student_base,
                "meaning": f"{entry.teacher} distilled into a {entry.architecture} student ({entry.student_base})"}
    if "instruct" in words or "chat" in words or "it" in words:
        return {"kind": "instruct", "meaning": "instruction-tuned"}
    if "base" in words:
        return {"kind": "base", "meaning": "pretrained only"}
    return None


def _explain_parameters(out: dict[str, Any], parts: list[Part], entry: CatalogEntry | None,
                        model_name: str | None, unknown: list[str]) -> ModelSpec | None:
    """Fill out["model"] and out["parameters"] (counted when the catalog knows the model); its ModelSpec or None."""
    from slimlm.inspect.params import count_spec, size_label
    from slimlm.spec import ModelSpec

    labels = [p.text for p in parts if p.kind == "size"]
    params: dict[str, Any] = {"name_label": labels[0] if labels else (entry.label if entry else None)}
    spec = None
    if entry is not None:
        spec = ModelSpec.from_config(entry.config)
        count = count_spec(spec)
        params.update(count=count.total, label=size_label(count.total), billions=round(count.total / 1e9, 2),
                      catalog_name=entry.name, tied_embeddings=count.tied_embeddings)
        if count.active is not None:
            params.update(active=count.active, active_billions=round(count.active / 1e9, 1))
        params["note"] = _label_note(entry.label, count.total, spec)
        if count.mtp:
            out["notes"].append(f"the checkpoint also stores a multi-token-prediction module ({count.mtp / 1e9:.1f}B "
                                "parameters) used only for speculative decoding; counts and sizes here leave it out, "
                                "as llama.cpp does")
        out["model"] = entry.name
    else:
        params.update(count=None, label=None,
                      note="the model is not in the built-in catalog, so its exact size is unknown" if model_name
                      else "the name names no model")
        out["model"] = None
        if model_name:
            unknown.append(f"model {model_name!r} (not in the catalog)")
    out["parameters"] = params
    return spec


def _sizes(est: Any, context: int, batch: int) -> dict[str, Any]:
    """File size and memory to run, from an estimate_memory result."""
    file_bytes = est.file_bytes if est.file_bytes is not None else est.weights.bytes
    return {"estimated_file_bytes": file_bytes, "estimated_file_gb": round(file_bytes / 1e9, 2),
            "memory": {"context": context, "batch": batch, "weights_bytes": est.weights.bytes,
                       "kv_cache_bytes": est.kv.bytes, "overhead_bytes": est.overhead,
                       "total_bytes": est.total, "total_gib": round(est.total / 2**30, 2)}}


def _explain_quant(quant: QuantInfo, spec: ModelSpec | None, context: int, batch: int) -> dict[str, Any]:
    """The quantization the name gives, with sizes when the model is known (else the mix's nominal bits)."""
    from slimlm.inspect.memory import estimate_memory

    q = quant.to_dict()
    sizes: dict[str, Any] = {}
    if spec is not None and quant.variant is not None:
        est = estimate_memory(spec, quant.variant, context=context, batch=batch)
        q["bits_per_weight"] = round(est.weights.bits_per_weight, 2)
        q["types"] = est.weights.type_counts
        q["high_precision"] = est.weights.high_precision
        sizes = _sizes(est, context, batch)
    else:
        q["bits_per_weight"] = quant.nominal_bits
        if quant.format == "GGUF":
            q["bits_per_weight_note"] = ("bits of the mix's main type; a whole file averages more because "
                                         "some tensors get more bits (name a known model to compute it)")
    return {**sizes, "quantization": q}


def _original_size(spec: ModelSpec, entry: CatalogEntry | None, parts: list[Part], notes: list[str], context: int,
                   batch: int) -> dict[str, Any]:
    """No quantization in the name: sizes of the original weights as published (BF16, or FP8 where so)."""
    from slimlm.inspect.memory import estimate_memory

    qc = (entry.config.get("quantization_config") or {}) if entry is not None else {}
    original = "FP8" if qc.get("quant_method") == "fp8" else "BF16"
    notes.append(f"the name gives no quantization; sizes below are for the {original} original"
                 + (" (FP8 weights with 128x128-block scales, as published)" if original == "FP8" else ""))
    est = estimate_memory(spec, original, context=context, batch=batch)
    if any(p.kind == "ollama_tag" for p in parts):
        q4 = estimate_memory(spec, "Q4_K_M", context=context, batch=batch)
        notes.append(f"Ollama's tags without a quantization download a Q4_K_M GGUF (about "
                     f"{q4.file_bytes / 1e9:.2f} GB, {q4.total / 2**30:.2f} GiB to run at context {context})")
    return _sizes(est, context, batch)


def _label_note(label: str, total: int, spec: Any) -> str:
    from slimlm.inspect.params import size_label

    actual = size_label(total)
    if actual == label:
        return f"labelled {label}; it has {total / 1e9:.2f}B parameters" if total >= 1e9 else f"labelled {label}; it has {total / 1e6:.1f}M parameters"
    note = f"labelled {label} but has {total / 1e9:.2f}B parameters"
    if not spec.tie_word_embeddings:
        tied_total = total - spec.vocab_size * spec.hidden_size
        if size_label(tied_total) == label or tied_total / 1e9 < float(label.rstrip("B")) + 0.1:
            note += (f": its input embedding and output matrices are untied (stored separately, "
                     f"{spec.vocab_size * spec.hidden_size / 1e9:.2f}B each); with them tied it would have "
                     f"{tied_total / 1e9:.2f}B")
    return note


def _summary(out: dict[str, Any]) -> str:
    bits = []
    if out.get("model"):
        bits.append(out["model"])
    v = out.get("variant") or {}
    if v.get("kind") == "distill":
        bits.append(f"({v.get('meaning')})")
    p = out.get("parameters") or {}
    if p.get("count"):
        n = p["count"]
        bits.append(f"{n / 1e9:.2f}B parameters" if n >= 1e9 else f"{n / 1e6:.1f}M parameters")
    q = out.get("quantization")
    if q:
        bits.append(f"{q['scheme']} at {q.get('bits_per_weight')} bits per weight")
    if out.get("estimated_file_gb"):
        bits.append(f"file about {out['estimated_file_gb']} GB")
    if not out.get("model"):
        bits = [p["text"] for p in out["parts"] if p["kind"] in ("family", "version", "size", "variant", "student")]
        bits = ["-".join(bits)] if bits else []
        if q:
            bits.append(f"{q['scheme']} at about {q.get('bits_per_weight')} bits per weight")
    return ", ".join(bits) if bits else "nothing recognised"
