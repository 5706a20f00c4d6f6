"""Every prompt the method uses, built from one `Example`.

* student: the task alone (what the model sees at evaluation and when sampling);
* privileged teacher: the task, then a demonstration in context (the gold one, or a
  wrong one for contrastive negatives), then an instruction to solve it its own way;
* auxiliary context: reference material from *other* examples, then the task.

Texts become token ids through the tokenizer's chat template, or through a plain
fallback template for base models without one. `PromptBuilder.encode` applies the
prompt-length budget; over-long prompts are dropped and counted by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unisd.data.schema import LETTERS, Example

MCQ_FORMAT = (
    "Reason briefly, then give only the option letter on the last line, in this format:\n"
    "Reasoning: <one or two sentences>\nAnswer: <letter>"
)
CODE_FORMAT = "Write the complete Python function in a single ```python code block."
TOOL_FORMAT = (
    "Decide the next API call. Reply in this format:\n"
    "Thought: <your reasoning>\nAction: <function name>\nAction Input: <arguments as a JSON object>"
)
DEMO_INTRO = "This is an example for a response to the question:"
DEMO_OUTRO = (
    "Study the example, then solve the problem in your own way. "
    "Reply only with your response, in the same format."
)
EXAMPLE_INTRO = "Here is a solved example with a good response:"
EXAMPLE_OUTRO = "Now solve this problem in your own way."
REFERENCE_INTRO = "Here is reference material from related problems:"
TASK_INTRO = "Now solve this problem."
PLAIN_TEMPLATE = "### Instruction\n{text}\n\n### Response\n"
PLAIN_STOP = "\n### "


FORMATS = {"mcq": MCQ_FORMAT, "code": CODE_FORMAT, "tool": TOOL_FORMAT}


def problem_text(ex: Example, with_context: bool = True) -> str:
    """The problem itself, without output-format instructions (and optionally without an
    MCQ's context paragraph: auxiliary contexts quote other problems compactly)."""
    if ex.task == "mcq":
        parts = [f"Context: {ex.context.strip()}"] if with_context and ex.context.strip() else []
        parts.append(f"Question: {ex.question.strip()}")
        parts.append("Options:\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices)))
        return "\n".join(parts)
    if ex.task == "code":
        if ex.code_prompt:
            return f"Complete this Python function.\n```python\n{ex.code_prompt.strip()}\n```"
        return f"{ex.question.strip()}\nYour code should pass this test:\n{ex.tests[0]}"
    return f"You can use this API:\n{ex.tools.strip()}\n\nUser request: {ex.question.strip()}"


def task_text(ex: Example) -> str:
    """What the student sees: the task and the expected output format."""
    return f"{problem_text(ex)}\n{FORMATS[ex.task]}"


def gold_response(ex: Example) -> str:
    """The gold demonstration, written in the format the student must produce."""
    if ex.task == "mcq":
        reasoning = ex.rationale.strip() or f"The correct option is {ex.answer}: {ex.choices[ex.gold_index]}."
        return f"Reasoning: {' '.join(reasoning.split())}\nAnswer: {ex.answer}"
    if ex.task == "code":
        return f"```python\n{ex.answer.strip()}\n```"
    return f"Thought: I should call {ex.answer}.\nAction: {ex.answer}\nAction Input: {ex.action_input}"


TeacherTemplate = Literal["spec", "worked_example"]


def teacher_text(ex: Example, demonstration: str, template: TeacherTemplate = "spec") -> str:
    """The privileged teacher's view: the task with a demonstration in context (SPEC §1).

    spec: the task, "This is an example for a response to the question:", the
    demonstration, then the instruction to solve it in its own way (the reference).
    worked_example: the demonstration first, as a solved example, then the task; small
    models copy the reference template's phrases instead of answering (see README).
    """
    if template == "worked_example":
        return (f"{EXAMPLE_INTRO}\n\nProblem:\n{problem_text(ex)}\nResponse:\n{demonstration.strip()}\n\n"
                f"{EXAMPLE_OUTRO}\n{task_text(ex)}")
    return f"{task_text(ex)}\n\n{DEMO_INTRO}\n{demonstration.strip()}\n\n{DEMO_OUTRO}"


def reference_text(ex: Example, references: list[Example] | str) -> str:
    """An auxiliary context: material from other examples (or an induced instruction), then the task."""
    if isinstance(references, str):
        material = references.strip()
    else:
        if any(r.id == ex.id for r in references):
            raise ValueError(f"{ex.id}: an auxiliary context must not hold the example's own answer")
        material = "\n\n".join(f"Problem:\n{problem_text(r, with_context=False)}\nResponse:\n{gold_response(r)}"
                                 for r in references)
    return f"{REFERENCE_INTRO}\n\n{material}\n\n{TASK_INTRO}\n{task_text(ex)}"


Template = Literal["chat", "plain"]


@dataclass
class PromptBuilder:
    """Renders texts with the model's template and applies the prompt-length budget."""

    tokenizer: object
    template: Template
    max_prompt_tokens: int

    @classmethod
    def for_tokenizer(cls, tokenizer, template: str = "auto", max_prompt_tokens: int = 1024) -> "PromptBuilder":
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "auto":
            template = "chat" if has_chat else "plain"
        if template == "chat" and not has_chat:
            raise ValueError("model.template is 'chat' but the tokenizer has no chat template; use 'plain' or 'auto'")
        return cls(tokenizer, template, max_prompt_tokens)

    def render(self, text: str) -> str:
        if self.template == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return PLAIN_TEMPLATE.format(text=text)

    def encode(self, text: str) -> list[int] | None:
        """Prompt token ids, or None when the prompt exceeds the budget."""
        rendered = self.render(text)
        bos = getattr(self.tokenizer, "bos_token", None)
        # Chat templates that already begin with BOS must not get a second one.
        add_special = self.template == "plain" or not (bos and rendered.startswith(bos))
        ids = self.tokenizer(rendered, add_special_tokens=add_special)["input_ids"]
        return ids if len(ids) <= self.max_prompt_tokens else None

    def encode_response(self, text: str) -> list[int]:
        """Token ids of a response, ended by EOS so that stopping is learned and scored."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    @property
    def stop_strings(self) -> list[str]:
        return [PLAIN_STOP] if self.template == "plain" else []
