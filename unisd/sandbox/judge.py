"""Deciding pass/fail outside the sandbox, from plain values the sandbox reports.

Every `assert` of a test program becomes a *site*. Its expression is split in two: the
parts that need the candidate's code (calls of its functions, the test's own variables)
become *probes*, computed inside the sandbox and sent back as plain values
(`inside.codec`); the rest (constants, comparisons, `abs`, `set`, `sorted`, `len`,
`math.isclose`, `+`/`-`, indexing, ...) is kept here as a *template* and evaluated by
this module's own small interpreter over the decoded values. So

    assert add(1, 2) == 3                                  -> probe add(1, 2);  P0 == 3
    assert math.isclose(area(1), 3.14159, rel_tol=0.001)   -> probe area(1);    math.isclose(P0, ...)
    assert abs(candidate(1.33) - 0.33) < 1e-6              -> probe candidate(1.33); abs(P0 - 0.33) < 1e-6
    assert set(f(a)) == set((4, 5))                        -> probe f(a);       set(P0) == set((4, 5))

and the expected values never enter the sandbox. `assert A and B` is two sites. A probe
is a whole expression when its parts cannot be separated (a lambda or generator inside,
an operator other than +/- applied to a probe): then the sandbox computes more of it.

HumanEval's `check(candidate)` programs get the same treatment, and every call of
`candidate` inside `check` is passed through `__plain__`, so the test's own code (loops,
arithmetic) only ever sees plain values, never an object made by the candidate.

A run passes only if the sandbox's runner said it was ready before the candidate's code
started, every site outside conditional code (if/while/try/nested functions) reported at
least once, every report satisfied its template, and the runner reported the end of the
tests. What stays in the sandbox: the probes, and with them expected values that the test
computes at run time (HumanEval loops such as `candidate(x, y) == x + y`); a candidate
that tampers with the harness in its own process can fake those, and can skip reports
of loop iterations after the first and of conditional sites. See docs/security.md.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from .inside import codec


class CodeTest(str):
    """A candidate solution and the tests it must pass, judged outside the sandbox.

    It reads as the whole program (`solution`, a blank line, `tests`): what a person runs
    by hand, and what older versions ran and scored by exit status. The sandbox never
    runs that text: it runs `solution`, then `tests` with the asserts split into probes.
    `tests` holds any setup code too (MBPP's test_setup, HumanEval's `check(...)` call).
    `solution_names`: what the tests call from the solution, as the *reference* solution
    defines it (MBPP 126 tests a function named `sum`): those names are never taken for
    the builtins the judge evaluates itself. A candidate cannot add to them.
    """

    solution: str
    tests: str
    solution_names: frozenset[str]

    def __new__(cls, solution: str, tests: str, solution_names: frozenset[str] = frozenset()) -> CodeTest:
        self = super().__new__(cls, f"{solution}\n\n{tests}")
        self.solution, self.tests, self.solution_names = solution, tests, frozenset(solution_names)
        return self


@dataclass(frozen=True)
class Site:
    template: ast.expr
    probes: int
    required: bool


@dataclass(frozen=True)
class Plan:
    """The tests as the sandbox runs them (`__report__(k, probe...)` for each site k)."""

    inside_tests: str
    sites: tuple[Site, ...]


class TestsUnjudgeable(ValueError):
    """The test program cannot be split (it does not parse)."""


def plan(test: CodeTest) -> Plan:
    try:
        tree = ast.parse(test.tests)
    except SyntaxError as err:
        raise TestsUnjudgeable(f"the tests do not parse: {err.msg} (line {err.lineno})") from None
    rewriter = _Rewriter(_host_names(tree, test.solution_names))
    tree = ast.fix_missing_locations(rewriter.visit(tree))
    return Plan(ast.unparse(tree), tuple(rewriter.sites))


# ----------------------------------------------------------------------------- splitting

_HOST_FUNCS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (abs, len, set, frozenset, sorted, tuple, list, dict, bool, int, float, str, min, max, sum, all, any)
}
_MATH_FUNCS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (math.isclose, math.fabs, math.isnan, math.isinf, math.isfinite, math.floor, math.ceil, math.sqrt)
}
_MATH_CONSTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf, "nan": math.nan}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.Not: operator.not_,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Invert: operator.invert,
}
# +/- also on probes; the others only on constants (the dataset's, never the sandbox's: 2 ** huge).
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub}
_CONST_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
# Values that are not plain (a function, a generator) cannot be probes: their parent is.
_NOT_PROBES = (ast.Lambda, ast.GeneratorExp, ast.Starred, ast.Yield, ast.YieldFrom, ast.Await, ast.Slice)
# Code in these may not run at all, so its sites cannot be required.
_CONDITIONAL = (
    ast.If,
    ast.While,
    ast.Try,
    ast.Match,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Lambda,
    ast.With,
    ast.AsyncWith,
    ast.AsyncFor,
)
_PROBE = "_probe_"


@dataclass(frozen=True)
class _HostNames:
    funcs: frozenset[str]
    math: bool


def _host_names(tree: ast.Module, solution_names: frozenset[str]) -> _HostNames:
    """The builtins and `math` the template may call: those neither the tests nor the
    reference solution rebind."""
    bound: set[str] = set(solution_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias) and not (node.name == "math" and node.asname is None):
            bound.add(node.asname or node.name.split(".")[0])
    return _HostNames(frozenset(_HOST_FUNCS) - bound, "math" not in bound)


def defined_names(code: str) -> frozenset[str]:
    """The module-level names `code` binds (none when it does not parse)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return frozenset()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):  # `import math` binds the real module: not a rebinding
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.asname or a.name != "math"}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return frozenset(names)


