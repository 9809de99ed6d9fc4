"""`calculate_output` of a multi grader: parsed once under a strict whitelist and evaluated over the
sub-graders' rewards as floats.

The grammar: numbers, the sub-graders' names, `+ - * /`, `^` for power (`**` too), unary minus and plus,
parentheses, and calls of min, max, abs, floor, ceil, exp, sqrt, log (natural; `log(x, base)` too). The text
goes through Python's `ast.parse` (after `^` becomes `**`, so power binds tighter than `*` and is
right-associative, as in mathematics); every node that is not in that grammar is refused, and the accepted
tree is copied into plain tuples. Nothing is ever handed to eval, exec or compile, and there are no
attributes, subscripts, strings, comparisons, lambdas or comprehensions to reach. Length and nesting are
bounded before and after parsing; evaluation checks every intermediate value (division by zero, overflow,
a domain error) and raises FormulaEvaluationError instead of returning inf or nan."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from graders.errors import INVALID_FORMULA, GraderError
from graders.limits import MAX_FORMULA_CHARS, MAX_FORMULA_DEPTH


def _floor(x: float) -> float:
    return float(math.floor(x))


def _ceil(x: float) -> float:
    return float(math.ceil(x))


# name -> (least arguments, most arguments or None, function)
FUNCTIONS: dict[str, tuple[int, int | None, Callable[..., float]]] = {
    "min": (1, None, lambda *xs: min(xs)),
    "max": (1, None, lambda *xs: max(xs)),
    "abs": (1, 1, abs),
    "floor": (1, 1, _floor),
    "ceil": (1, 1, _ceil),
    "exp": (1, 1, math.exp),
    "sqrt": (1, 1, math.sqrt),
    "log": (1, 2, math.log),
}
_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "^"}
_UNARY = {ast.USub: "-", ast.UAdd: "+"}
# What the commonest refused nodes are, in the user's words.
_REFUSED = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.Compare: "comparisons",
    ast.BoolOp: "and/or",
    ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignment",
    ast.Starred: "starred arguments",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.JoinedStr: "strings",
    ast.Await: "await",
}


class FormulaEvaluationError(ArithmeticError):
    """The formula has no finite value for these rewards (division by zero, overflow, a domain error)."""


# A parsed formula is a tree of tuples: ("num", x), ("var", name), ("neg", node), ("pos", node),
# ("bin", op, left, right), ("call", name, (args...)).
Node = tuple


@dataclass(frozen=True)
class Formula:
    text: str
    tree: Node
    names: frozenset[str]  # the sub-graders it reads

    def evaluate(self, values: Mapping[str, float]) -> float:
        """The formula's value over `values` (a reward per name it reads)."""
        return _evaluate(self.tree, values)


