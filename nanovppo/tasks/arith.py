"""A small, bounded evaluator for Countdown equations. Model output is untrusted text.

Only integers, ``+ - * /``, unary minus and parentheses are accepted, evaluated on exact
rationals. Everything else (names, attributes, calls, ``**``, floats, non-ASCII digits,
huge literals, deep nesting, long inputs) is rejected before or during evaluation, so no
input can make this slow: the text is at most ``MAX_CHARS`` long and every intermediate
value is capped at ``MAX_DIGITS`` digits.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

MAX_CHARS = 200  # an equation over four small numbers never needs more
MAX_DIGITS = 12  # bound on numerators and denominators of every intermediate value
MAX_DEPTH = 16   # nesting depth of the syntax tree

# Characters an equation may contain: ASCII digits, operators, parentheses, blanks.
_ALLOWED = re.compile(r"[0-9+\-*/() \t]*")


class InvalidEquation(ValueError):
    """The text is not an acceptable equation."""


def _check(value: Fraction) -> Fraction:
    limit = 10 ** MAX_DIGITS
    if abs(value.numerator) >= limit or value.denominator >= limit:
        raise InvalidEquation("intermediate value too large")
    return value


def _eval(node: ast.AST, depth: int, numbers: list[int]) -> Fraction:
    if depth > MAX_DEPTH:
        raise InvalidEquation("nested too deeply")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1, numbers)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        numbers.append(node.value)
        return _check(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand, depth + 1, numbers)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left = _eval(node.left, depth + 1, numbers)
        right = _eval(node.right, depth + 1, numbers)
        if isinstance(node.op, ast.Add):
            return _check(left + right)
        if isinstance(node.op, ast.Sub):
            return _check(left - right)
        if isinstance(node.op, ast.Mult):
            return _check(left * right)
        if right == 0:
            raise InvalidEquation("division by zero")
        return _check(left / right)
    raise InvalidEquation(f"{type(node).__name__} is not allowed")


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """Value of an arithmetic expression and the integer literals it uses, in order.

    >>> evaluate("(6 - 2) * 3")
    (Fraction(12, 1), [6, 2, 3])
    """
    if len(text) > MAX_CHARS:
        raise InvalidEquation("equation too long")
    if not _ALLOWED.fullmatch(text):
        raise InvalidEquation("only digits, + - * / and parentheses are allowed")
    if "**" in text or "//" in text:
        raise InvalidEquation("only + - * / are allowed")
    if any(len(d) > MAX_DIGITS for d in re.findall(r"[0-9]+", text)):
        raise InvalidEquation("number too long")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise InvalidEquation(f"not an expression: {e}") from None
    numbers: list[int] = []
    return _eval(tree, 0, numbers), numbers