class _Absorb(Exception):
    """A part that cannot be a probe: the enclosing expression becomes one."""


@dataclass
class _Split:
    names: _HostNames
    probes: list[ast.expr] = field(default_factory=list)

    def split(self, node: ast.expr) -> ast.expr:
        """The template for `node`, appending the probes it needs."""
        if self._host_kind(node):
            mark = len(self.probes)
            try:
                return self._rebuild(node)
            except _Absorb:
                del self.probes[mark:]
        if isinstance(node, _NOT_PROBES):
            raise _Absorb
        self.probes.append(node)
        return ast.Name(f"{_PROBE}{len(self.probes) - 1}", ast.Load())

    def _host_kind(self, node: ast.expr) -> bool:
        if isinstance(node, (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Compare, ast.Slice)):
            return True
        if isinstance(node, ast.Dict):
            return None not in node.keys
        if isinstance(node, ast.UnaryOp):
            return type(node.op) in _UNARY
        if isinstance(node, ast.BinOp):
            return type(node.op) in _BINARY or type(node.op) in _CONST_BINARY
        if isinstance(node, ast.Subscript):
            return True
        if isinstance(node, ast.Attribute):
            return self._math(node) and node.attr in _MATH_CONSTS
        if isinstance(node, ast.Call):
            func = node.func
            known = (isinstance(func, ast.Name) and func.id in self.names.funcs) or (
                isinstance(func, ast.Attribute) and self._math(func) and func.attr in _MATH_FUNCS
            )
            return known and all(k.arg is not None for k in node.keywords)
        return False

    def _math(self, node: ast.Attribute) -> bool:
        return self.names.math and isinstance(node.value, ast.Name) and node.value.id == "math"

    def _rebuild(self, node: ast.expr) -> ast.expr:
        if isinstance(node, (ast.Constant, ast.Attribute)):
            return node
        if isinstance(node, ast.BinOp) and type(node.op) in _CONST_BINARY:
            mark = len(self.probes)
            new: ast.expr = ast.BinOp(self.split(node.left), node.op, self.split(node.right))
            if len(self.probes) > mark:
                raise _Absorb
            return new
        if isinstance(node, ast.Call):
            return ast.Call(
                node.func,
                [self.split(a) for a in node.args],
                [ast.keyword(k.arg, self.split(k.value)) for k in node.keywords],
            )
        new = type(node)()
        for name, value in ast.iter_fields(node):
            if isinstance(value, ast.expr):
                value = self.split(value)
            elif isinstance(value, list):
                value = [self.split(v) if isinstance(v, ast.expr) else v for v in value]
            setattr(new, name, value)
        return new


