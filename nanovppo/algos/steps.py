"""Splitting a response into reasoning steps, for VinePPO's per-step values.

A split is a list of ``(start, end)`` character offsets into the response: consecutive,
non-empty, starting at 0 and ending at ``len(text)``, so that joining the steps gives the
response back exactly. Separators (newlines, spaces) stay at the end of the step they
follow.

Splitters: ``blank_lines``, ``newlines`` (VinePPO's GSM8K steps), ``math`` and ``tokens``
(fixed-size token chunks). ``math`` follows the idea of the official VinePPO code's MATH
splitter: cut at newlines and sentence ends, join fragments shorter than ``min_chars``,
break a part longer than ``max_chars`` near its middle (at ", ", " and ", ": " or " to "
with 40% of ``max_chars`` on each side, else at "=" or "+" with 20%). Unlike it, this one
never cuts inside ``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]`` or
``\\begin{...}...\\end{...}``, so that every state starts at a clean boundary.

>>> split_steps("a\\n\\nb\\n\\nc", "blank_lines")
[(0, 3), (3, 6), (6, 7)]
"""

from __future__ import annotations

import re
from typing import Sequence

SPLITTERS = ("blank_lines", "newlines", "math", "tokens")

_MATH = re.compile(r"\$\$.*?\$\$|\$[^$]*?\$|\\\(.*?\\\)|\\\[.*?\\\]"
                   r"|\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.DOTALL)


def _protected(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _MATH.finditer(text)]


def _inside(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(a < pos < b for a, b in spans)


def _cuts_after(text: str, pattern: str, spans=()) -> list[int]:
    """Offsets just after each match of ``pattern`` that is not inside a protected span."""
    return [m.end() for m in re.finditer(pattern, text)
            if 0 < m.end() < len(text) and not _inside(m.start(), spans)
            and not _inside(m.end() - 1, spans)]


def _to_spans(cuts: Sequence[int], n: int) -> list[tuple[int, int]]:
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < n)), n]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def merge_evenly(spans: list[tuple[int, int]], max_steps: int) -> list[tuple[int, int]]:
    """Merge neighbouring steps so at most ``max_steps`` remain, of similar step counts."""
    if max_steps <= 0 or len(spans) <= max_steps:
        return spans
    n = len(spans)
    out = []
    for i in range(max_steps):
        a, b = i * n // max_steps, (i + 1) * n // max_steps
        out.append((spans[a][0], spans[b - 1][1]))
    return out


def merge_short(spans: list[tuple[int, int]], min_chars: int) -> list[tuple[int, int]]:
    """Join a step shorter than ``min_chars`` to the one after it (the last to the one before)."""
    out: list[list[int]] = []
    pending: list[int] | None = None
    for a, b in spans:
        if pending is not None:
            a = pending[0]
            pending = None
        if b - a < min_chars:
            pending = [a, b]
            continue
        out.append([a, b])
    if pending is not None:
        if out:
            out[-1][1] = pending[1]
        else:
            out.append(pending)
    return [tuple(s) for s in out]


def _break_near_middle(text: str, span: tuple[int, int], max_chars: int,
                       math: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Cut a part longer than ``max_chars`` in two near its middle, then each half again."""
    a, b = span
    if b - a <= max_chars:
        return [span]
    for pattern, side in ((r", | and |: | to ", 0.4), (r"=|\+", 0.2)):
        least = max(1, int(side * max_chars))
        cuts = [c for c in _cuts_after(text, pattern, math)
                if a + least <= c <= b - least]
        if cuts:
            cut = min(cuts, key=lambda c: abs(c - (a + b) / 2))
            return (_break_near_middle(text, (a, cut), max_chars, math)
                    + _break_near_middle(text, (cut, b), max_chars, math))
    return [span]


def split_math(text: str, min_chars: int = 20, max_chars: int = 100) -> list[tuple[int, int]]:
    math = _protected(text)
    cuts = _cuts_after(text, r"\n+", math) + _cuts_after(text, r"\.\s+(?=[A-Z])", math)
    spans = merge_short(_to_spans(cuts, len(text)), min_chars)
    out = []
    for span in spans:
        out.extend(_break_near_middle(text, span, max_chars, math))
    return merge_short(out, min_chars)


def split_tokens(token_ends: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    """Steps of ``chunk`` tokens; ``token_ends[i]`` is the character end of token i."""
    n = token_ends[-1] if token_ends else 0
    cuts = [token_ends[i - 1] for i in range(chunk, len(token_ends), chunk)]
    return _to_spans(cuts, n)


def split_steps(text: str, method: str = "blank_lines", max_steps: int = 0, min_chars: int = 1,
                max_chars: int = 100, token_ends: Sequence[int] | None = None,
                chunk_tokens: int = 16) -> list[tuple[int, int]]:
    """Split ``text`` into steps with ``method``; see the module docstring."""
    if not text:
        return []
    if method == "blank_lines":
        spans = merge_short(_to_spans(_cuts_after(text, r"\n\s*\n\s*"), len(text)), min_chars)
    elif method == "newlines":
        spans = merge_short(_to_spans(_cuts_after(text, r"\n+"), len(text)), min_chars)
    elif method == "math":
        spans = split_math(text, min_chars, max_chars)
    elif method == "tokens":
        if token_ends is None:
            raise ValueError("the tokens splitter needs the tokens' character ends")
        spans = split_tokens(token_ends, chunk_tokens)
    else:
        raise ValueError(f"unknown step splitter {method!r}; use one of {SPLITTERS}")
    return merge_evenly(spans, max_steps)
