"""Answer extraction and checking for MATH and GSM8K. Model output is untrusted text.

``last_boxed`` finds the last ``\\boxed{...}`` with nested braces in one linear scan.
``MathGrader.equal`` decides whether a boxed answer equals the gold one, in three stages:

1. **Reject outright** what cannot be an answer: an empty or whitespace box, one whose
   content is only spacing or empty ``\\text{}`` (``\\boxed{\\text{ }}``), unbalanced braces,
   more than ``MAX_ANSWER_CHARS`` characters.
2. **A fast path** for the common cases, which may only say "equal" where math-verify says
   so too (a test checks it on every pair of ``tests/fixtures/math_answers.tsv``): the same
   text up to spacing, ``\\left``/``\\right`` and ``\\dfrac``; or two plain numbers of equal
   value (thousands separators only in groups of three, units only after a value). Two
   different plain numbers are unequal without asking further.
3. **math-verify** (symbolic equality of fractions, decimals, sets, intervals, tuples,
   matrices, LaTeX variants) in a worker process with a per-answer timeout. A timeout kills
   the worker (a fresh one starts on the next call), so a pathological answer costs at most
   ``timeout`` seconds and leaves nothing behind.

So the grader never accepts a pair that math-verify rejects. math-verify's own choices
therefore hold here: ``50\\%`` and ``50`` differ, a list ``3, 5`` is a set (never the
number 35), ``\\text{odd}`` and ``\\text{even}`` differ, a mixed number ``2\\frac{1}{4}`` is
9/4.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000   # a longer boxed answer is wrong, whatever it says
MAX_NUMBER_DIGITS = 40
STARTUP_TIMEOUT = 120  # seconds for a grading worker to import math-verify


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), None if there is none or
    it is not closed.

    >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}")
    'x^{2}'
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip("\\boxedfbx ") != "":
        # "\boxed 5" form: the token after a space
        m = re.match(r"\\(?:boxed|fbox) +([^\s${}]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


# Wrappers whose content is the answer: \text{odd} is "odd".
_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf)\s*")
# Spacing: \, \; \: \! \quad \qquad "\ " and ~.
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|~")
# A unit after a value: "5\text{ cm}", "12 \mbox{inches}", "5\text{ cm}^2".
_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}(\^\{?\d\}?)?$")
# A plain number: digits with thousands separators only in groups of three, a decimal
# part, or a fraction a/b.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def has_content(answer: str) -> bool:
    """Whether a boxed answer says anything: not empty, not only spacing, braces and
    empty ``\\text{}`` wrappers."""
    s = _SPACING.sub("", _WRAPPERS.sub("", answer))
    return bool(re.sub(r"[{}\s]", "", s))


def balanced(answer: str) -> bool:
    """Braces (other than escaped ``\\{ \\}``) open and close in order."""
    depth = 0
    for ch in re.sub(r"\\[{}]", "", answer):
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def normalize(answer: str) -> str:
    """The canonical form the fast path compares: spacing, ``\\left``/``\\right``,
    ``\\dfrac``/``\\tfrac``, a dollar sign, degrees and a unit after a value dropped; a
    plain number written without thousands separators or trailing zeros.

    Nothing here turns two answers that math-verify tells apart into one form (tested).
    """
    s = _SPACING.sub("", answer.strip())
    for a, b in [("\\left", ""), ("\\right", ""), ("\\displaystyle", ""), ("dfrac", "frac"),
                 ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\$", "")]:
        s = s.replace(a, b)
    s = re.sub(r"\s+", " ", s).strip()
    # A space stays between two letters and after a comma ("32, 349" is a list of two
    # numbers for math-verify, not 32349); any other space goes.
    s = re.sub(r"(?<!,)(?:(?<![A-Za-z]) | (?![A-Za-z]))", "", s)
    unit = _UNIT.search(s)
    if unit and _NUMBER.fullmatch(s[:unit.start()]):  # units only after a value
        s = s[:unit.start()]
    if _NUMBER.fullmatch(s):
        value = _number(s)
        if value is not None:
            return _canonical(value)
    return s


def _number(s: str) -> Fraction | None:
    if len(s) > MAX_NUMBER_DIGITS:
        return None
    try:
        s = s.replace(",", "")
        return Fraction(s) if "/" in s else Fraction(Decimal(s))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def _canonical(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def parse_number(text: str) -> Fraction | None:
    r"""A GSM8K-style final answer as an exact number, or None unless the text is one number.

    Allowed around the number: a dollar sign, a unit in ``\text{}`` after it
    (``18\text{ apples}``), a final period; thousands separators in groups of three;
    ``\frac{a}{b}``. A second number ("5 or 6", "3, 5"), a percent sign, a unit in bare
    words (which math-verify reads as a product of letters) or anything else gives None.

    >>> parse_number("\\$2,400.")
    Fraction(2400, 1)
    >>> parse_number("3, 5") is None
    True
    """
    s = _SPACING.sub(" ", text.strip())
    s = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s)
    s = s.replace("\\$", "$").strip().rstrip(".").strip()
    s = re.sub(r"\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}$", "", s)  # a unit
    m = re.fullmatch(r"\$?\s*(" + _NUMBER.pattern + r")", s)
    return _number(m.group(1)) if m else None


def _worker(conn) -> None:  # pragma: no cover - runs in the child process
    from math_verify import parse, verify

    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        gold, answer = msg
        conn.send(math_verify_equal(gold, answer, parse, verify))


def math_verify_equal(gold: str, answer: str, parse=None, verify=None) -> bool:
    """math-verify's verdict on two boxed answers (in this process: for tests and the
    worker)."""
    if parse is None:
        from math_verify import parse, verify
    try:
        return bool(verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{answer}}}")))
    except Exception:  # noqa: BLE001 - any failure to grade is a wrong answer
        return False


def fast_verdict(gold: str, answer: str) -> bool | None:
    """The fast path's verdict: True or False where it can decide, None to ask math-verify.
    True only where math-verify agrees (tested on the labelled set)."""
    ng, na = normalize(gold), normalize(answer)
    if ng == na:
        return True
    if _NUMBER.fullmatch(ng) and _NUMBER.fullmatch(na):  # two plain numbers: exact value
        return _number(ng) == _number(na)
    return None


class MathGrader:
    """Checks boxed answers against gold answers; see the module docstring."""

    def __init__(self, timeout: float = 5.0):
        self.timeout = timeout
        self._proc = None
        self._conn = None
        self.timeouts = 0

    def _start(self) -> bool:
        """Start a worker and wait until it has imported math-verify (not counted in the
        per-answer timeout)."""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self._proc.start()
        if self._conn.poll(STARTUP_TIMEOUT) and self._conn.recv() == "ready":
            return True
        log.error("the grading worker did not start within %ds; scoring 0", STARTUP_TIMEOUT)
        self._stop()
        return False

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=5)
        self._proc = self._conn = None

    def equal(self, gold: str, answer: str) -> bool:
        if len(answer) > MAX_ANSWER_CHARS or not has_content(answer) or not balanced(answer):
            return False
        verdict = fast_verdict(gold, answer)
        if verdict is not None:
            return verdict
        if self._proc is None or not self._proc.is_alive():
            if not self._start():
                return False
        try:
            self._conn.send((gold, answer))
            if self._conn.poll(self.timeout):
                return bool(self._conn.recv())
        except (EOFError, BrokenPipeError, OSError):
            pass
        self.timeouts += 1
        log.warning("grading timed out after %.1fs; scoring 0", self.timeout)
        self._stop()
        return False

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self._stop()

    def __del__(self):  # pragma: no cover
        try:
            self._stop()
        except Exception:  # noqa: BLE001
            pass


def gsm8k_final_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style response: the last \\boxed{}, else what follows
    the last ``####``, else the last number in the text."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text[text.rfind("####") + 4:].strip().split("\n")[0]
    nums = re.findall(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", text[-2000:])
    return nums[-1] if nums else None


def gsm8k_correct(response: str, gold: str) -> bool:
    """Whether a GSM8K response's final answer is the gold number (exactly)."""
    answer = gsm8k_final_answer(response)
    value = parse_number(answer) if answer is not None else None
    return value is not None and value == parse_number(gold)
