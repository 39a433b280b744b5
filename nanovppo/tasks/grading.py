"""Answer extraction and checking for MATH and GSM8K. Model output is untrusted text.

``last_boxed`` finds the last ``\\boxed{...}`` with nested braces in one linear scan.
``MathGrader`` checks an answer against the gold one: a cheap normalised comparison
first, then math-verify (symbolic equality of fractions, decimals, percentages, sets,
intervals, tuples, matrices, LaTeX variants) in a worker process with a per-example
timeout. A timeout kills the worker (a fresh one starts on the next call), so a
pathological answer costs at most ``timeout`` seconds and leaves nothing behind.
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
        m = re.match(r"\\(?:boxed|fbox) +([^\s$]+)", text[start:])
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


_UNITS = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{\s*[a-zA-Z ]*\}")  # "5\text{ cm}"


def normalize(answer: str) -> str:
    """A light canonical form for a fast string comparison (math-verify does the rest).

    As in the MATH paper's own checker, a percent sign is dropped: "50\\%" matches "50".
    """
    s = answer.strip()
    s = _UNITS.sub("", s)
    for a, b in [("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                 ("\\ ", ""), ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""),
                 ("^{\\circ}", ""), ("\\$", ""), ("$", ""), ("\\%", ""), ("%", "")]:
        s = s.replace(a, b)
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?\d+)\.0+", s)
    return m.group(1) if m else s


def parse_number(text: str) -> Fraction | None:
    """A plain number (commas, $, % and trailing units allowed) as an exact fraction."""
    s = text.strip().replace(",", "").replace("$", "").replace("\\", "")
    m = re.match(r"^-?\d+(\.\d+)?(/\d+)?", s)
    if not m or len(m.group(0)) > MAX_NUMBER_DIGITS:
        return None
    try:
        if "/" in m.group(0):
            return Fraction(m.group(0))
        return Fraction(Decimal(m.group(0)))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def _worker(conn) -> None:  # pragma: no cover - runs in the child process
    from math_verify import parse, verify

    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        gold, answer = msg
        try:
            ok = bool(verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{answer}}}")))
        except Exception:  # noqa: BLE001 - any failure to grade is a wrong answer
            ok = False
        conn.send(ok)


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
        if len(answer) > MAX_ANSWER_CHARS:
            return False
        ng, na = normalize(gold), normalize(answer)
        if ng == na:
            return True
        a, b = _plain_number(ng), _plain_number(na)
        if a is not None and b is not None:  # two plain numbers: exact comparison decides
            return a == b
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


def _plain_number(s: str) -> Fraction | None:
    """``s`` as a number if it is nothing but one (``-12``, ``0.5``, ``3/4``)."""
    if len(s) > MAX_NUMBER_DIGITS or not re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", s):
        return None
    return parse_number(s)


def gsm8k_final_answer(text: str) -> str | None:
    """The final number of a GSM8K-style response: the last \\boxed{}, else what follows
    the last ``####``, else the last number in the text."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text[text.rfind("####") + 4:].strip().split("\n")[0]
    nums = re.findall(r"-?\$?\d[\d,]*(?:\.\d+)?", text[-2000:])
    return nums[-1] if nums else None
