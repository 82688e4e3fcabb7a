"""The prompt template: the R1-Zero instruction around a task's question, as a chat turn or as plain text."""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.errors import SlimlmError

TEMPLATE_STYLES = ("chat", "plain")

# R1-Zero's instruction as one user turn; its explicit example keeps a small instruct model's answers short
# (with "think step by step" SmolLM2-135M rambles and scored 1/32 instead of 5/32 on arithmetic).
INSTRUCTION = ("Think about the reasoning process first, then give the final answer. Enclose the reasoning in "
               "<think> </think> tags and only the final answer in <answer> </answer> tags, i.e. "
               "<think> reasoning here </think> <answer> answer here </answer>.")

# DeepSeek-R1-Zero's template for base models (DeepSeek-R1 paper, table 1).
PLAIN = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
         "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
         "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
         "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
         "User: {question} Assistant:")


@dataclass(frozen=True)
class Template:
    """``chat``: one user turn through the tokenizer's chat template (instruct models); ``plain``: R1-Zero's
    text template (base models). ``prefill`` starts the assistant's turn (e.g. "<think>"); rewards score
    prefill + completion, so the format check sees the whole answer."""

    style: str = "chat"
    prefill: str = ""

    def __post_init__(self) -> None:
        if self.style not in TEMPLATE_STYLES:
            raise SlimlmError(f"unknown template {self.style!r}; choose one of {', '.join(TEMPLATE_STYLES)}")

    def user_message(self, question: str) -> str:
        """The user's turn in chat style; also the prompt text `distill --method sequence` sends a teacher."""
        return f"{question}\n{INSTRUCTION}"

    def check(self, tokenizer, model_name: str = "the model") -> None:
        if self.style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise SlimlmError(f"{model_name} has no chat template; use --template plain (R1-Zero's text template "
                              "for base models)")

    def render(self, tokenizer, question: str) -> str:
        """The full prompt text the model continues."""
        if self.style == "plain":
            text = PLAIN.format(question=question)
            return text + (" " + self.prefill if self.prefill else "")
        self.check(tokenizer)
        text = tokenizer.apply_chat_template([{"role": "user", "content": self.user_message(question)}],
                                             tokenize=False, add_generation_prompt=True)
        return text + self.prefill
