"""The MATH and GSM8K graders against a labelled set of answers written for this project
(tests/fixtures/math_answers.tsv: text, choices, names, lists and sets, intervals, tuples,
matrices, units, percent, degrees, thousands separators, LaTeX variants and attempts to game
the grader), and the fast path against math-verify."""

from pathlib import Path

import pytest

from nanovppo.tasks.grading import (MathGrader, fast_verdict, gsm8k_correct, gsm8k_final_answer,
                                    has_content, last_boxed, math_verify_equal, normalize,
                                    parse_number)

ROWS = [line.rstrip("\n").split("\t") for line in
        (Path(__file__).parent / "fixtures" / "math_answers.tsv").read_text().splitlines()
        if line.strip() and not line.startswith("#")]

# The pairs the grader gets wrong, each a false reject: math-verify does not accept them
# and the grader never accepts what math-verify rejects.
KNOWN_FALSE_REJECTS = {
    ("math", "(-\\infty, 3]", "\\boxed{x \\le 3}"),   # an inequality for an interval
    ("math", "12", "\\boxed{\\text{12 inches}}"),     # a number inside \text{}
    ("math", "6", "\\boxed{6.}"),                     # a sentence's period in the box
    ("gsm8k", "18", "\\boxed{18 dollars}"),           # a unit in bare words: 18 * d * o ...
}


@pytest.fixture(scope="module")
def grader():
    g = MathGrader(timeout=5.0)
    yield g
    g.close()


def correct(grader, task, gold, response):
    if task == "gsm8k":
        return gsm8k_correct(response, gold)
    boxed = last_boxed(response)
    return boxed is not None and grader.equal(gold, boxed)


def test_the_labelled_set_is_large_and_covers_every_category():
    assert len(ROWS) >= 150
    assert {"text", "choice", "name", "set", "list", "interval", "tuple", "matrix", "unit",
            "percent", "degree", "thousands", "latex", "gaming"} <= {r[1] for r in ROWS}
    assert sum(r[1] == "gaming" for r in ROWS) >= 30


def test_the_graders_agree_with_the_labels_and_never_accept_a_wrong_answer(grader):
    wrong = {(task, gold, resp): verdict for task, _, gold, resp, verdict in ROWS
             if correct(grader, task, gold, resp) != (verdict == "1")}
    false_accepts = {k for k, v in wrong.items() if v == "0"}
    assert not false_accepts
    assert set(wrong) == KNOWN_FALSE_REJECTS


def test_the_fast_path_accepts_only_what_math_verify_accepts():
    """A property over every labelled MATH pair (and every pair of their answers): where
    the fast path says "equal", math-verify says so too."""
    answers = sorted({a for task, _, gold, resp, _ in ROWS if task == "math"
                      for a in (gold, last_boxed(resp)) if a is not None and has_content(a)})
    pairs = {(g, a) for g in answers for a in answers}
    accepted = [(g, a) for g, a in pairs if fast_verdict(g, a)]
    assert len(accepted) > 100  # the fast path does decide many of them
    refused = [(g, a) for g, a in accepted if not math_verify_equal(g, a)]
    assert not refused


def test_gsm8k_accepts_only_what_math_verify_accepts():
    for task, _, gold, resp, _ in ROWS:
        if task == "gsm8k" and gsm8k_correct(resp, gold):
            assert math_verify_equal(gold, gsm8k_final_answer(resp)), resp


def test_normalize_and_parse_number_by_hand():
    assert normalize(" \\left( 1,000 \\right) ") == "(1,000)"  # not a number: kept as text
    assert normalize("1,000") == "1000" and normalize("12.00") == "12"
    assert normalize("12,34") == "12,34" and normalize("3, 5") == "3, 5"
    assert normalize("\\dfrac{1}{2}") == "\\frac{1}{2}"
    assert normalize("5\\text{ cm}") == "5" and normalize("\\text{ cm}") == "\\text{cm}"
    assert normalize("\\text{odd or even}") == "\\text{odd or even}"
    assert parse_number("\\$2,400.") == 2400 and parse_number("18\\text{ apples}") == 18
    for bad in ["3, 5", "5 or 6", "18\\%", "1,00,0", "", "twelve", "18 apples", "5 apples and 6 pears"]:
        assert parse_number(bad) is None, bad
