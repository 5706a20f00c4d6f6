"""Reading answers out of model text, and running generated code against the tests."""

from pathlib import Path

import pytest

from unisd.data import Example, load_benchmark
from unisd.sandbox import Limits, run_many
from unisd.scoring import code_program, extract_code, parse_answer, parse_mcq, parse_open, parse_react, tool_scores

CHOICES = ["oxygen", "carbon dioxide", "nitrogen", "helium"]
LIMITS = Limits(timeout_s=10, memory_mb=512)


@pytest.mark.parametrize(
    "text, letter",
    [
        ("Answer: B", "B"),
        ("Reasoning: plants take in CO2.\nAnswer: B", "B"),
        ("**Answer:** C", "C"),
        ("Final answer: **(C)**", "C"),
        ("the answer is (D)", "D"),
        ("So the correct answer is A.", "A"),
        ("answer is: D.", "D"),
        ("The answer to the question is:\n\nD. helium\n\nHelium is a noble gas.", "D"),
        ("Answer：A", "A"),  # full-width colon
        ("Answer:\nB", "B"),
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("**B**", "B"),
        ("I think it is carbon dioxide.\nB. carbon dioxide", "B"),
        ("B. Carbon dioxide.", "B"),  # case and a final period do not matter
        ("B) carbon dioxide, which plants use", "B"),
        ("Answer: A\nWait, no.\nAnswer: C", "C"),  # the last answer wins
        ("Answer: B\nC", "B"),  # an explicit answer beats a bare last line
        ("B: carbon dioxide\nPlants take it in to make sugar.", "B"),  # a first line that names the option
        ("C\nbecause nitrogen is inert", "C"),  # a first line that is only a letter
        ("A\nsome text\nD", "D"),  # the last line beats the first
        # answer_first: the answer line first, then a reason
        ("Answer: B\nReason: plants take in CO2.", "B"),
        ("Answer: B\nReason: carbon dioxide, so the answer is not (C).", "B"),
        ("Answer: B\nReason: it is carbon dioxide, not answer C", "B"),  # an answer line beats a mention
        ("**Answer:** D\nReason: the answer is A only for animals", "D"),
        ("Reasoning: the answer is A for animals.\nAnswer: B", "B"),  # reason_first, the same rule
    ],
)
def test_parse_mcq_reads_the_letter(text, letter):
    assert parse_mcq(text, CHOICES) == letter


@pytest.mark.parametrize(
    "text",
    [
        "B. oxygen",  # the letter does not match the option text it restates
        "Answer: b",  # lowercase letters are not answers
        "b",
        "Answer: E",  # beyond the four options
        "E",
        "Answer: A\nAnswer: F",  # the last answer is invalid
        "The answer is Because of photosynthesis",  # a capital that starts a word is not a letter
        "I am not sure.",
        "Reasoning: it could be B or C",
        "B: oxygen\nbecause it is a gas",  # the first line's letter and option disagree
        "",
    ],
)
def test_parse_mcq_rejects(text):
    assert parse_mcq(text, CHOICES) is None


def test_parse_mcq_letters_depend_on_the_number_of_choices():
    assert parse_mcq("Answer: E", ["a", "b", "c", "d", "e"]) == "E"
    assert parse_mcq("Answer: C", ["yes", "no"]) is None
    assert parse_mcq("Answer: B", ["yes", "no"]) == "B"


