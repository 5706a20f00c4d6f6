"""Wrong versions of a reference solution: single-site AST mutations of one named bug type.

`code_mutants(code, kind)` lists every distinct mutant of `code` that carries exactly
one bug of type `kind` (`BUG_TYPES`): an off-by-one bound or index, a wrong operator,
a missing edge case (an early `if` dropped), a wrong return value. Outside the rewritten
span a mutant keeps the reference's text, so the two differ only by the bug. Whether a
mutant really is wrong (fails a test the reference passes) is decided by running it
(`unisd.negatives`); this module only rewrites code, it never runs any.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from typing import Any, TypeGuard, cast, overload

BUG_TYPES = ("off_by_one", "wrong_operator", "missing_edge_case", "wrong_return")
Edit = tuple[ast.AST, ast.AST | list[ast.stmt]]  # (the node rewritten, what replaces it)


def code_mutants(code: str, kind: str, entry_point: str = "") -> list[str]:
    """Every distinct single-site mutant of `code` of one bug type, in source order.

    With `entry_point` (HumanEval) only that function's body is mutated, so the prompt's
    signature, docstring and helpers stay as they are. Outside the rewritten span a mutant
    keeps the reference's text (comments, layout), so that gold and negative differ only
    by the bug. Mutants that do not parse or equal the reference are left out.
    """
    if kind not in _MUTATORS:
        raise ValueError(f"unknown bug type {kind!r} (known: {', '.join(BUG_TYPES)})")
    try:
        reference = ast.dump(ast.parse(code))
    except SyntaxError:
        return []
    counter = _MUTATORS[kind]()
    if (scope := _scope(ast.parse(code), entry_point)) is None:
        return []
    counter.visit(scope)
    mutants: list[str] = []
    for target in range(counter.sites):
        tree = ast.parse(code)
        mutator = _MUTATORS[kind](target)
        mutator.visit(cast(ast.AST, _scope(tree, entry_point)))  # found in the same code above
        mutant = _render(code, tree, cast(Edit, mutator.edit))  # target < sites: the target was taken
        if mutant is not None and ast.dump(ast.parse(mutant)) != reference and mutant not in mutants:
            mutants.append(mutant)
    return mutants


def _scope(tree: ast.Module, entry_point: str) -> ast.AST | None:
    if not entry_point:
        return tree
    return next(
        (
            node
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point
        ),
        None,
    )


def _render(source: str, tree: ast.Module, edit: Edit) -> str | None:
    """The mutant's text: the reference with only the mutated span rewritten when that
    reproduces the mutated tree, else the whole tree unparsed; None if neither parses."""
    node, new = edit
    text = "\n".join(ast.unparse(s) for s in new) if isinstance(new, list) else ast.unparse(new)
    spliced = _splice(source, node, text)
    if parse_dump(spliced) == ast.dump(tree):
        return spliced
    whole = ast.unparse(tree)
    return whole if parse_dump(whole) is not None else None


def parse_dump(code: str) -> str | None:
    """The AST dump of `code` (equal for programs that differ only in layout); None if it does not parse."""
    try:
        return ast.dump(ast.parse(code))
    except SyntaxError:
        return None


def _splice(source: str, node: Any, text: str) -> str:
    """`source` with `node`'s span (a statement's or an expression's) replaced by `text`; an
    empty text removes the node's lines."""
    raw = source.encode()  # ast columns count UTF-8 bytes
    starts = [0]
    for line in raw.split(b"\n"):
        starts.append(starts[-1] + len(line) + 1)
    line_start = starts[node.lineno - 1]
    if text:
        begin, end = line_start + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset
    else:
        begin, end = line_start, starts[node.end_lineno]
    indent = raw[line_start : line_start + node.col_offset].decode()
    return (raw[:begin] + text.replace("\n", "\n" + indent).encode() + raw[end:]).decode()


class _Mutator(ast.NodeTransformer):
    """Counts the sites of one bug type in traversal order and rewrites only the
    `target`-th; `edit` keeps (original node, replacement) for splicing.

    Function signatures are never visited, only bodies: tests call the signature.
    """

    def __init__(self, target: int = -1) -> None:
        self.target, self.sites = target, 0
        self.edit: Edit | None = None

    def take(self, node: ast.AST, replacement: ast.AST | list[ast.stmt]) -> bool:
        hit = self.sites == self.target
        self.sites += 1
        if hit:
            self.edit = (node, replacement)
        return hit

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        body = ast.Module(body=node.body, type_ignores=[])
        self.generic_visit(body)
        node.body = body.body
        return node

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]  # the same walk


class _OffByOne(_Mutator):
    """range() bounds, integer-like indices and slice bounds, and integer constants in
    comparisons, moved by +1 and by −1."""

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "range":
            node.args[:2] = [self.shifted(arg, lambda _: True) for arg in node.args[:2]]
        return node

    def visit_Subscript(self, node: ast.Subscript) -> ast.Subscript:
        self.generic_visit(node)
        if isinstance(node.slice, ast.Slice):
            node.slice.lower = self.shifted(node.slice.lower, _countable)
            node.slice.upper = self.shifted(node.slice.upper, _countable)
        else:
            node.slice = self.shifted(node.slice, _countable)
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.Compare:
        self.generic_visit(node)
        node.left = self.shifted(node.left, _is_int)
        node.comparators = [self.shifted(c, _is_int) for c in node.comparators]
        return node

    @overload
    def shifted(self, node: ast.expr, eligible: Callable[[ast.AST], bool]) -> ast.expr: ...
    @overload
    def shifted(self, node: ast.expr | None, eligible: Callable[[ast.AST], bool]) -> ast.expr | None: ...

    def shifted(self, node: ast.expr | None, eligible: Callable[[ast.AST], bool]) -> ast.expr | None:
        if node is None or not eligible(node):
            return node
        for delta in (1, -1):
            new = _shift(node, delta)
            if self.take(node, new):
                return new
        return node


