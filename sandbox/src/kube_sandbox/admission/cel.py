"""CEL, the expression language of ValidatingAdmissionPolicies, through cel-python (``celpy``).

This is the one module that imports ``celpy``: it compiles expression text once, evaluates it
against JSON-shaped values and turns the library's results and errors into plain Python and
:class:`CompileError` / :class:`EvaluationError`. Policies are data; nothing here knows about them.

cel-python implements the CEL standard (macros ``has``, ``all``, ``exists``, ``exists_one``,
``map``, ``filter``; ``size``, ``startsWith``, ``endsWith``, ``contains``, ``matches``, ``in``,
conversions, timestamps and durations). It is dynamically typed: expressions are not type-checked
against the object's schema, and Kubernetes' own CEL libraries (``quantity``, ``url``, ``ip``,
``authorizer``, the extended string functions such as ``split`` or ``lowerAscii``, optional types)
are absent: an expression using one fails when it is evaluated, as any runtime error does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import celpy
from celpy import adapter, celparser, celtypes, evaluation


class CompileError(ValueError):
    """The expression is not valid CEL."""


class EvaluationError(RuntimeError):
    """The expression failed at run time (a missing field, a type mismatch, an unknown function)."""


_ENV = celpy.Environment()


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled expression; :meth:`evaluate` runs it against named values."""

    text: str
    _runner: celpy.Runner = dataclasses.field(repr=False, compare=False)

    def evaluate_raw(self, activation: Mapping[str, Any]) -> Any:
        """The CEL value of the expression, or an ``EvaluationError``."""
        try:
            result = self._runner.evaluate(dict(activation))
        except evaluation.CELEvalError as exc:
            raise EvaluationError(_eval_message(exc)) from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
            # cel-python lets some host errors through instead of wrapping them.
            raise EvaluationError(f"{type(exc).__name__}: {exc}") from exc
        if isinstance(result, evaluation.CELEvalError):
            raise EvaluationError(_eval_message(result))
        return result

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        """The expression's value as plain Python (bool, int, str, list, dict, None, ...)."""
        return to_python(self.evaluate_raw(activation))


def _eval_message(exc: evaluation.CELEvalError) -> str:
    args = exc.args
    text = str(args[0]) if args else "evaluation error"
    return text


@functools.lru_cache(maxsize=4096)
def compile_expression(text: str) -> Program:
    """Compile ``text`` (cached: policies are compiled once per version, not once per request)."""
    try:
        tree = _ENV.compile(text)
    except celparser.CELParseError as exc:
        where = f" at line {exc.line}, column {exc.column}" if exc.line is not None else ""
        raise CompileError(f"compilation failed{where}: {' '.join(str(exc).split())}") from exc
    return Program(text=text, _runner=_ENV.program(tree))


def value(data: Any) -> Any:
    """A JSON value (dicts, lists, strings, numbers, booleans, None) as CEL values."""
    return adapter.json_to_cel(data)


def lazy_map(entries: Mapping[str, Any]) -> Any:
    """A CEL map of already converted values; an ``EvaluationError`` entry stays an error value.

    That is how ``variables`` behave lazily: a variable that failed only fails the expressions
    that read it (``a || variables.broken`` is true when ``a`` is).
    """
    converted: dict[Any, Any] = {}
    for key, entry in entries.items():
        if isinstance(entry, EvaluationError):
            converted[celtypes.StringType(key)] = evaluation.CELEvalError(str(entry), RuntimeError, None)
        else:
            converted[celtypes.StringType(key)] = entry
    return celtypes.MapType(converted)


def is_bool(result: Any) -> bool:
    """Whether a raw CEL result is a boolean (validations and match conditions must be)."""
    # cel-python returns its own types mostly, and plain Python values from some operators.
    return isinstance(result, celtypes.BoolType | bool)


def is_string(result: Any) -> bool:
    """Whether a raw CEL result is a string (``+`` of strings gives a plain ``str``)."""
    return isinstance(result, str)


def type_name(result: Any) -> str:
    """The CEL type of a raw result, for messages (``int``, ``string``, ``null_type``, ...)."""
    if result is None:
        return "null_type"
    if isinstance(result, bool):
        return "bool"
    if isinstance(result, str):
        return "string"
    names = {
        celtypes.BoolType: "bool",
        celtypes.IntType: "int",
        celtypes.UintType: "uint",
        celtypes.DoubleType: "double",
        celtypes.StringType: "string",
        celtypes.BytesType: "bytes",
        celtypes.ListType: "list",
        celtypes.MapType: "map",
    }
    for cls, name in names.items():
        if isinstance(result, cls):
            return name
    return type(result).__name__


def to_python(result: Any) -> Any:
    """A raw CEL value as plain Python."""
    if result is None or isinstance(result, bool | str):
        return result if not isinstance(result, str) else str(result)
    if isinstance(result, celtypes.BoolType):
        return bool(result)
    if isinstance(result, int):
        return int(result)
    if isinstance(result, float):
        return float(result)
    if isinstance(result, bytes):
        return bytes(result)
    if isinstance(result, list):
        return [to_python(item) for item in result]
    if isinstance(result, dict):
        return {to_python(k): to_python(v) for k, v in result.items()}
    return str(result)
