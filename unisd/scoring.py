"""Reading answers out of model text, and building test programs for generated code."""

from __future__ import annotations

import ast
import json
import re

from unisd.data.schema import LETTERS, Example
from unisd.sandbox import CodeTest, defined_names

_ANSWER_LINE = re.compile(
    r"answer(?:\s+to\s+(?:the|this)\s+question)?\s*(?:is)?\s*[:：]?\s*\**\s*\(?((?-i:[A-J]))\)?(?![A-Za-z])",
    re.IGNORECASE,
)
_BARE_LETTER = re.compile(r"^\s*\**\(?([A-J])\)?[.:)]?\**\s*$")
_LETTER_AND_OPTION = re.compile(r"^\s*\**\(?([A-J])[.:)]\**\s+(.+?)\s*$")
_OPEN_LABEL = re.compile(r"^\W*answer\W*?:\s*(.*)$", re.IGNORECASE)
_ARTICLES = {"a", "an", "the"}


def parse_mcq(text: str, choices: list[str]) -> str | None:
    """The chosen option letter, or None when no valid letter can be read.

    An answer line (a line that opens with 'Answer: X', also '**Answer:** X') decides,
    the last one if there are several: so both layouts parse, the reasoning first with
    the answer on the last line, and the answer first with a reason after it, even when
    the reason mentions another letter ('Answer: B' then 'Reason: not answer C' is B).
    Without one, the last 'answer is X' anywhere ('the answer is (X)', 'Final answer:
    X'); without that, the last line, else the first, counts when it is only a letter
    ('B', '(B)', 'B.') or restates an option with its letter ('B. carbon dioxide', 'B:
    carbon dioxide'). Letters beyond the options are invalid.
    """
    valid = LETTERS[: len(choices)]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    hits = [m.group(1).upper() for ln in lines if (m := _ANSWER_LINE.match(ln.lstrip(" *#>")))]
    hits = hits or [m.group(1).upper() for m in _ANSWER_LINE.finditer(text)]
    for line in (lines[-1:] + lines[:1]) if not hits else ():
        if letter := _letter_line(line, choices):
            hits = [letter]
            break
    return hits[-1] if hits and hits[-1] in valid else None


def parse_open(text: str, choices: list[str]) -> str | None:
    """The letter of the option an open answer names (`prompts.mcq_format: open_answer`), or None.

    The answer is the first line that opens with 'Answer:' (after the label), else the
    first non-empty line. An option is named where its text occurs in it as whole words,
    both normalised as SQuAD normalises answers (case, punctuation and the articles a,
    an, the aside: "eye" names "the eye"); of several, the one named first (at one place,
    the longest: "carbon dioxide" over "carbon"). 'B. oxygen' names oxygen, not option B.
    """
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    labelled = [m.group(1) for ln in lines if (m := _OPEN_LABEL.match(ln))]
    answer = _words(labelled[0] if labelled else lines[0] if lines else "")
    named = []
    for i, choice in enumerate(choices):
        option = _words(choice)
        if option and (m := re.search(rf"(?<!\S){re.escape(option)}(?!\S)", answer)):
            named.append((m.start(), -len(option), i))
    return LETTERS[min(named)[2]] if named else None


def _words(text: str) -> str:
    """Lower-case words, punctuation and articles dropped, single-spaced ('The carbon-dioxide.' -> 'carbon dioxide')."""
    return " ".join(w for w in re.sub(r"[^\w\s]", " ", text.lower()).split() if w not in _ARTICLES)


def parse_answer(text: str, choices: list[str], mcq_format: str) -> str | None:
    """The chosen option's letter in the layout of `mcq_format`: named (open_answer) or lettered."""
    return parse_open(text, choices) if mcq_format == "open_answer" else parse_mcq(text, choices)


def _letter_line(line: str, choices: list[str]) -> str | None:
    """The letter of a line that is only a letter, or a letter with its option's text."""
    if m := _BARE_LETTER.match(line):
        return m.group(1)
    if (m := _LETTER_AND_OPTION.match(line)) and m.group(1) in LETTERS[: len(choices)]:
        option = choices[LETTERS.index(m.group(1))].strip().lower().rstrip(".")
        if m.group(2).strip().lower().rstrip(".").startswith(option):
            return m.group(1)
    return None


_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str:
    """The code of a reply: the first Python (or untagged) fenced block that parses, else the whole reply."""
    blocks = [b for tag, b in _FENCE.findall(text) if b.strip() and (not tag.strip() or tag.lower().startswith("py"))]
    for block in blocks:
        if _parses(block):
            return block
    return blocks[0] if blocks else text


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


def code_program(ex: Example, completion: str) -> CodeTest:
    """The completion's code and the example's tests, for `unisd.sandbox.run_many`, which
    runs the code in the sandbox and judges the asserts outside it."""
    code = extract_code(completion)
    if ex.entry_point:  # HumanEval: the reply may hold only the body or the whole function
        # The prompt always comes first: a whole function redefines it but still needs its imports and helpers.
        whole = re.search(rf"def\s+{re.escape(ex.entry_point)}\s*\(", code)
        code = ex.code_prompt + ("\n" if whole else "") + code
        return CodeTest(code, f"{ex.tests[0]}\n\ncheck({ex.entry_point})\n", defined_names(ex.answer))
    # MBPP setup code may use the solution's definitions (task 367 builds trees of its `Node`).
    return CodeTest(code, "\n".join([ex.test_setup, *ex.tests, ""]), defined_names(ex.answer))


_ACTION = re.compile(r"Action\s*:\s*(.+)")
_ACTION_INPUT = re.compile(r"Action\s*Input\s*:\s*(.*)", re.DOTALL)


def parse_react(text: str) -> tuple[str | None, str | None]:
    """The first ReAct action name and its input text, or None for what is missing."""
    action = _ACTION.search(text)
    args = _ACTION_INPUT.search(text)
    name = action.group(1).strip().strip("`'\"") if action else None
    raw = None
    if args:
        raw = args.group(1).strip()
        raw = re.split(r"\n\s*(?:Observation|Thought|Action)\s*:", raw)[0].strip()
    return name, raw


def _as_json(text: str | None) -> object:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def tool_scores(ex: Example, completion: str) -> dict[str, bool]:
    """ToolAlpaca-style accuracy: right action, right arguments, both."""
    name, raw = parse_react(completion)
    action_ok = name == ex.answer
    args_ok = raw is not None and _as_json(raw) == _as_json(ex.action_input)
    return {"action": action_ok, "arguments": args_ok, "full": action_ok and args_ok}