def parse_formula(text: object, names: Iterable[str], path: str) -> Formula:
    """Check `text` (the field at `path`) against the grammar, with `names` the only variables."""
    allowed = frozenset(names)
    if not isinstance(text, str):
        raise GraderError(f"'{path}' must be a string.", path, INVALID_FORMULA)
    if not text.strip():
        raise GraderError(f"'{path}' must not be empty.", path, INVALID_FORMULA)
    if len(text) > MAX_FORMULA_CHARS:
        message = f"'{path}' is {len(text)} characters long; the limit is {MAX_FORMULA_CHARS}."
        raise GraderError(message, path, INVALID_FORMULA)
    if _paren_depth(text) > MAX_FORMULA_DEPTH:
        raise GraderError(f"'{path}' nests parentheses deeper than {MAX_FORMULA_DEPTH}.", path, INVALID_FORMULA)
    try:
        expression = ast.parse(text.replace("^", "**").strip(), mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise GraderError(f"'{path}' is not a valid formula: {exc.msg}{where}.", path, INVALID_FORMULA) from None
    except (ValueError, RecursionError, MemoryError, OverflowError):
        raise GraderError(f"'{path}' is not a valid formula.", path, INVALID_FORMULA) from None
    used: set[str] = set()
    tree = _convert(expression.body, allowed, used, path, depth=1)
    return Formula(text, tree, frozenset(used))


def _paren_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    return deepest


def _refuse(message: str, path: str) -> GraderError:
    return GraderError(f"'{path}': {message}", path, INVALID_FORMULA)


def _convert(node: ast.AST, names: frozenset[str], used: set[str], path: str, depth: int) -> Node:
    if depth > MAX_FORMULA_DEPTH:
        raise _refuse(f"the formula nests deeper than {MAX_FORMULA_DEPTH}.", path)
    deeper = depth + 1
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _refuse(f"only numbers may appear as constants, not {value!r:.40}.", path)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise _refuse("a number in the formula is too large.", path)
        return ("num", number)
    if isinstance(node, ast.Name):
        if node.id in names:
            used.add(node.id)
            return ("var", node.id)
        if node.id in FUNCTIONS:
            raise _refuse(f"'{node.id}' is a function: call it, as in {node.id}(x).", path)
        known = ", ".join(sorted(names)) or "none"
        raise _refuse(f"unknown name '{node.id[:64]}'; the sub-graders are: {known}.", path)
    if isinstance(node, ast.BinOp):
        op = _BINARY.get(type(node.op))
        if op is None:
            raise _refuse(f"the operator {type(node.op).__name__} is not allowed; use + - * / ^.", path)
        left = _convert(node.left, names, used, path, deeper)
        return ("bin", op, left, _convert(node.right, names, used, path, deeper))
    if isinstance(node, ast.UnaryOp):
        op = _UNARY.get(type(node.op))
        if op is None:
            raise _refuse(f"the operator {type(node.op).__name__} is not allowed; only unary minus and plus.", path)
        return ("neg" if op == "-" else "pos", _convert(node.operand, names, used, path, deeper))
    if isinstance(node, ast.Call):
        allowed = ", ".join(FUNCTIONS)
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise _refuse(f"only these functions may be called: {allowed}.", path)
        name = node.func.id
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise _refuse(f"{name}() takes plain arguments only.", path)
        least, most, _ = FUNCTIONS[name]
        if len(node.args) < least or (most is not None and len(node.args) > most):
            wanted = f"{least}" if least == most else f"at least {least}" if most is None else f"{least} to {most}"
            raise _refuse(f"{name}() takes {wanted} argument(s), got {len(node.args)}.", path)
        return ("call", name, tuple(_convert(arg, names, used, path, deeper) for arg in node.args))
    what = _REFUSED.get(type(node), type(node).__name__)
    raise _refuse(f"{what} not allowed in a formula.", path)


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise FormulaEvaluationError(f"{what} overflows.")
    return value


def _evaluate(node: Node, values: Mapping[str, float]) -> float:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "var":
        return float(values[node[1]])
    if kind == "neg":
        return -_evaluate(node[1], values)
    if kind == "pos":
        return _evaluate(node[1], values)
    if kind == "bin":
        op, left, right = node[1], _evaluate(node[2], values), _evaluate(node[3], values)
        if op == "+":
            return _finite(left + right, "a sum")
        if op == "-":
            return _finite(left - right, "a difference")
        if op == "*":
            return _finite(left * right, "a product")
        if op == "/":
            if right == 0:
                raise FormulaEvaluationError("division by zero.")
            return _finite(left / right, "a quotient")
        try:
            return _finite(math.pow(left, right), "a power")
        except OverflowError:
            raise FormulaEvaluationError("a power overflows.") from None
        except ValueError:
            raise FormulaEvaluationError(f"{left:g} ^ {right:g} is undefined.") from None
    name, args = node[1], [_evaluate(arg, values) for arg in node[2]]
    try:
        return _finite(float(FUNCTIONS[name][2](*args)), f"{name}()")
    except OverflowError:
        raise FormulaEvaluationError(f"{name}() overflows.") from None
    except (ValueError, ZeroDivisionError):
        shown = ", ".join(f"{a:g}" for a in args)
        raise FormulaEvaluationError(f"{name}({shown}) is undefined.") from None
