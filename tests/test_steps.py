"""Step splitters: the steps always give the response back exactly."""

import random

import pytest

from nanovppo.algos.steps import SPLITTERS, _protected, merge_evenly, split_steps

TEXTS = [
    "",
    "one line only",
    "\n\n\n",
    "First.\n\nSecond.\n\nThird.",
    "a\nb\nc\nd\ne\nf\ng",
    "$x = 1,\n y = 2$ and $$\\frac{a}{b}\n= c$$ then \\(d = e,\nf\\) and \\[g\n=h\\]",
    "$$" + "x+1=2, " * 200 + "$$",
    "We compute. Then we add 2 = 1 + 1, and so on. " * 40,
    "x" * 50_000,
    "line\n" * 10_000,
    "unclosed $ math\n\nhere \\( too\n\nend",
]
ENDS_FOR = lambda t: list(range(3, len(t), 3)) + [len(t)] if t else []


@pytest.mark.parametrize("method", SPLITTERS)
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_steps_reassemble_the_text(method, text):
    for max_steps in (0, 1, 3):
        spans = split_steps(text, method, max_steps=max_steps, min_chars=5, max_chars=80,
                            token_ends=ENDS_FOR(text), chunk_tokens=4)
        assert "".join(text[a:b] for a, b in spans) == text
        assert all(b > a for a, b in spans)
        assert all(s[1] == t[0] for s, t in zip(spans, spans[1:]))
        if max_steps:
            assert len(spans) <= max_steps


def test_math_splitter_never_cuts_inside_math():
    text = TEXTS[5] + "\n\nMore text here. Even more = yes, " * 20
    spans = split_steps(text, "math", min_chars=1, max_chars=30)
    for a, b in _protected(text):
        assert not any(a < s < b for s, _ in spans), (a, b)
    assert len(spans) > 3


def test_blank_lines_by_hand():
    assert split_steps("a\n\nb\n\nc", "blank_lines") == [(0, 3), (3, 6), (6, 7)]
    assert split_steps("a\nb", "newlines") == [(0, 2), (2, 3)]


def test_merge_short_and_evenly_by_hand():
    # "a\n" (2 chars) is too short and joins "bb\n": 5 chars
    assert split_steps("a\nbb\ncccccc", "newlines", min_chars=4) == [(0, 5), (5, 11)]
    spans = [(i, i + 1) for i in range(10)]
    assert merge_evenly(spans, 3) == [(0, 3), (3, 6), (6, 10)]
    assert merge_evenly(spans, 0) == spans


def test_long_parts_break_at_sentences_then_at_equals():
    text = "Alpha beta gamma. Delta epsilon zeta. x = 1 + 2 + 3 = 6"
    spans = split_steps(text, "math", min_chars=1, max_chars=20)
    pieces = [text[a:b] for a, b in spans]
    assert pieces[0] == "Alpha beta gamma. "
    assert "".join(pieces) == text and len(pieces) >= 3


def test_random_texts_fuzz():
    rng = random.Random(0)
    alphabet = "ab $\\()[]\n.,=x"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        for method in ("blank_lines", "newlines", "math"):
            spans = split_steps(text, method, max_steps=rng.randint(0, 5), min_chars=rng.randint(1, 9))
            assert "".join(text[a:b] for a, b in spans) == text


def test_math_splitter_by_hand():
    # sentence ends (a capital follows) and newlines cut; a lower-case start does not
    text = "So x = 3. Then y = 2x + 1 = 7.\nHence the answer is 7. and so on"
    pieces = [text[a:b] for a, b in split_steps(text, "math", min_chars=1, max_chars=100)]
    assert pieces == ["So x = 3. ", "Then y = 2x + 1 = 7.\n", "Hence the answer is 7. and so on"]
    # an 84-character part with max_chars 40 is cut near its middle (42) at ", " (30),
    # not at " and " (66); the 54-character rest has no cut with 16 characters each side
    text = "We add the first two numbers, then we multiply the result by three and subtract one."
    pieces = [text[a:b] for a, b in split_steps(text, "math", min_chars=1, max_chars=40)]
    assert pieces == ["We add the first two numbers, ",
                      "then we multiply the result by three and subtract one."]
    # environments are math too
    text = "Let\n\\begin{align}\na &= 1\\\\\nb &= 2\n\\end{align}\nso done."
    spans = split_steps(text, "math", min_chars=1)
    assert not any(text.index("\\begin") < a < text.index("\\end") for a, _ in spans)