def _int_value(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and (inner := _int_value(node.operand)) is not None
    ):
        return -inner
    return None


def _int_node(value: int) -> ast.expr:
    return ast.Constant(value) if value >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-value))


def _is_int(node: ast.AST) -> bool:
    return _int_value(node) is not None


def _plus_minus_int(node: ast.AST) -> TypeGuard[ast.BinOp]:
    return isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)) and _is_int(node.right)


def _countable(node: ast.AST) -> bool:
    """An index that is clearly a count: a literal, `x ± k` or `len(...)`."""
    is_len = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len"
    return _is_int(node) or _plus_minus_int(node) or is_len


def _shift(node: ast.expr, delta: int) -> ast.expr:
    """`node ± 1`, folded into a literal or an existing `± k` so the bug reads naturally
    (`len(x) - 1` becomes `len(x)` or `len(x) - 2`, not `len(x) - 1 + 1`)."""
    if (value := _int_value(node)) is not None:
        return _int_node(value + delta)
    if _plus_minus_int(node):
        k = cast(int, _int_value(node.right)) * (1 if isinstance(node.op, ast.Add) else -1) + delta
        if k == 0:
            return node.left
        return ast.BinOp(node.left, ast.Add() if k > 0 else ast.Sub(), _int_node(abs(k)))
    return ast.BinOp(node, ast.Add() if delta > 0 else ast.Sub(), ast.Constant(1))


_ARITHMETIC = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}
_COMPARISON = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_LOGIC = {ast.And: ast.Or, ast.Or: ast.And}


class _WrongOperator(_Mutator):
    """+ ↔ −, * ↔ //, / → *, % → //, ** → *, & ↔ |, << ↔ >>, < ↔ <=, > ↔ >=, == ↔ !=,
    in ↔ not in, is ↔ is not, and ↔ or; also in augmented assignments."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.BinOp:
        self.generic_visit(node)
        if _is_text(node.left) or _is_text(node.right):
            return node  # string joining and %-formatting would only crash, not be subtly wrong
        return self.swapped(node, _ARITHMETIC)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AugAssign:
        self.generic_visit(node)
        return self.swapped(node, _ARITHMETIC)

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.BoolOp:
        self.generic_visit(node)
        return self.swapped(node, _LOGIC)

    def visit_Compare(self, node: ast.Compare) -> ast.Compare:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            if type(op) in _COMPARISON:
                new = copy.copy(node)
                new.ops = [*node.ops[:i], _COMPARISON[type(op)](), *node.ops[i + 1 :]]
                if self.take(node, new):
                    return new
        return node

    def swapped(self, node: Any, table: dict[Any, Any]) -> Any:
        if type(node.op) not in table:
            return node
        new = copy.copy(node)
        new.op = table[type(node.op)]()
        return new if self.take(node, new) else node


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


_JUMPS = (ast.Return, ast.Raise, ast.Continue, ast.Break)


class _MissingEdgeCase(_Mutator):
    """A guard clause (an `if` whose branch ends in return/raise/continue/break) dropped,
    or an `if` condition inverted."""

    def visit_If(self, node: ast.If) -> ast.If | list[ast.stmt]:
        self.generic_visit(node)
        if node.body and isinstance(node.body[-1], _JUMPS) and self.take(node, node.orelse):
            return node.orelse
        inverted = _negate(node.test)
        if self.take(node.test, inverted):
            node.test = inverted
        return node


def _negate(expr: ast.expr) -> ast.expr:
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
        return expr.operand
    return ast.UnaryOp(ast.Not(), expr)


class _WrongReturn(_Mutator):
    """A returned boolean negated; any other returned value replaced by the function's
    first argument or by None."""

    def __init__(self, target: int = -1) -> None:
        super().__init__(target)
        self.first_args: list[str | None] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
        self.first_args.append(names[0] if names else None)
        node = super().visit_FunctionDef(node)
        self.first_args.pop()
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Return(self, node: ast.Return) -> ast.Return:
        if node.value is None:
            return node
        first_arg = self.first_args[-1] if self.first_args else None
        for new in _wrong_values(node.value, first_arg):
            if self.take(node.value, new):
                node.value = new
                break
        return node


def _wrong_values(value: ast.expr, first_arg: str | None) -> list[ast.expr]:
    if isinstance(value, ast.Constant) and isinstance(value.value, bool):
        return [ast.Constant(not value.value)]
    negation = isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.Not)
    if isinstance(value, (ast.Compare, ast.BoolOp)) or negation:
        return [_negate(value)]
    out: list[ast.expr] = []
    if first_arg and not (isinstance(value, ast.Name) and value.id == first_arg):
        out.append(ast.Name(first_arg, ast.Load()))
    if not (isinstance(value, ast.Constant) and value.value is None):
        out.append(ast.Constant(None))
    return out


_MUTATORS: dict[str, type[_Mutator]] = {
    "off_by_one": _OffByOne,
    "wrong_operator": _WrongOperator,
    "missing_edge_case": _MissingEdgeCase,
    "wrong_return": _WrongReturn,
}
