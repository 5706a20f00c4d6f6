"""Prompt texts built from one Example, and their rendering with the tokenizer's template."""

import pytest

from unisd.data import Example
from unisd.modeling import load_tokenizer
from unisd.prompts import PromptBuilder, gold_response, reference_text, task_text, teacher_text
from unisd.scoring import extract_code, parse_mcq, tool_scores

MCQ = Example(id="sciq-0001", benchmark="sciq", task="mcq", question="Which gas do plants absorb?",
              context="Plants make sugar from light.", choices=["oxygen", "carbon dioxide", "nitrogen", "helium"],
              answer="B")
MCQ_RATIONALE = Example(id="cos_e-1", benchmark="cos_e", task="mcq", question="Where would you put a dirty plate?",
                        choices=["bed", "sink", "garage"], answer="B",
                        rationale="Dirty plates are\n  washed in the sink.")
MBPP = Example(id="mbpp-1", benchmark="mbpp", task="code", question="Write a function to add two numbers.",
               answer="def add(a, b):\n    return a + b\n", tests=["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
INC = 'def inc(x):\n    """Add one."""\n'
HUMANEVAL = Example(id="HumanEval-9", benchmark="humaneval", task="code", question=INC, code_prompt=INC,
                    entry_point="inc", answer=INC + "    return x + 1\n",
                    tests=["def check(candidate):\n    assert candidate(1) == 2\n"])
TOOL = Example(id="toolalpaca-train-0001-01", benchmark="toolalpaca", task="tool",
               question="What's the weather in Paris right now?",
               tools="WeatherNow: Current weather\ngetCurrentWeather: Get the current weather for a city.",
               answer="getCurrentWeather", action_input='{"city": "Paris"}')


@pytest.fixture
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)  # fresh per test: some tests remove the chat template


# ------------------------------------------------------------------ rendering and budget

def test_chat_template_is_used_when_present(tok):
    pb = PromptBuilder.for_tokenizer(tok)
    assert pb.template == "chat" and pb.stop_strings == []
    assert pb.render("Hi there") == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = pb.encode("Hi there")
    assert tok.decode(ids) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_plain_fallback_without_chat_template(tok):
    tok.chat_template = None
    pb = PromptBuilder.for_tokenizer(tok, "auto")
    assert pb.template == "plain"
    assert pb.render("Hi there") == "### Instruction\nHi there\n\n### Response\n"
    assert tok.decode(pb.encode("Hi there")) == "### Instruction\nHi there\n\n### Response\n"
    assert pb.stop_strings == ["\n### "]


def test_plain_can_be_forced_and_chat_needs_a_template(tok):
    assert PromptBuilder.for_tokenizer(tok, "plain").render("x") == "### Instruction\nx\n\n### Response\n"
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        PromptBuilder.for_tokenizer(tok, "chat")


def test_prompt_budget(tok):
    text = task_text(MCQ)
    n = len(PromptBuilder.for_tokenizer(tok, max_prompt_tokens=100_000).encode(text))
    assert n > 32
    assert PromptBuilder.for_tokenizer(tok, max_prompt_tokens=n).encode(text) is not None
    assert PromptBuilder.for_tokenizer(tok, max_prompt_tokens=n - 1).encode(text) is None
    assert PromptBuilder.for_tokenizer(tok, max_prompt_tokens=64).encode(text + " more" * 200) is None


def test_encode_response_ends_with_eos(tok):
    pb = PromptBuilder.for_tokenizer(tok)
    ids = pb.encode_response("Reasoning: plants use it.\nAnswer: B")
    assert ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids[:-1]) == "Reasoning: plants use it.\nAnswer: B"
    assert tok.eos_token_id not in ids[:-1]


# ------------------------------------------------------------------ task texts

def test_mcq_task_text():
    text = task_text(MCQ)
    assert text.startswith("Context: Plants make sugar from light.\nQuestion: Which gas do plants absorb?\n")
    assert "Options:\nA. oxygen\nB. carbon dioxide\nC. nitrogen\nD. helium\n" in text
    assert "give only the option letter on the last line" in text
    assert text.endswith("Reasoning: <one or two sentences>\nAnswer: <letter>")
    assert "Context:" not in task_text(MCQ_RATIONALE)
    assert "washed in the sink" not in task_text(MCQ_RATIONALE)  # the rationale is the teacher's, not the task's