class _Rewriter(ast.NodeTransformer):
    """Asserts -> `__report__(k, probes...)`; `candidate(...)` in check -> `__plain__(...)`."""

    def __init__(self, names: _HostNames) -> None:
        self.names, self.conditional = names, 0
        self.sites: list[Site] = []
        self.candidate: str | None = None

    def visit_Assert(self, node: ast.Assert) -> list[ast.stmt]:
        node = cast(ast.Assert, self.generic_visit(node))  # the same node, its children rewritten
        parts = (
            node.test.values if isinstance(node.test, ast.BoolOp) and isinstance(node.test.op, ast.And) else [node.test]
        )
        return [self._site(part, node) for part in parts]

    def _site(self, test: ast.expr, where: ast.stmt) -> ast.stmt:
        split = _Split(self.names)
        try:
            template = split.split(test)
        except _Absorb:  # the whole test is, e.g., a lambda: only its truth can be reported
            split.probes = [ast.Call(ast.Name("bool", ast.Load()), [test], [])]
            template = ast.Name(f"{_PROBE}0", ast.Load())
        self.sites.append(Site(template, len(split.probes), self.conditional == 0))
        call = ast.Call(ast.Name("__report__", ast.Load()), [ast.Constant(len(self.sites) - 1), *split.probes], [])
        return ast.copy_location(ast.Expr(call), where)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        if node.name == "check" and node.args.args and self.candidate is None:
            self.candidate = node.args.args[0].arg
            try:
                return self.generic_visit(node)
            finally:
                self.candidate = None
        return self._conditional(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        node = cast(ast.Call, self.generic_visit(node))  # the same node, its children rewritten
        if self.candidate and isinstance(node.func, ast.Name) and node.func.id == self.candidate:
            return ast.copy_location(ast.Call(ast.Name("__plain__", ast.Load()), [node], []), node)
        return node

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if isinstance(node, _CONDITIONAL) and not isinstance(node, ast.FunctionDef):
            return self._conditional(node)
        return super().generic_visit(node)

    def _conditional(self, node: ast.AST) -> ast.AST:
        self.conditional += 1
        try:
            return super().generic_visit(node)
        finally:
            self.conditional -= 1


# ----------------------------------------------------------------------------- evaluating


def evaluate(template: ast.expr, values: list[Any]) -> Any:
    """The template's value with probe i = values[i]; only the constructs `_Split` keeps."""
    ev = lambda n: evaluate(n, values)  # noqa: E731
    if isinstance(template, ast.Constant):
        return template.value
    if isinstance(template, ast.Name):
        return values[int(template.id[len(_PROBE) :])]
    if isinstance(template, (ast.Tuple, ast.List, ast.Set)):
        items = [ev(e) for e in template.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(template)](items)
    if isinstance(template, ast.Dict):
        return {ev(k): ev(v) for k, v in zip(template.keys, template.values)}
    if isinstance(template, ast.UnaryOp):
        return _UNARY[type(template.op)](ev(template.operand))
    if isinstance(template, ast.BinOp):
        return {**_BINARY, **_CONST_BINARY}[type(template.op)](ev(template.left), ev(template.right))
    if isinstance(template, ast.Compare):
        left = ev(template.left)
        for op, right_node in zip(template.ops, template.comparators):
            right = ev(right_node)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(template, ast.Subscript):
        return ev(template.value)[ev(template.slice)]
    if isinstance(template, ast.Slice):
        return slice(*(None if p is None else ev(p) for p in (template.lower, template.upper, template.step)))
    if isinstance(template, ast.Attribute):
        return _MATH_CONSTS[template.attr]
    if isinstance(template, ast.Call):
        func = template.func
        fn = _MATH_FUNCS[func.attr] if isinstance(func, ast.Attribute) else _HOST_FUNCS[cast(ast.Name, func).id]
        return fn(*[ev(a) for a in template.args], **{cast(str, k.arg): ev(k.value) for k in template.keywords})
    raise TypeError(f"not a template node: {type(template).__name__}")


# ----------------------------------------------------------------------------- verdict


class Judge:
    """Reads the report channel line by line and decides; every line is hostile.

    The first record must be the runner's `{"ready": true}` (sent before the candidate's
    code starts: nothing can come before it); then `{"site": [k, [values...]]}`,
    `{"error": text}` and finally `{"end": true}`. The first failing site fails the run
    (`failure` is set, later lines are ignored: the caller stops the sandbox).
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.ready = False
        self.failure = ""
        self.ended = False
        self.reported: set[int] = set()

    def feed(self, line: bytes) -> None:
        if self.failure:
            return
        try:
            record = codec.parse(line)
        except ValueError:
            return self.fail("malformed report")
        key, body = next(iter(record.items())) if type(record) is dict and len(record) == 1 else (None, None)
        if not self.ready:
            if key == "ready" and body is True:
                self.ready = True
                return None
            return self.fail("report before the sandbox was ready")
        if self.ended:
            return self.fail("report after the end of the tests")
        if key == "site":
            return self._site(body)
        if key == "error":
            return self.fail(f"raised {str(body)[:300]}")
        if key == "end" and body is True:
            self.ended = True
            return None
        return self.fail("malformed report")

    def _site(self, body: object) -> None:
        if not (
            type(body) is list
            and len(body) == 2
            and type(body[0]) is int
            and type(body[1]) is list
            and 0 <= body[0] < len(self.plan.sites)
            and len(body[1]) == self.plan.sites[body[0]].probes
        ):
            return self.fail("malformed report")
        k, encoded = body
        try:
            values = [codec.decode(v) for v in encoded]
        except (ValueError, TypeError):
            return self.fail(f"test {k + 1}: malformed value")
        try:
            ok = bool(evaluate(self.plan.sites[k].template, values))
        except Exception as err:  # the comparison itself raised (e.g. '<' between str and int)
            return self.fail(f"test {k + 1} raised {type(err).__name__}: {str(err)[:200]}")
        if not ok:
            got = ", ".join(_short(v) for v in values)
            return self.fail(f"test {k + 1} failed" + (f" (got {got})" if values else ""))
        self.reported.add(k)
        return None

    def fail(self, reason: str) -> None:
        self.failure = reason

    def verdict(self) -> str:
        """'' when the run passed, else why not (timeouts are the caller's to name)."""
        if self.failure or not self.ready:
            return self.failure or "the sandbox did not start"
        if not self.plan.sites:
            return "the tests contain no assert"
        if not self.ended:
            return "exited before all tests reported"
        missing = [k for k, s in enumerate(self.plan.sites) if s.required and k not in self.reported]
        return f"test {missing[0] + 1} never reported" if missing else ""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