@pytest.mark.parametrize(
    "text, code",
    [
        ("Here you go:\n```python\ndef f(x):\n    return x + 1\n```\nThis adds one.", "def f(x):\n    return x + 1\n"),
        ("```\ndef f(x):\n    return x\n```", "def f(x):\n    return x\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```Python\nx = 2\n```", "x = 2\n"),
        ("```python3\nx = 3\n```\nThe code sets x.", "x = 3\n"),
        ("```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # unterminated fence: the rest
        # Several blocks: the first that parses (the example usage is not Python).
        (
            "```python\n>>> f(2)\n3\n```\nSolution:\n```python\ndef f(x):\n    return x + 1\n```",
            "def f(x):\n    return x + 1\n",
        ),
        # Other languages are not code to run, even when they would parse.
        ('```json\n{"a": 1}\n```\n```python\ndef g():\n    return 2\n```', "def g():\n    return 2\n"),
        ("```bash\npip install numpy\n```\nthen\n```python\nimport numpy\n```", "import numpy\n"),
        # No block parses: the first one (scored as failing rather than dropped).
        ("```python\ndef f(:\n```\n```python\nreturn 1 +\n```", "def f(:\n"),
        ("def f(x):\n    return x * 2", "def f(x):\n    return x * 2"),  # no fence: the whole reply
    ],
)
def test_extract_code(text, code):
    assert extract_code(text).rstrip("\n") == code.rstrip("\n")  # a final newline does not matter


MBPP = Example(
    id="mbpp-t1",
    benchmark="mbpp",
    task="code",
    question="Write a function to add two numbers.",
    answer="def add(a, b):\n    return a + b\n",
    tests=["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
)
# Setup code that uses the solution's own class (as MBPP task 367 does with its `Node`).
TREE = Example(
    id="mbpp-t2",
    benchmark="mbpp",
    task="code",
    question="Write a function to count tree nodes.",
    answer="x",
    tests=["assert count(root) == 3"],
    test_setup="root = Node(1)\nroot.left = Node(2)\nroot.right = Node(3)",
)
TREE_SOLUTION = """```python
class Node:
    def __init__(self, v):
        self.v, self.left, self.right = v, None, None

def count(n):
    return 0 if n is None else 1 + count(n.left) + count(n.right)
```"""
MATH = Example(
    id="mbpp-t3",
    benchmark="mbpp",
    task="code",
    question="Circle area.",
    answer="x",
    tests=["assert math.isclose(area(1), math.pi)"],
    test_setup="import math",
)


@pytest.fixture(scope="module")
def humaneval() -> dict[str, Example]:
    folder = Path(__file__).parent / "fixtures" / "paper" / "humaneval"
    return {e.id: e for e in load_benchmark("paper", "humaneval", 0, source=str(folder))["test"]}


def test_code_program_mbpp_layout():
    program = code_program(MBPP, "```python\ndef add(a, b):\n    return a + b\n```")
    assert program.index("def add") < program.index("assert add(1, 2) == 3") < program.index("assert add(-1, 1) == 0")
    assert "```" not in program
    program = code_program(TREE, TREE_SOLUTION)
    assert program.index("class Node") < program.index("root = Node(1)") < program.index("assert count(root)")


def test_code_programs_pass_and_fail(humaneval):
    zero, ten = humaneval["HumanEval-0"], humaneval["HumanEval-10"]
    body = zero.answer[len(zero.code_prompt) :]  # the canonical solution's body
    loop_fn = (
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
        "               for j, b in enumerate(numbers) if i != j)\n"
    )
    cases = [
        (MBPP, "```python\ndef add(a, b):\n    return a + b\n```", "passed"),
        (MBPP, "```python\ndef add(a, b):\n    return a - b\n```", "failed"),
        (MBPP, "I cannot solve this.", "failed"),
        (TREE, TREE_SOLUTION, "passed"),
        (MATH, "```python\nimport math\ndef area(r):\n    return math.pi * r * r\n```", "passed"),
        (MATH, "```python\ndef area(r):\n    return 3.14 * r * r\n```", "failed"),
        (zero, zero.answer, "passed"),  # prompt + canonical solution
        (zero, body, "passed"),  # only the body, unfenced
        (zero, f"```python\n{body}```", "passed"),  # only the body, fenced
        (zero, f"```python\n{loop_fn}```", "passed"),  # the whole function, relying on the prompt's `List` import
        (zero, "```python\n" + loop_fn.replace("< threshold", "> threshold") + "```", "failed"),
        (zero, "    return False\n", "failed"),  # a wrong body
        # The whole function, using the helper defined in the prompt.
        (
            ten,
            "```python\ndef make_palindrome(string: str) -> str:\n    for i in range(len(string) + 1):\n"
            "        if is_palindrome(string[i:]):\n            return string + string[:i][::-1]\n```",
            "passed",
        ),
        (humaneval["HumanEval-2"], "    return number - int(number) + 1\n", "failed"),
        (humaneval["HumanEval-2"], "    return number % 1.0\n", "passed"),
    ]
    results = run_many([code_program(ex, reply) for ex, reply, _ in cases], LIMITS, workers=4)
    got = [(i, r.status) for i, r in enumerate(results)]
    assert got == [(i, want) for i, (_, _, want) in enumerate(cases)], [r.stderr[-300:] for r in results]


def test_humaneval_program_calls_check(humaneval):
    zero = humaneval["HumanEval-0"]
    program = code_program(zero, "    return False\n")
    assert program.startswith(zero.code_prompt + "    return False\n")
    assert program.rstrip().endswith("check(has_close_elements)")


TOOL = Example(
    id="toolalpaca-t1",
    benchmark="toolalpaca",
    task="tool",
    question="Weather in Paris?",
    tools="WeatherNow: weather\ngetCurrentWeather: current weather",
    answer="getCurrentWeather",
    action_input='{"city": "Paris", "units": "metric"}',
)


@pytest.mark.parametrize(
    "text, name, raw",
    [
        (
            'Thought: I need the weather.\nAction: getCurrentWeather\nAction Input: {"city": "Paris"}',
            "getCurrentWeather",
            '{"city": "Paris"}',
        ),
        (
            'Action: `getCurrentWeather`\nAction Input: {"city": "Paris"}\nObservation: {"temp": 18}\nThought: done',
            "getCurrentWeather",
            '{"city": "Paris"}',
        ),
        (
            'Action: getCurrentWeather\nAction Input: {\n  "city": "Paris"\n}\nThought: wait',
            "getCurrentWeather",
            '{\n  "city": "Paris"\n}',
        ),
        ("Action: getCurrentWeather", "getCurrentWeather", None),
        ("Thought: I can answer directly.\nFinal Answer: 18 degrees", None, None),
    ],
)
def test_parse_react(text, name, raw):
    assert parse_react(text) == (name, raw)


@pytest.mark.parametrize(
    "text, scores",
    [
        (
            'Thought: weather.\nAction: getCurrentWeather\nAction Input: {"city": "Paris", "units": "metric"}',
            (True, True, True),
        ),
        (
            'Action: getCurrentWeather\nAction Input: {"units": "metric", "city": "Paris"}',
            (True, True, True),
        ),  # key order
        (
            'Action: getCurrentWeather\nAction Input: {"units":"metric","city":"Paris"}\nObservation: {"temp": 18}',
            (True, True, True),
        ),  # what follows the input is not part of it
        ('Action: getCurrentWeather\nAction Input: {"city": "Paris"}', (True, False, False)),  # an argument missing
        ('Action: getCurrentWeather\nAction Input: {"city": "Lyon", "units": "metric"}', (True, False, False)),
        ('Action: getForecast\nAction Input: {"city": "Paris", "units": "metric"}', (False, True, False)),
        ("Action: getCurrentWeather", (True, False, False)),  # no Action Input
        ("Action: getCurrentWeather\nAction Input: city=Paris", (True, False, False)),  # not JSON
        ("I don't know.", (False, False, False)),
    ],
)
def test_tool_scores(text, scores):
    got = tool_scores(TOOL, text)
    assert (got["action"], got["arguments"], got["full"]) == scores


def test_tool_scores_empty_arguments():
    ex = TOOL.model_copy(update={"answer": "getRandomImage", "action_input": "{}"})
    assert tool_scores(ex, "Action: getRandomImage\nAction Input: {}")["full"]
    assert not tool_scores(ex, 'Action: getRandomImage\nAction Input: {"n": 1}')["arguments"]


OPEN_CHOICES = ["carbon", "carbon dioxide", "the oxygen", "B vitamins"]


@pytest.mark.parametrize(
    "text, letter",
    [
        ("Answer: carbon dioxide", "B"),  # the longest option named at a place
        (" Carbon-Dioxide.", "B"),  # case and punctuation aside
        (" oxygen and carbon", "C"),  # the option named first
        (" B. oxygen", "C"),  # a letter is not an answer here
        (" B vitamins", "D"),
        (" an oxygen atom", "C"),  # articles aside, as SQuAD normalises answers
        (" theoxygen", None),
        ("Answer: carbonate", None),  # whole words only
        (" I do not know", None),
        ("", None),
        ("Plants use it.\nAnswer: oxygen\nReason: not carbon", "C"),  # the answer line decides
        (" oxygen\nThe answer is carbon.", "C"),  # else the first line
    ],
)
def test_parse_open_reads_the_named_option(text, letter):
    assert parse_open(text, OPEN_CHOICES) == letter


def test_parse_answer_reads_the_layout_of_the_format():
    assert parse_answer("Answer: B vitamins", OPEN_CHOICES, "open_answer") == "D"
    assert parse_answer("Answer: B vitamins", OPEN_CHOICES, "answer_first") == "B"
