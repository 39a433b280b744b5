"""Grading agreement and speed of the MATH grader on this project's fixture pairs.

    python bench/grading.py

Prints how many (gold, answer) pairs the grader judges as they were labelled, and the
median and maximum time per example, for ordinary and for adversarial answers.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.test_math's tables

from nanovppo.tasks.grading import MathGrader, last_boxed  # noqa: E402
from tests.test_math import ADVERSARIAL, AGREEMENT  # noqa: E402


def main() -> None:
    grader = MathGrader(timeout=5.0)
    grader.equal("1", "\\frac{2}{2}")  # start the worker outside the timings
    agree, times = 0, []
    for gold, answer, same in AGREEMENT:
        t0 = time.perf_counter()
        agree += grader.equal(gold, answer) is same
        times.append(time.perf_counter() - t0)
    adv_times = []
    for text in ADVERSARIAL:
        t0 = time.perf_counter()
        boxed = last_boxed(text)
        if boxed is not None:
            grader.equal("1", boxed)
        adv_times.append(time.perf_counter() - t0)
    grader.close()
    print(f"agreement: {agree}/{len(AGREEMENT)} labelled pairs")
    print(f"per example: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
    print(f"adversarial ({len(ADVERSARIAL)}): median {statistics.median(adv_times) * 1000:.1f} ms, "
          f"max {max(adv_times) * 1000:.0f} ms (timeout {grader.timeout:.0f} s, timeouts {grader.timeouts})")


if __name__ == "__main__":
    main()
