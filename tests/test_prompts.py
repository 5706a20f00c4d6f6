"""Prompt texts built from one Example, and their rendering with the tokenizer's template."""

import pytest

from unisd.data import Example
from unisd.modeling import load_tokenizer
from unisd.prompts import PromptBuilder, assistant, gold_response, reference_text, task_text, teacher_messages, user
from unisd.scoring import extract_code, parse_mcq, tool_scores

MCQ = Example(
    id="sciq-0001",
    benchmark="sciq",
    task="mcq",
    question="Which gas do plants absorb?",
    context="Plants make sugar from light.",
    choices=["oxygen", "carbon dioxide", "nitrogen", "helium"],
    answer="B",
)
MCQ_RATIONALE = Example(
    id="cos_e-1",
    benchmark="cos_e",
    task="mcq",
    question="Where would you put a dirty plate?",
    choices=["bed", "sink", "garage"],
    answer="B",
    rationale="Dirty plates are\n  washed in the sink.",
)
MBPP = Example(
    id="mbpp-1",
    benchmark="mbpp",
    task="code",
    question="Write a function to add two numbers.",
    answer="def add(a, b):\n    return a + b\n",
    tests=["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
)
INC = 'def inc(x):\n    """Add one."""\n'
HUMANEVAL = Example(
    id="HumanEval-9",
    benchmark="humaneval",
    task="code",
    question=INC,
    code_prompt=INC,
    entry_point="inc",
    answer=INC + "    return x + 1\n",
    tests=["def check(candidate):\n    assert candidate(1) == 2\n"],
)
TOOL = Example(
    id="toolalpaca-train-0001-01",
    benchmark="toolalpaca",
    task="tool",
    question="What's the weather in Paris right now?",
    tools="WeatherNow: Current weather\ngetCurrentWeather: Get the current weather for a city.",
    answer="getCurrentWeather",
    action_input='{"city": "Paris"}',
)


@pytest.fixture
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)  # fresh per test: some tests remove the chat template


# ------------------------------------------------------------------ rendering and budget


def test_chat_template_is_used_when_present(tok):
    pb = PromptBuilder.for_tokenizer(tok)
    assert pb.template == "chat" and pb.stop_strings == []
    assert pb.render([user("Hi there")]) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = pb.encode("Hi there")
    assert tok.decode(ids) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_plain_fallback_without_chat_template(tok):
    tok.chat_template = None
    pb = PromptBuilder.for_tokenizer(tok, "auto")
    assert pb.template == "plain"
    assert pb.render([user("Hi there")]) == "### Instruction\nHi there\n\n### Response\n"
    assert tok.decode(pb.encode("Hi there")) == "### Instruction\nHi there\n\n### Response\n"
    assert pb.stop_strings == ["\n### "]


def test_plain_can_be_forced_and_chat_needs_a_template(tok):
    assert PromptBuilder.for_tokenizer(tok, "plain").render([user("x")]) == "### Instruction\nx\n\n### Response\n"
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
    assert '```python\ndef inc(x):\n    """Add one."""\n```' in humaneval
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


def only_turn(messages):
    (message,) = messages
    assert message["role"] == "user"
    return message["content"]


def test_spec_teacher_prompt_holds_the_demonstration_after_the_task():
    demo = gold_response(MCQ)
    text = only_turn(teacher_messages(MCQ, demo))
    assert text.startswith(task_text(MCQ))
    intro = text.index("This is an example for a response to the question:")
    assert intro > len(task_text(MCQ)) - 1
    assert text.index(demo) > intro
    assert text.index("solve the problem in your own way") > text.index(demo)
    # A wrong demonstration (contrastive negative) is placed the same way.
    assert "Answer: D" in only_turn(teacher_messages(MCQ, "Reasoning: helium floats.\nAnswer: D"))


def test_worked_example_teacher_prompt_puts_the_demonstration_before_the_task():
    demo = gold_response(MCQ)
    text = only_turn(teacher_messages(MCQ, demo, "worked_example"))
    assert text.startswith("Here is a solved example with a good response:")
    assert text.index(demo) < text.index("Now solve this problem in your own way.")
    assert text.endswith(task_text(MCQ))  # the task and its answer format come last
    assert "This is an example for a response" not in text


