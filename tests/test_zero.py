"""Zero (GRPO from rewards alone): rewards on hand-written completions, seeded disjoint task splits, a tiny-model
GRPO run that changes the weights and resumes bit-identically, and the CLI's one-line errors."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.zero.evaluate import paired_difference
from slimlm.zero.rewards import accuracy_reward, extract_answer, format_reward
from slimlm.zero.tasks import TASKS, Countdown, Problem, Task, get_task, split_of
from slimlm.zero.template import Template

pytest.importorskip("trl")


@pytest.mark.parametrize("response, accuracy, fmt", [
    ("The sum is 130.", 1.0, 0.0),  # right answer, wrong format
    ("<think>52 plus 78</think> <answer>131</answer>", 0.0, 1.0),  # right format, wrong answer
    ("<think>52 + 78 = 130</think>\n<answer>130</answer>", 1.0, 1.0),  # both
    ("I think it is 129", 0.0, 0.0),  # neither
    ("<think>a</think><answer>130</answer><answer>1</answer>", 0.0, 0.0),  # two answers: the last one counts
])
def test_rewards_on_hand_written_completions(response: str, accuracy: float, fmt: float) -> None:
    problem = Problem("What is 52 + 78?", "130", {"expression": "52 + 78"})
    assert accuracy_reward(get_task("arithmetic"), problem, response) == accuracy
    assert format_reward(response) == fmt


def test_countdown_verifier_uses_each_number_once() -> None:
    task = Countdown(1)
    problem = Problem("...", "(13 * 7) + 9", {"numbers": [13, 9, 7], "target": 100})
    assert task.check(problem, "13*7+9")
    assert task.check(problem, "9 + 7 * 13 = 100")
    assert not task.check(problem, "13*7+9+0")  # an extra number
    assert not task.check(problem, "100")  # no numbers of the puzzle
    assert not task.check(problem, "13*7+8")
    assert not task.check(problem, "__import__('os')")  # never evaluated
    assert accuracy_reward(task, problem, "<think>x</think><answer>(13*7)+9</answer>") == 1.0


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("difficulty", [1, 3])
def test_generators_are_seeded_and_splits_disjoint(name: str, difficulty: int) -> None:
    task = get_task(name, difficulty)
    train = task.problems(300, "train", seed=0)
    assert [p.question for p in train] == [p.question for p in get_task(name, difficulty).problems(300, "train", 0)]
    assert [p.question for p in train] != [p.question for p in task.problems(300, "train", seed=1)]
    held = task.problems(100, "heldout", seed=0) + task.problems(100, "heldout", seed=7)
    train_keys = {task.key(p) for p in train + task.problems(300, "train", seed=1)}
    assert not train_keys & {task.key(p) for p in held}
    assert all(split_of(task.name, task.key(p)) == "heldout" for p in held)
    assert all(task.check(p, p.answer) for p in train[:50] + held[:50])  # reference answers verify


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(SlimlmError, match="known tasks: arithmetic, countdown, ordering"):
        get_task("sudoku")


def test_jsonl_task_split_and_numeric_verifier(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(50)))
    task = get_task(str(path), verifier="numeric")
    train, held = task.problems(40, "train"), task.problems(100, "heldout")
    assert held and not {p.question for p in train} & {p.question for p in held}
    assert task.check(held[0], f"it is {held[0].answer}.0") and not task.check(held[0], "it is 0")


def test_paired_difference() -> None:
    after, before = [1, 1, 1, 0, 1, 0], [0, 1, 0, 0, 1, 0]
    p = paired_difference(after, before)
    assert p["difference"] == pytest.approx(2 / 6)
    diffs = [1, 0, 1, 0, 0, 0]
    sd = (sum((d - 1 / 3) ** 2 for d in diffs) / 5) ** 0.5
    assert p["se"] == pytest.approx(sd / 6 ** 0.5)


class AsciiShare(Task):
    """A test task with a graded reward a random byte-level model gets partly right (share of ASCII letters),
    so GRPO's groups have signal and the weights must move."""

    name = "ascii"

    def make(self, rng: random.Random) -> Problem:
        return Problem(f"Say {rng.randint(0, 10**6)}", "x")

    def check(self, problem: Problem, answer: str) -> bool:
        return sum(c.isascii() and c.isalpha() for c in answer) / max(len(answer), 1) > 0.1