def test_code_task_texts():
    mbpp = task_text(MBPP)
    assert mbpp.startswith("Write a function to add two numbers.\n")
    assert "assert add(1, 2) == 3" in mbpp and "```python code block" in mbpp
    assert "return a + b" not in mbpp
    humaneval = task_text(HUMANEVAL)
    assert "```python\ndef inc(x):\n    \"\"\"Add one.\"\"\"\n```" in humaneval
    assert "check(candidate)" not in humaneval and "return x + 1" not in humaneval
    assert "```python code block" in humaneval


def test_tool_task_text():
    text = task_text(TOOL)
    assert "getCurrentWeather: Get the current weather for a city." in text
    assert "User request: What's the weather in Paris right now?" in text
    assert "Action: <function name>\nAction Input: <arguments as a JSON object>" in text
    assert '"city": "Paris"' not in text


# ------------------------------------------------------------------ gold, teacher and reference texts

def test_gold_responses():
    assert gold_response(MCQ) == "Reasoning: The correct option is B: carbon dioxide.\nAnswer: B"
    assert gold_response(MCQ_RATIONALE) == "Reasoning: Dirty plates are washed in the sink.\nAnswer: B"
    assert gold_response(MBPP) == "```python\ndef add(a, b):\n    return a + b\n```"
    assert gold_response(TOOL).endswith('Action: getCurrentWeather\nAction Input: {"city": "Paris"}')
    # Each gold response scores as correct with the project's own parsers.
    assert parse_mcq(gold_response(MCQ), MCQ.choices) == "B"
    assert extract_code(gold_response(MBPP)).strip() == MBPP.answer.strip()
    assert tool_scores(TOOL, gold_response(TOOL))["full"]


def test_teacher_text_holds_the_demonstration_after_the_task():
    demo = gold_response(MCQ)
    text = teacher_text(MCQ, demo)
    assert text.startswith(task_text(MCQ))
    intro = text.index("This is an example for a response to the question:")
    assert intro > len(task_text(MCQ)) - 1
    assert text.index(demo) > intro
    assert text.index("solve the problem in your own way") > text.index(demo)
    # A wrong demonstration (contrastive negative) is placed the same way.
    assert "Answer: D" in teacher_text(MCQ, "Reasoning: helium floats.\nAnswer: D")


def test_worked_example_teacher_text_puts_the_demonstration_before_the_task():
    demo = gold_response(MCQ)
    text = teacher_text(MCQ, demo, "worked_example")
    assert text.startswith("Here is a solved example with a good response:")
    assert text.index(demo) < text.index("Now solve this problem in your own way.")
    assert text.endswith(task_text(MCQ))  # the task and its answer format come last
    assert "This is an example for a response" not in text


def test_reference_text_uses_other_examples_only():
    other = MCQ.model_copy(update={"id": "sciq-0002", "question": "What do plants release?", "answer": "A"})
    text = reference_text(MCQ_RATIONALE, [MCQ, other])
    assert text.startswith("Here is reference material from related problems:")
    assert "Reasoning: The correct option is B: carbon dioxide.\nAnswer: B" in text
    assert "Reasoning: The correct option is A: oxygen.\nAnswer: A" in text
    assert "What do plants release?" in text
    assert "washed in the sink" not in text  # the example's own answer is not in its auxiliary context
    assert text.endswith("Now solve this problem.\n" + task_text(MCQ_RATIONALE))
    with pytest.raises(ValueError, match="sciq-0001"):
        reference_text(MCQ, [other, MCQ])


def test_reference_text_with_an_induced_instruction():
    text = reference_text(MBPP, "  Write small, tested functions.  ")
    assert text == ("Here is reference material from related problems:\n\nWrite small, tested functions.\n\n"
                    "Now solve this problem.\n" + task_text(MBPP))
