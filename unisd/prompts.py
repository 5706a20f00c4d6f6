"""Every prompt the method uses, built from one `Example`.

* student: the task alone (what the model sees at evaluation and when sampling);
* privileged teacher: the task with a demonstration in context (the gold one, or a
  wrong one for contrastive negatives), in one of three layouts (`TeacherTemplate`);
* auxiliary context: reference material from *other* examples, then the task.

A prompt is a conversation (a list of chat messages); most are one user turn. They
become token ids through the tokenizer's chat template, or through a plain fallback
template for base models without one. `PromptBuilder.encode_messages` applies the
prompt-length budget; over-long prompts are dropped and counted by the caller.

MCQ answers come in one of four layouts (`McqFormat`): reason_first ("Reasoning: …"
then "Answer: X" on the last line), answer_first ("Answer: X" first, then one "Reason:
…" line), answer_prefilled: answer_first with the assistant turn opened by "Answer:"
in every prompt that a response follows (student, teacher, contexts), so the model
writes " X" then its reason, and the letter is always the first completion token, where
the teacher's demonstration says most; or open_answer: the options are not listed, the
assistant turn opens with "Answer:" and the model names the answer in a few words
(" tributaries"), scored by the option it names (`unisd.scoring.parse_open`; docs/method.md
§7.2: a 135M model answers listed options by a letter habit, not by what it knows).
The format instruction of the task and the gold response follow the same choice
(`prompts.mcq_format`), which every caller passes on; `response_prefix` is the
prefilled part, `completion_text` the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from unisd.data.schema import LETTERS, Example

McqFormat = Literal["reason_first", "answer_first", "answer_prefilled", "open_answer"]
_ANSWER_FIRST = (
    "Give the option letter first, then one short reason, in this format:\nAnswer: <letter>\nReason: <one sentence>"
)
MCQ_FORMATS: dict[str, str] = {
    "reason_first": (
        "Reason briefly, then give only the option letter on the last line, in this format:\n"
        "Reasoning: <one or two sentences>\nAnswer: <letter>"
    ),
    "answer_first": _ANSWER_FIRST,
    "answer_prefilled": _ANSWER_FIRST,
    "open_answer": "Answer the question with a word or a short phrase.",
}
PREFILLED = ("answer_prefilled", "open_answer")  # formats whose prompts open the response with ANSWER_PREFIX
CODE_FORMAT = "Write the complete Python function in a single ```python code block."
TOOL_FORMAT = (
    "Decide the next API call. Reply in this format:\n"
    "Thought: <your reasoning>\nAction: <function name>\nAction Input: <arguments as a JSON object>"
)
DEMO_INTRO = "This is an example for a response to the question:"
DEMO_OUTRO = (
    "Study the example, then solve the problem in your own way. Reply only with your response, in the same format."
)
EXAMPLE_INTRO = "Here is a solved example with a good response:"
EXAMPLE_OUTRO = "Now solve this problem in your own way."
REPEAT_REQUEST = "Solve the same problem again and reply in exactly the same format."
CONFIRMATION = "That is correct. Here is the same problem again; answer it the same way."
REFERENCE_INTRO = "Here is reference material from related problems:"
TASK_INTRO = "Now solve this problem."
ANSWER_PREFIX = "Answer:"
# The plain template: one block per turn, then the opened response the model continues.
PLAIN_TURNS = {"user": "### Instruction\n{text}\n\n", "assistant": "### Response\n{text}\n\n"}
PLAIN_GENERATION = "### Response\n"
PLAIN_STOP = "\n### "

Message = dict[str, str]  # {"role": "user" | "assistant", "content": text}


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def problem_text(ex: Example, with_context: bool = True, mcq_format: McqFormat = "reason_first") -> str:
    """The problem itself, without output-format instructions (and optionally without an
    MCQ's context paragraph: auxiliary contexts quote other problems compactly). An MCQ
    lists its lettered options unless `mcq_format` is open_answer (the cloze form)."""
    if ex.task == "mcq":
        parts = [f"Context: {ex.context.strip()}"] if with_context and ex.context.strip() else []
        parts.append(f"Question: {ex.question.strip()}")
        if mcq_format != "open_answer":
            parts.append("Options:\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices)))
        return "\n".join(parts)
    if ex.task == "code":
        if ex.code_prompt:
            return f"Complete this Python function.\n```python\n{ex.code_prompt.strip()}\n```"
        return f"{ex.question.strip()}\nYour code should pass this test:\n{ex.tests[0]}"
    return f"You can use this API:\n{ex.tools.strip()}\n\nUser request: {ex.question.strip()}"


def format_text(task: str, mcq_format: McqFormat = "reason_first") -> str:
    """The output-format instruction of a task type."""
    if task == "mcq":
        return MCQ_FORMATS[mcq_format]
    return CODE_FORMAT if task == "code" else TOOL_FORMAT


def task_text(ex: Example, mcq_format: McqFormat = "reason_first") -> str:
    """What the student sees: the task and the expected output format."""
    return f"{problem_text(ex, mcq_format=mcq_format)}\n{format_text(ex.task, mcq_format)}"


def mcq_response(ex: Example, letter: str, reasoning: str, mcq_format: McqFormat = "reason_first") -> str:
    """An MCQ answer choosing `letter` in the chosen layout, its reasoning on one line
    (whitespace joined); open_answer names the option's text and gives no reasoning."""
    if mcq_format == "open_answer":
        return f"{ANSWER_PREFIX} {ex.choices[LETTERS.index(letter)].strip()}"
    reasoning = " ".join(reasoning.split())
    if mcq_format != "reason_first":
        return f"Answer: {letter}\nReason: {reasoning}"
    return f"Reasoning: {reasoning}\nAnswer: {letter}"


def gold_response(ex: Example, mcq_format: McqFormat = "reason_first") -> str:
    """The gold demonstration, written in the format the student must produce."""
    if ex.task == "mcq":
        reasoning = ex.rationale.strip() or f"The correct option is {ex.answer}: {ex.choices[ex.gold_index]}."
        return mcq_response(ex, ex.answer, reasoning, mcq_format)
    if ex.task == "code":
        return f"```python\n{ex.answer.strip()}\n```"
    return f"Thought: I should call {ex.answer}.\nAction: {ex.answer}\nAction Input: {ex.action_input}"


def response_prefix(task: str, mcq_format: McqFormat) -> str:
    """The start of the response that the prompt itself opens the assistant turn with."""
    return ANSWER_PREFIX if task == "mcq" and mcq_format in PREFILLED else ""


def completion_text(ex: Example, response: str, mcq_format: McqFormat) -> str:
    """What the model writes of a whole `response`: all of it after the prefilled prefix."""
    prefix = response_prefix(ex.task, mcq_format)
    if not response.startswith(prefix):
        raise ValueError(f"{ex.id}: a response in format {mcq_format} must begin with {prefix!r}")
    return response[len(prefix) :]


def response_text(ex: Example, completion: str, mcq_format: McqFormat) -> str:
    """The whole response a completion belongs to (the prefilled prefix, then the completion): what parsing reads."""
    return response_prefix(ex.task, mcq_format) + completion


def gold_completion(ex: Example, mcq_format: McqFormat = "reason_first") -> str:
    """What the model must write of the gold response after its prompt (the prefix excluded)."""
    return completion_text(ex, gold_response(ex, mcq_format), mcq_format)


TeacherTemplate = Literal["spec", "worked_example", "assistant_turn", "prior_exchange", "confirmed_exchange"]


def teacher_messages(
    ex: Example, demonstration: str, template: TeacherTemplate = "spec", mcq_format: McqFormat = "reason_first"
) -> list[Message]:
    """The privileged teacher's view: the task with a demonstration in context (docs/method.md §1.1, §7.1).

    spec: one user turn: the task, "This is an example for a response to the question:",
    the demonstration, then the instruction to solve it in its own way (the reference).
    worked_example: one user turn: the demonstration first, as a solved example, then the
    task; small models copy the reference template's phrases instead of answering (README).
    assistant_turn: a conversation in which the demonstration is the model's own earlier
    answer: user = the student's task text, assistant = the demonstration, user = "solve
    it again in the same format". The teacher then expects that answer's format, and its
    end of turn, rather than a continuation of an example it was shown.
    prior_exchange: as assistant_turn, but the last user turn is the student's task text
    itself, so the teacher's view ends exactly as the student's prompt does and differs
    from it only by the earlier exchange. Under assistant_turn the last user turn carries
    no task, and the teacher's first tokens lean to openers such as "I'm ready to assist
    you." (measured: unisd-full on SciQ then answered only that; README, validation).
    But a question asked again reads as "that was wrong": the teacher then avoids the
    letter it just gave (its letter accuracy on SciQ train fell to 12.8%, the student's
    is 22.1%; README, validation).
    confirmed_exchange: as prior_exchange, with the last user turn saying the earlier
    answer was correct before repeating the task.
    """
    task, demo = task_text(ex, mcq_format), demonstration.strip()
    if template == "assistant_turn":
        return [user(task), assistant(demo), user(REPEAT_REQUEST)]
    if template == "prior_exchange":
        return [user(task), assistant(demo), user(task)]
    if template == "confirmed_exchange":
        return [user(task), assistant(demo), user(f"{CONFIRMATION}\n\n{task}")]
    if template == "worked_example":
        problem = problem_text(ex, mcq_format=mcq_format)
        return [user(f"{EXAMPLE_INTRO}\n\nProblem:\n{problem}\nResponse:\n{demo}\n\n{EXAMPLE_OUTRO}\n{task}")]
    return [user(f"{task}\n\n{DEMO_INTRO}\n{demo}\n\n{DEMO_OUTRO}")]


def reference_text(ex: Example, references: list[Example] | str, mcq_format: McqFormat = "reason_first") -> str:
    """An auxiliary context: material from other examples (or an induced instruction), then the task."""
    if isinstance(references, str):
        material = references.strip()
    else:
        if any(r.id == ex.id for r in references):
            raise ValueError(f"{ex.id}: an auxiliary context must not hold the example's own answer")
        material = "\n\n".join(solved_example(r, mcq_format) for r in references)
    return f"{REFERENCE_INTRO}\n\n{material}\n\n{TASK_INTRO}\n{task_text(ex, mcq_format)}"


def solved_example(ex: Example, mcq_format: McqFormat = "reason_first") -> str:
    """Another problem quoted compactly with its gold response (auxiliary contexts, induction)."""
    return f"Problem:\n{problem_text(ex, False, mcq_format)}\nResponse:\n{gold_response(ex, mcq_format)}"


Template = Literal["chat", "plain"]


@dataclass
class PromptBuilder:
    """Renders conversations with the model's template and applies the prompt-length budget."""

    tokenizer: Any  # a Hugging Face tokenizer
    template: Template
    max_prompt_tokens: int

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, template: Template | Literal["auto"] = "auto", max_prompt_tokens: int = 1024
    ) -> PromptBuilder:
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "auto":
            template = "chat" if has_chat else "plain"
        if template == "chat" and not has_chat:
            raise ValueError("model.template is 'chat' but the tokenizer has no chat template; use 'plain' or 'auto'")
        return cls(tokenizer, template, max_prompt_tokens)

    def render(self, messages: list[Message], assistant_prefix: str = "") -> str:
        """The conversation, then the opened assistant turn (generation prompt), then
        `assistant_prefix` as the start of the answer (e.g. "Answer:")."""
        if self.template == "chat":
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(PLAIN_TURNS[m["role"]].format(text=m["content"]) for m in messages) + PLAIN_GENERATION
        return text + assistant_prefix

    def encode_messages(self, messages: list[Message], assistant_prefix: str = "") -> list[int] | None:
        """Prompt token ids of a conversation, or None when they exceed the budget."""
        rendered = self.render(messages, assistant_prefix)
        bos = getattr(self.tokenizer, "bos_token", None)
        # Chat templates that already begin with BOS must not get a second one.
        add_special = self.template == "plain" or not (bos and rendered.startswith(bos))
        ids = self.tokenizer(rendered, add_special_tokens=add_special)["input_ids"]
        return ids if len(ids) <= self.max_prompt_tokens else None

    def encode(self, text: str, assistant_prefix: str = "") -> list[int] | None:
        """A one-turn prompt: `text` as the user's message (then `assistant_prefix`)."""
        return self.encode_messages([user(text)], assistant_prefix)

    def encode_task(self, ex: Example, mcq_format: McqFormat) -> list[int] | None:
        """The student's prompt of `ex`: its task, then the format's prefilled response start."""
        return self.encode(task_text(ex, mcq_format), response_prefix(ex.task, mcq_format))

    def encode_response(self, text: str) -> list[int]:
        """Token ids of a response, ended by EOS so that stopping is learned and scored."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    @property
    def stop_strings(self) -> list[str]:
        return [PLAIN_STOP] if self.template == "plain" else []
