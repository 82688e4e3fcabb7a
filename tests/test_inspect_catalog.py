"""The built-in catalog: computed totals against the counts each model publishes, vendor-style labels, lookup."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.inspect import catalog, inspect
from slimlm.inspect.params import active_label, count_spec, size_label
from slimlm.spec import ModelSpec

# Published totals, typed here from the model cards / the Hub's safetensors parameter counts.
PUBLISHED = {
    "DeepSeek-R1": 671e9,
    "DeepSeek-R1-Zero": 671e9,
    "DeepSeek-R1-Distill-Qwen-1.5B": 1.78e9,
    "DeepSeek-R1-Distill-Qwen-7B": 7.62e9,
    "DeepSeek-R1-Distill-Llama-8B": 8.03e9,
    "DeepSeek-R1-Distill-Qwen-14B": 14.8e9,
    "DeepSeek-R1-Distill-Qwen-32B": 32.8e9,
    "DeepSeek-R1-Distill-Llama-70B": 70.6e9,
    "SmolLM2-135M": 134_515_008,
    "SmolLM2-360M": 362e6,
    "SmolLM2-1.7B": 1.71e9,
    "Llama-3.1-8B": 8.03e9,
    "Qwen2.5-7B": 7.61e9,
}


def test_catalog_has_every_required_model():
    assert {e.name for e in catalog.entries()} == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_total_within_half_a_percent_of_published(name):
    report = inspect(name)
    assert abs(report.total_params / PUBLISHED[name] - 1) < 0.005, report.total_params
    entry = catalog.lookup(name)
    assert abs(report.total_params / entry.published["total_params"] - 1) < 0.005


@pytest.mark.parametrize("name", ["DeepSeek-R1", "DeepSeek-R1-Zero"])
def test_deepseek_r1_active_and_mtp(name):
    report = inspect(name)
    assert abs(report.params.active / 37e9 - 1) < 0.02
    # DeepSeek's own weight notes: 36.6B activated including the 0.9B output head; MTP: 11.5B unique.
    assert abs(report.params.active / 36.6e9 - 1) < 0.002
    assert report.params.active_with_embeddings - report.params.active == 129280 * 7168
    unique_mtp = report.params.mtp - report.params.mtp_shared_copies
    assert abs(unique_mtp / 11.5e9 - 1) < 0.02
    assert report.params.mtp_shared_copies == 2 * 129280 * 7168
    assert report.spec.is_mla and report.spec.kv_lora_rank == 512 and len(report.spec.moe_layers) == 58


def test_exact_counts_of_checkpoints_that_publish_them():
    assert inspect("SmolLM2-135M").total_params == 134_515_008
    assert inspect("Llama-3.1-8B").total_params == 8_030_261_248
    assert inspect("deepseek-r1:1.5b").total_params == 1_777_088_000
    assert inspect("Qwen2.5-7B").params.roles["embeddings"] == 152064 * 3584


@pytest.mark.parametrize("entry", catalog.entries(), ids=lambda e: e.name)
def test_catalog_configs_build_the_same_count_in_transformers(entry):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in entry.config.items() if k not in ("quantization_config", "architectures")}
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    state = model.state_dict()
    stored = sum(t.numel() for name, t in state.items() if not (hf_config.tie_word_embeddings and name == "lm_head.weight"))
    assert count_spec(ModelSpec.from_config(entry.config)).total == stored


@pytest.mark.parametrize("n, label", [
    (134_515_008, "135M"), (361_821_120, "360M"), (494_032_768, "495M"), (1_543_714_304, "1.5B"),
    (1_711_376_384, "1.7B"), (1_777_088_000, "1.7B"), (7_615_616_512, "7B"), (8_030_261_248, "8B"),
    (14_770_033_664, "14B"), (32_763_876_352, "32B"), (70_553_706_496, "70B"), (671_026_419_200, "671B"),
    (1_000_000_000, "1B"), (2_000_000_000_000, "2T"),
])
def test_size_labels_as_vendors_write_them(n, label):
    assert size_label(n) == label


def test_active_labels_round():
    assert active_label(36_625_618_432) == "37B" and active_label(2_690_000_000) == "2.7B"


def test_lookup_is_case_insensitive_with_aliases():
    assert catalog.lookup("DEEPSEEK-R1").name == "DeepSeek-R1"
    assert catalog.lookup("deepseek-r1:14b").name == "DeepSeek-R1-Distill-Qwen-14B"
    assert catalog.lookup("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B").name == "DeepSeek-R1-Distill-Qwen-7B"
    assert catalog.lookup("smollm2_135m").name == "SmolLM2-135M"
    assert catalog.find("gpt-5") is None
    distill = catalog.lookup("deepseek-r1:70b")
    assert distill.student_base == "Llama-3.3-70B-Instruct" and distill.teacher == "DeepSeek-R1"


def test_unknown_name_suggests_close_names():
    with pytest.raises(SlimlmError, match="did you mean SmolLM2-"):
        catalog.lookup("smollm2-1.5b")
    with pytest.raises(SlimlmError, match="'llama-3.2-1b' is neither an existing path nor a model"):
        inspect("llama-3.2-1b")