def _tiny_chat_model(tiny_lm_dir: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}A:"
    tok.save_pretrained(tiny_lm_dir)
    return tiny_lm_dir


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _run(model: Path, out: Path, **kwargs):
    from slimlm.zero.train import ZeroConfig, train_zero

    config = ZeroConfig(steps=3, batch_size=4, group_size=4, lr=1e-3, max_completion=6, save_every=1, seed=0)
    return train_zero(model, AsciiShare(), out, config=config, **kwargs)


def test_tiny_grpo_changes_weights_and_resumes_bit_identically(tiny_lm_dir: Path, tmp_path: Path) -> None:
    model = _tiny_chat_model(tiny_lm_dir)
    report = _run(model, tmp_path / "full")
    start, after = _weights(model), _weights(tmp_path / "full" / "model")
    assert any(not torch.equal(start[k], after[k]) for k in start)
    rows = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("accuracy" in r and "format" in r for r in rows)
    assert report["steps"] == 3 and (tmp_path / "full" / "curves.png").stat().st_size > 0

    def interrupt_at_step_3(step: int, total: int, row: dict) -> None:
        if step == 3:  # logged before step 3's checkpoint: the run dies with checkpoint-2 as its last
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(model, tmp_path / "cut", progress=interrupt_at_step_3)
    assert not (tmp_path / "cut" / "model").exists()
    with pytest.raises(SlimlmError, match="--resume"):
        _run(model, tmp_path / "cut")
    resumed = _run(model, tmp_path / "cut", resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    again = _weights(tmp_path / "cut" / "model")
    assert all(torch.equal(after[k], again[k]) for k in after)
    rows = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_no_signal_warns(tiny_lm_dir: Path, tmp_path: Path) -> None:
    from slimlm.zero.train import NoSignalWarning, ZeroConfig, train_zero

    model = _tiny_chat_model(tiny_lm_dir)  # a random byte model never solves arithmetic: all rewards 0
    config = ZeroConfig(steps=1, batch_size=2, group_size=2, max_completion=4, save_every=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = train_zero(model, "arithmetic", tmp_path / "out", config=config)
    assert any(issubclass(w.category, NoSignalWarning) for w in caught)
    assert report["no_signal_steps"] == 1


def test_bad_input_is_one_line_error(tiny_lm_dir: Path, tmp_path: Path) -> None:
    from slimlm.zero.train import ZeroConfig, train_zero

    with pytest.raises(SlimlmError, match="does not divide the batch"):
        train_zero(tiny_lm_dir, "countdown", tmp_path / "a", config=ZeroConfig(batch_size=6, group_size=4))
    with pytest.raises(SlimlmError, match="no chat template; use --template plain"):
        train_zero(tiny_lm_dir, "countdown", tmp_path / "b", config=ZeroConfig(steps=1, batch_size=2, group_size=2))
    assert Template("plain").render(None, "What is 1 + 1?").endswith("User: What is 1 + 1? Assistant:")


def test_cli_eval_and_errors(tiny_lm_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slimlm.cli import app

    model = _tiny_chat_model(tiny_lm_dir)
    runner = CliRunner()
    res = runner.invoke(app, ["zero", str(model), "--task", "ordering", "--eval", "--n", "4", "--max-completion",
                              "4", "--baseline", str(model), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["model"]["n"] == 4 and data["paired"]["difference"] == 0.0  # the same greedy model twice
    res = runner.invoke(app, ["zero", str(model), "--task", "sudoku", "-o", str(tmp_path / "o")])
    assert isinstance(res.exception, SlimlmError) and "known tasks" in str(res.exception)


def test_write_prompts_feed_distill_verifier(tmp_path: Path) -> None:
    from slimlm.distill.teacher_text import load_verifier, read_prompts
    from slimlm.zero.prompts import write_prompts

    path = tmp_path / "prompts.jsonl"
    info = write_prompts(get_task("countdown"), path, n=5, seed=3)
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert info["problems"] == 5 and read_prompts(path) == [r["prompt"] for r in rows]
    verify = load_verifier("answers", path)
    good = f"<think>try</think> <answer>{rows[0]['answer']}</answer>"
    assert verify(rows[0]["prompt"], good)
    assert not verify(rows[0]["prompt"], "<think>try</think> <answer>1 + 1</answer>")
    assert not verify("a prompt not in the file", good)
    with pytest.raises(SlimlmError, match="--prompts"):
        load_verifier("answers", None)


def test_distill_trains_on_reference_answers(tiny_lm_dir: Path, tmp_path: Path, wikitext_valid: Path) -> None:
    """The baseline student of the R1 story: `distill --method sequence` on given prompt/response pairs
    (the reference answers), with no teacher generation."""
    from slimlm.distill.recipe import distill
    from slimlm.distill.trainer import TrainConfig
    from slimlm.zero.prompts import write_prompts, write_reference_responses

    text = tmp_path / "text.txt"
    text.write_text(wikitext_valid.read_text()[:6000])
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(get_task("arithmetic"), prompts, n=40)
    ref = write_reference_responses(prompts, tmp_path / "ref.jsonl")
    row = json.loads((tmp_path / "ref.jsonl").read_text().splitlines()[0])
    assert format_reward(row["response"]) == 1.0 and ref["pairs"] == 40
    rep = distill(tiny_lm_dir, text, tmp_path / "student", method="sequence", prune_layers=1, responses=ref["path"],
                  seq_len=320, eval_sequences=2, config=TrainConfig(max_steps=2, batch_size=2, eval_every=0))
    assert rep["sft_data"]["pairs"] == 40 and rep["sft_data"]["truncated"] == 0  # a byte-level prompt is ~250 tokens
    assert rep["steps"] == 2 and "generation" not in rep and not (tmp_path / "student" / "teacher_data.jsonl").exists()
    with pytest.raises(SlimlmError, match="does not exist"):
        distill(tiny_lm_dir, text, tmp_path / "s2", method="sequence", prune_layers=1, responses=tmp_path / "no.jsonl",
                seq_len=64, eval_sequences=2, config=TrainConfig(max_steps=1, batch_size=2))


def test_sft_sequences_never_cut_a_pair_from_its_prompt(tiny_lm_dir: Path, tmp_path: Path) -> None:
    """Packed rows hold whole pairs: every scored run of tokens sits after its own prompt in the same row, and
    padding is never scored; a pair longer than a row is cut at the end and counted."""
    from transformers import AutoTokenizer

    from slimlm.distill.teacher_text import sft_sequences

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    pairs = [("2+3?", "<answer>5</answer>"), ("7*6-1?", "<answer>41</answer>"), ("Q" * 10, "A" * 100)]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": q, "response": r}) + "\n" for q, r in pairs))
    ids, not_scored, info = sft_sequences(tok, jsonl, 64)
    assert info == {"pairs": 3, "sequences": 2, "truncated": 1, "scored_tokens": int((~not_scored).sum())}
    first = tok.decode(ids[0][~not_scored[0]].tolist())
    assert first.startswith("<answer>5</answer>") and "<answer>41</answer>" in first  # both short pairs, whole
    assert tok.decode(ids[0][:4].tolist()) == "2+3?"
    assert bool(not_scored[0, -1]) and ids.shape == (2, 64)  # the first row ends in unscored padding
    assert tok.decode(ids[1][~not_scored[1]].tolist()) == "A" * (64 - 10)  # the long pair keeps its first 64


def test_lora_run_ships_a_merged_model(tiny_lm_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from slimlm.zero.train import ZeroConfig, train_zero

    model = _tiny_chat_model(tiny_lm_dir)
    config = ZeroConfig(steps=2, batch_size=4, group_size=4, lr=1e-2, max_completion=6, lora=True, lora_rank=4,
                        save_every=10)
    train_zero(model, AsciiShare(), tmp_path / "lora", config=config)
    start, after = _weights(model), _weights(tmp_path / "lora" / "model")
    assert set(after) == set(start)  # merged: plain weight names, no adapter tensors
    assert any(not torch.equal(start[k], after[k]) for k in start)
