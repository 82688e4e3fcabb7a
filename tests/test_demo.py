"""slimlm demo: the quick candidate set and the up-front sentence (the full run is measured in BENCHMARKS.md)."""

from slimlm.demo import QUICK, SITUATIONS, plan


def test_demo_says_what_it_will_do_and_how_long():
    variants, text = plan(full=False, cores=2)
    assert [v.name for v in variants] == [n for n in [v.name for v in plan(True, 2)[0]] if n in QUICK]
    assert len(variants) == 4 and len(plan(True, 2)[0]) == 9
    assert text.startswith("demo: 4 variants of SmolLM2-135M-Instruct (FP32 (original), W8A8 SmoothQuant, Q8_0, Q4_K_M)")
    assert "about 3 min on 2 cores from a cold cache" in text and "--full measures all variants" in text
    assert "about 2 min on 4 cores" in plan(False, cores=4)[1]
    # the small-device situation leaves a real choice among the quick set: Q8_0 and Q4_K_M fit 600 MiB, FP32 not
    assert SITUATIONS[-1] == {"goal": "quality", "memory": "600MiB", "context": 4096}
