"""Plain values as tagged JSON, the only thing the sandbox sends back about a test.

A value is plain when its type is exactly one of the built-in data types below (no
subclasses, so no user-defined `__eq__`, `__hash__` or `__bool__`), recursively. JSON
carries None, bool, int, str and lists as they are; everything else becomes a one-key
object naming its type, so decoding rebuilds exactly the same types and the host's `==`,
`<`, `in`, `set(...)` on them behave as they would have in the program:

    float     {"float": repr}                  exact, also nan, inf and -0.0
    complex   {"complex": [repr, repr]}
    tuple     {"tuple": [...]}                 also set, frozenset, deque
    dict      {"dict": [[key, value], ...]}    also OrderedDict, Counter (defaultdict -> dict)
    bytes     {"bytes": hex}                   also bytearray

Decoding is written for hostile input: bare JSON floats and unknown tags are errors, and
so are nesting deeper than MAX_DEPTH, ints longer than Python's digit limit and
unhashable set members (ValueError or TypeError, never anything else).
"""

from __future__ import annotations

import collections
import json
import math

TYPE_CHECKING = False  # the sandbox's interpreter imports no `typing`; type checkers read this as true
if TYPE_CHECKING:
    from typing import Any

MAX_DEPTH = 100

_SEQUENCES: dict[type, str] = {tuple: "tuple", set: "set", frozenset: "frozenset", collections.deque: "deque"}
_MAPPINGS: dict[type, str] = {
    dict: "dict",
    collections.OrderedDict: "odict",
    collections.Counter: "counter",
    collections.defaultdict: "dict",
}
_BUILD = {
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "deque": collections.deque,
    "dict": dict,
    "odict": collections.OrderedDict,
    "counter": collections.Counter,
}


def encode(value: Any, depth: int = 0) -> object:
    """The JSON-ready form of a plain value; TypeError for anything else."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return {"float": float.__repr__(value)}
    if kind is complex:
        return {"complex": [float.__repr__(value.real), float.__repr__(value.imag)]}
    if kind is list:
        return [encode(v, depth + 1) for v in list.__iter__(value)]
    if kind in _SEQUENCES:
        return {_SEQUENCES[kind]: [encode(v, depth + 1) for v in value]}
    if kind in _MAPPINGS:
        items = value.items() if kind is collections.OrderedDict else dict.items(value)
        return {_MAPPINGS[kind]: [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in items]}
    if kind in (bytes, bytearray):
        return {kind.__name__: bytes(value).hex()}
    raise TypeError(f"not a plain value: {kind.__module__}.{kind.__qualname__}")


def decode(data: Any, depth: int = 0) -> object:
    """The value `encode` made `data` from (already parsed JSON)."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(data)
    if data is None or kind in (bool, int, str):
        return data
    if kind is list:
        return [decode(v, depth + 1) for v in data]
    if kind is not dict or len(data) != 1:
        raise ValueError(f"not an encoded value: {kind.__name__}")
    ((tag, body),) = data.items()
    if tag == "float" and type(body) is str:
        return _float(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(type(b) is str for b in body):
        return complex(_float(body[0]), _float(body[1]))
    if tag in ("bytes", "bytearray") and type(body) is str:
        return (bytes if tag == "bytes" else bytearray).fromhex(body)
    if tag in ("tuple", "set", "frozenset", "deque") and type(body) is list:
        return _BUILD[tag](decode(v, depth + 1) for v in body)
    if tag in ("dict", "odict", "counter") and type(body) is list:
        if not all(type(kv) is list and len(kv) == 2 for kv in body):
            raise ValueError("malformed mapping")
        pairs = dict((decode(k, depth + 1), decode(v, depth + 1)) for k, v in body)
        return _BUILD[tag](pairs) if tag != "dict" else pairs
    raise ValueError(f"unknown tag {tag[:40]!r}")


def _float(text: str) -> float:
    value = float(text)  # ValueError for anything that is not a float literal
    if not math.isfinite(value) and text.strip().lstrip("+-").lower() not in ("inf", "nan", "infinity"):
        raise ValueError("malformed float")
    return value


def parse(text: str | bytes) -> object:
    """Strict JSON: bare floats and NaN/Infinity literals are rejected (encode never makes
    them), and so is nesting too deep for the parser (ValueError, not RecursionError)."""
    try:
        return json.loads(text, parse_float=_no_bare, parse_constant=_no_bare)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _no_bare(token: str) -> object:
    raise ValueError(f"bare JSON number {token[:40]!r}")


def plain(value: object) -> object:
    """A fresh plain copy of `value`: test code inside the sandbox works on this, never on
    an object the candidate made (TypeError when it is not plain)."""
    return decode(encode(value))
