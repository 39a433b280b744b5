"""Agreement, false accepts and speed of the MATH and GSM8K graders on the labelled set.

    python bench/grading.py                 # the graders of this checkout
    PYTHONPATH=/path/to/other/checkout python bench/grading.py   # another version's

Reads tests/fixtures/math_answers.tsv (task, category, gold, response, verdict), grades each
response as the tasks do (MATH: the last \\boxed{} through ``MathGrader``; GSM8K: the final
number against the gold one, exactly) and prints agreement with the labels, false accepts
and false rejects (each listed), per category, and the time per answer, also for the
adversarial answers of tests/test_math.py.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # tests.test_math's adversarial answers

from nanovppo.tasks.grading import MathGrader, gsm8k_final_answer, last_boxed, parse_number  # noqa: E402
from tests.test_math import ADVERSARIAL  # noqa: E402


def gsm8k(response: str, gold: str) -> bool:
    answer = gsm8k_final_answer(response)
    value = parse_number(answer) if answer is not None else None
    return value is not None and value == parse_number(gold)


def main() -> None:
    rows = [line.split("\t") for line in
            (ROOT / "tests" / "fixtures" / "math_answers.tsv").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    grader = MathGrader(timeout=5.0)
    grader.equal("1", "\\frac{2}{2}")  # start the worker outside the timings
    agree, wrong, times, by_cat = 0, [], [], Counter()
    for task, cat, gold, response, verdict in rows:
        t0 = time.perf_counter()
        if task == "gsm8k":
            ok = gsm8k(response, gold)
        else:
            boxed = last_boxed(response)
            ok = boxed is not None and grader.equal(gold, boxed)
        times.append(time.perf_counter() - t0)
        if ok == (verdict == "1"):
            agree += 1
        else:
            wrong.append(("false accept" if ok else "false reject", task, cat, gold, response))
            by_cat[cat] += 1
    adv_times = []
    for text in ADVERSARIAL:
        t0 = time.perf_counter()
        boxed = last_boxed(text)
        if boxed is not None:
            grader.equal("1", boxed)
        adv_times.append(time.perf_counter() - t0)
    grader.close()
    fa = sum(w[0] == "false accept" for w in wrong)
    print(f"agreement: {agree}/{len(rows)} labelled pairs; false accepts {fa}, "
          f"false rejects {len(wrong) - fa}")
    print("wrong by category: " + ", ".join(f"{k} {v}" for k, v in sorted(by_cat.items())))
    for w in wrong:
        print(f"  {w[0]:12s} {w[1]:5s} {w[2]:9s} gold {w[3]!r:24s} response {w[4]!r}")
    print(f"per answer: median {statistics.median(times) * 1000:.2f} ms, max {max(times) * 1000:.1f} ms")
    print(f"adversarial ({len(ADVERSARIAL)}): median {statistics.median(adv_times) * 1000:.1f} ms, "
          f"max {max(adv_times) * 1000:.0f} ms (timeout {grader.timeout:.0f} s, timeouts {grader.timeouts})")


if __name__ == "__main__":
    main()