MCQ_TASK = (
    "Context: Plants make sugar from light.\nQuestion: Which gas do plants absorb?\n"
    "Options:\nA. oxygen\nB. carbon dioxide\nC. nitrogen\nD. helium\n"
    "Reason briefly, then give only the option letter on the last line, in this format:\n"
    "Reasoning: <one or two sentences>\nAnswer: <letter>"
)
MCQ_GOLD = "Reasoning: The correct option is B: carbon dioxide.\nAnswer: B"
AGAIN = "Solve the same problem again and reply in exactly the same format."


def test_assistant_turn_teacher_prompt_is_a_conversation_with_the_demonstration_as_its_answer():
    assert teacher_messages(MCQ, "  " + MCQ_GOLD + "\n", "assistant_turn") == [
        {"role": "user", "content": MCQ_TASK},
        {"role": "assistant", "content": MCQ_GOLD},
        {"role": "user", "content": AGAIN},
    ]


def test_assistant_turn_chat_rendering(tok):
    """Written out by hand from the tiny tokenizer's ChatML template."""
    pb = PromptBuilder.for_tokenizer(tok)
    assert pb.render(teacher_messages(MCQ, MCQ_GOLD, "assistant_turn")) == (
        f"<|im_start|>user\n{MCQ_TASK}<|im_end|>\n"
        f"<|im_start|>assistant\n{MCQ_GOLD}<|im_end|>\n"
        f"<|im_start|>user\n{AGAIN}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert pb.render([user("Q")], "Answer:") == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nAnswer:"


def test_assistant_turn_token_layout(tok):
    """Turn by turn: the special tokens where the template puts them, and between them
    exactly the tokens of each piece of text (the demonstration as the student's own
    answer would be tokenized)."""
    pb = PromptBuilder.for_tokenizer(tok)
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")

    def text(piece):
        return tok(piece, add_special_tokens=False)["input_ids"]

    want = (
        [start]
        + text("user\n")
        + text(MCQ_TASK)
        + [end]
        + text("\n")
        + [start]
        + text("assistant\n")
        + pb.encode_response(MCQ_GOLD)
        + text("\n")
        + [start]
        + text("user\n")
        + text(AGAIN)
        + [end]
        + text("\n")
        + [start]
        + text("assistant\n")
    )
    assert pb.encode_messages(teacher_messages(MCQ, MCQ_GOLD, "assistant_turn")) == want
    assert pb.encode_messages([user(MCQ_TASK)], "Answer:") == (
        [start] + text("user\n") + text(MCQ_TASK) + [end] + text("\n") + [start] + text("assistant\n") + text("Answer:")
    )


def test_prior_exchange_teacher_view_ends_exactly_as_the_student_prompt(tok):
    """The teacher's tokens are the earlier exchange (task, demonstration) followed by
    exactly the student's prompt tokens."""
    pb = PromptBuilder.for_tokenizer(tok)
    assert teacher_messages(MCQ, MCQ_GOLD, "prior_exchange") == [
        {"role": "user", "content": MCQ_TASK},
        {"role": "assistant", "content": MCQ_GOLD},
        {"role": "user", "content": MCQ_TASK},
    ]
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")

    def text(piece):
        return tok(piece, add_special_tokens=False)["input_ids"]

    student = [start] + text("user\n") + text(MCQ_TASK) + [end] + text("\n") + [start] + text("assistant\n")
    earlier = (
        [start]
        + text("user\n")
        + text(MCQ_TASK)
        + [end]
        + text("\n")
        + [start]
        + text("assistant\n")
        + pb.encode_response(MCQ_GOLD)
        + text("\n")
    )
    assert pb.encode_messages([user(MCQ_TASK)]) == student
    assert pb.encode_messages(teacher_messages(MCQ, MCQ_GOLD, "prior_exchange")) == earlier + student


def test_plain_template_renders_a_conversation_as_turns(tok):
    tok.chat_template = None
    pb = PromptBuilder.for_tokenizer(tok)
    assert pb.render([user("Q?"), assistant("Answer: B"), user("Again.")], "Answer:") == (
        "### Instruction\nQ?\n\n### Response\nAnswer: B\n\n### Instruction\nAgain.\n\n### Response\nAnswer:"
    )
    assert tok.decode(pb.encode_messages([user("Q?"), assistant("A"), user("Again.")])) == (
        "### Instruction\nQ?\n\n### Response\nA\n\n### Instruction\nAgain.\n\n### Response\n"
    )


def test_conversation_budget(tok):
    messages = teacher_messages(MCQ, MCQ_GOLD, "assistant_turn")
    n = len(PromptBuilder.for_tokenizer(tok, max_prompt_tokens=100_000).encode_messages(messages))
    assert PromptBuilder.for_tokenizer(tok, max_prompt_tokens=n).encode_messages(messages) is not None
    assert PromptBuilder.for_tokenizer(tok, max_prompt_tokens=n - 1).encode_messages(messages) is None


# ------------------------------------------------------------------ MCQ answer formats


def test_answer_first_task_text_and_gold_response():
    text = task_text(MCQ, "answer_first")
    assert text.startswith("Context: Plants make sugar from light.\nQuestion: Which gas do plants absorb?\n")
    assert text.endswith(
        "Give the option letter first, then one short reason, in this format:\nAnswer: <letter>\nReason: <one sentence>"
    )
    assert gold_response(MCQ, "answer_first") == "Answer: B\nReason: The correct option is B: carbon dioxide."
    assert gold_response(MCQ_RATIONALE, "answer_first") == "Answer: B\nReason: Dirty plates are washed in the sink."
    assert parse_mcq(gold_response(MCQ_RATIONALE, "answer_first"), MCQ_RATIONALE.choices) == "B"
    # other tasks do not depend on the MCQ format
    assert task_text(MBPP, "answer_first") == task_text(MBPP)
    assert gold_response(TOOL, "answer_first") == gold_response(TOOL)


def test_the_mcq_format_reaches_every_demonstration():
    """The teacher's task, its demonstration, auxiliary contexts and negatives share one layout."""
    from unisd.negatives import clean_self_generated, negative_request, programmatic_negatives

    (message, demo, _) = teacher_messages(MCQ, gold_response(MCQ, "answer_first"), "assistant_turn", "answer_first")
    assert message["content"].endswith("Answer: <letter>\nReason: <one sentence>")
    assert demo["content"] == "Answer: B\nReason: The correct option is B: carbon dioxide."
    other = MCQ.model_copy(update={"id": "sciq-0002", "answer": "A"})
    context = reference_text(MCQ_RATIONALE, [other], "answer_first")
    assert "Response:\nAnswer: A\nReason: The correct option is A: oxygen." in context
    assert context.endswith(task_text(MCQ_RATIONALE, "answer_first"))
    negatives = programmatic_negatives([MCQ_RATIONALE], per_example=2, mcq_format="answer_first")["cos_e-1"]
    by_kind = {n.kind: n.text for n in negatives}  # both wrong options of three
    assert by_kind["wrong_option:A"] == "Answer: A\nReason: Dirty plates are washed in the bed."
    assert "start with the line 'Answer: A'" in negative_request(MCQ_RATIONALE, 0, "answer_first")
    reply = "Answer: A\nReason: Plates are kept\n in bed."
    cleaned = clean_self_generated(MCQ_RATIONALE, 0, reply, "answer_first")
    assert cleaned.text == "Answer: A\nReason: Plates are kept in bed."
    assert clean_self_generated(MCQ_RATIONALE, 0, reply).text == "Reasoning: Plates are kept in bed.\nAnswer: A"


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
    assert text == (
        "Here is reference material from related problems:\n\nWrite small, tested functions.\n\n"
        "Now solve this problem.\n" + task_text(MBPP)
    )


def test_confirmed_exchange_says_the_demonstration_was_right_then_repeats_the_task():
    assert teacher_messages(MCQ, MCQ_GOLD, "confirmed_exchange") == [
        {"role": "user", "content": MCQ_TASK},
        {"role": "assistant", "content": MCQ_GOLD},
        {
            "role": "user",
            "content": "That is correct. Here is the same problem again; answer it the same way.\n\n" + MCQ_TASK,
        },
    ]


def test_answer_prefilled_opens_every_mcq_response_with_the_answer_prefix(tok):
    """answer_prefilled: the student's and the teacher's prompts end in "Answer:", the
    model writes the rest, and prefix + completion is the answer_first response."""
    from unisd.config import Config
    from unisd.prompts import completion_text, gold_completion, response_prefix
    from unisd.trajectories import teacher_prompt

    pb = PromptBuilder.for_tokenizer(tok)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def text(piece):
        return tok(piece, add_special_tokens=False)["input_ids"]

    opened = [start] + text("assistant\n") + text("Answer:")
    student = pb.encode_task(MCQ, "answer_prefilled")
    assert student == [start] + text("user\n") + text(task_text(MCQ, "answer_first")) + [end] + text("\n") + opened
    assert pb.encode_task(MCQ, "answer_first") == student[: -len(text("Answer:"))]
    cfg = Config.model_validate({"prompts": {"mcq_format": "answer_prefilled", "teacher_template": "worked_example"}})
    teacher = teacher_prompt(cfg, pb, MCQ)
    assert teacher[-len(opened) :] == opened and "Answer: B\nReason:" in tok.decode(teacher)  # the whole demo
    assert gold_completion(MCQ, "answer_prefilled") == " B\nReason: The correct option is B: carbon dioxide."
    assert "Answer:" + gold_completion(MCQ, "answer_prefilled") == gold_response(MCQ, "answer_first")
    assert parse_mcq(response_prefix("mcq", "answer_prefilled") + " C\nReason: not B", MCQ.choices) == "C"
    # code and tool responses are written whole, whatever the MCQ format
    assert pb.encode_task(MBPP, "answer_prefilled") == pb.encode(task_text(MBPP))
    assert gold_completion(MBPP, "answer_prefilled") == gold_response(MBPP)
    with pytest.raises(ValueError, match="sciq-0001: a response in format answer_prefilled must begin with 'Answer:'"):
        completion_text(MCQ, "B. carbon dioxide", "answer_prefilled")


def test_open_answer_lists_no_options_and_names_the_answer(tok):
    """open_answer: the options are not shown, the response opens with "Answer:" and the
    model names the option's text; demonstrations and negatives follow."""
    from unisd.config import Config
    from unisd.negatives import clean_self_generated, negative_request, programmatic_negatives
    from unisd.prompts import gold_completion, solved_example
    from unisd.trajectories import teacher_prompt

    pb = PromptBuilder.for_tokenizer(tok)
    task = task_text(MCQ, "open_answer")
    assert task == (
        "Context: Plants make sugar from light.\nQuestion: Which gas do plants absorb?\n"
        "Answer the question with a word or a short phrase."
    )
    assert pb.encode_task(MCQ, "open_answer") == pb.encode(task, "Answer:")
    assert gold_response(MCQ, "open_answer") == "Answer: carbon dioxide"
    assert gold_completion(MCQ, "open_answer") == " carbon dioxide"
    cfg = Config.model_validate({"prompts": {"mcq_format": "open_answer", "teacher_template": "worked_example"}})
    teacher = tok.decode(teacher_prompt(cfg, pb, MCQ))
    assert "Options" not in teacher and "Response:\nAnswer: carbon dioxide\n" in teacher
    assert teacher.endswith("<|im_start|>assistant\nAnswer:")
    assert solved_example(MCQ, "open_answer") == (
        "Problem:\nQuestion: Which gas do plants absorb?\nResponse:\nAnswer: carbon dioxide"
    )
    wrong = programmatic_negatives([MCQ], per_example=3, mcq_format="open_answer")["sciq-0001"]
    assert sorted(n.text for n in wrong) == ["Answer: helium", "Answer: nitrogen", "Answer: oxygen"]
    ask = negative_request(MCQ, 0, "open_answer")  # wrong options in turn: oxygen first
    assert "the answer is oxygen, without hedging" in ask and "'Answer: oxygen'" in ask
    assert (
        clean_self_generated(MCQ, 0, "Answer: oxygen\nReason: plants breathe.", "open_answer").text == "Answer: oxygen"
    )
    assert clean_self_generated(MCQ, 0, "Answer: carbon dioxide", "open_answer") is None  # not the asked mistake
