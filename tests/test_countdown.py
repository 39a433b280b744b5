"""The Countdown reward on good, bad and adversarial outputs, and its data."""

import itertools
import json
import time
from fractions import Fraction

import pytest

from nanovppo.tasks.arith import InvalidEquation, evaluate
from nanovppo.tasks.base import DatasetUnavailableError
from nanovppo.tasks.countdown import CountdownTask, generate_examples, split_of

EX = {"nums": [2, 3, 6], "target": 12}


@pytest.fixture(scope="module")
def task():
    return CountdownTask(n_train=20, n_test=5)


def test_correct_answer_gets_full_reward(task):
    r = task.reward("<think>6-2=4, 4*3=12</think>\n<answer>(6 - 2) * 3</answer>", EX)
    assert r.total == 2.0
    assert r.parts["answer"] == 1.0 and r.parts["format"] == 1.0


def test_partial_credit_for_each_part_of_the_layout(task):
    # nothing
    assert task.reward("I do not know", EX).total == 0.0
    # only the think block
    r = task.reward("<think>hmm</think> the answer is 12", EX)
    assert r.parts["format_think"] == 1.0 and r.total == 0.25
    # tags with text that is not an equation
    r = task.reward("<think>hmm</think><answer>twelve</answer>", EX)
    assert r.total == 0.5 and r.parts["format_equation"] == 0.0
    # an equation over numbers that were not given: the equation part only
    r = task.reward("<think>x</think><answer>10 + 1</answer>", EX)
    assert r.total == 0.75 and r.parts["format_numbers"] == 0.0
    # a lone number is no equation
    assert task.reward("<think>x</think><answer>6</answer>", EX).total == 0.5
    assert task.reward("<think>x</think><answer>-6</answer>", EX).total == 0.5
    # 2 of the 3 given numbers
    r = task.reward("<think>x</think><answer>6 * 2</answer>", EX)
    assert r.parts["format_numbers"] == pytest.approx(2 / 3)
    assert r.total == pytest.approx(0.75 + 0.25 * 2 / 3)
    # foreign and repeated numbers dilute the match: {6, 2} of 4 used
    r = task.reward("<think>x</think><answer>6 * 2 + 6 - 1</answer>", EX)
    assert r.parts["format_numbers"] == pytest.approx(2 / 4)
    # the right numbers, the wrong value
    r = task.reward("<think>x</think><answer>6 + 2 + 3</answer>", EX)
    assert r.total == 1.0 and r.parts["answer"] == 0.0


def test_numbers_must_be_used_exactly_once(task):
    assert task.reward("<think>x</think><answer>6 * 2</answer>", EX).parts["answer"] == 0.0
    assert task.reward("<think>x</think><answer>6 * 2 * 3 / 3</answer>", EX).parts["answer"] == 0.0
    assert task.reward("<think>x</think><answer>2 * 6 * 3 / 3</answer>",
                       {"nums": [2, 3, 6, 3], "target": 12}).parts["answer"] == 1.0


def test_last_answer_counts(task):
    text = "<think>x</think><answer>1 + 1</answer> no wait <answer>(6 - 2) * 3</answer>"
    assert task.reward(text, EX).parts["answer"] == 1.0


def test_exact_rational_arithmetic(task):
    # 6 / (3 / 2) = 4 exactly; floats would also agree here, but 1/3*3 must be exactly 1
    assert task.reward("<think>x</think><answer>6 / (3 / 2)</answer>",
                       {"nums": [6, 3, 2], "target": 4}).parts["answer"] == 1.0
    assert evaluate("1 / 3 * 3")[0] == Fraction(1)


ADVERSARIAL = [
    "<think>x</think><answer>9**9**9**9</answer>",
    "<think>x</think><answer>().__class__</answer>",
    "<think>x</think><answer>__import__('os').system('echo pwned')</answer>",
    "<think>x</think><answer>" + "9" * 5000 + "</answer>",
    "<think>x</think><answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
    "<think>x</think><answer>" + "+".join(["1"] * 10000) + "</answer>",
    "<think>x</think><answer>6 * 2 / 0</answer>",
    "<think>x</think><answer>１２</answer>",           # full-width digits
    "<think>x</think><answer>٦ * ٢</answer>",            # Arabic-Indic digits
    "<think>x</think><answer>12.0</answer>",
    "<think>x</think><answer>(6 - 2 * 3</answer>",
    "<answer><answer></answer></answer></think><think>",
    "<think>" * 20000 + "</answer>" * 20000,
    "x" * 100_000,
    "<think>x</think><answer>" + "1" * 100_000 + "</answer>",
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_outputs_score_no_answer_quickly(task, text):
    t0 = time.perf_counter()
    r = task.reward(text, EX)
    assert time.perf_counter() - t0 < 0.5
    assert r.parts["answer"] == 0.0
    assert r.parts["format_numbers"] == 0.0
    assert 0.0 <= r.total <= 0.75


def test_evaluator_rejects_what_is_not_arithmetic():
    for bad in ["2 ** 3", "2 // 3", "abs(2)", "x + 1", "1e3", "0x10", "2 if 1 else 3", "[1]", ""]:
        with pytest.raises(InvalidEquation):
            evaluate(bad)
    assert evaluate("-(2 - 5) * 4")[0] == 12


def _reachable(nums, target):
    """Brute force: can the numbers, each used once, reach the target?"""
    def values(ns):
        if len(ns) == 1:
            yield Fraction(ns[0])
            return
        for i in range(1, len(ns)):
            for left in set(itertools.combinations(range(len(ns)), i)):
                a = [ns[j] for j in left]
                b = [ns[j] for j in range(len(ns)) if j not in left]
                for x in values(a):
                    for y in values(b):
                        yield from (x + y, x - y, x * y)
                        if y:
                            yield x / y
    return any(v == target for v in values(nums))


def test_generated_problems_are_reachable_and_splits_disjoint():
    train, test = generate_examples(200, 40, seed=3)
    assert len(train) == 200 and len(test) == 40
    keys = lambda rows: {(tuple(sorted(r["nums"])), r["target"]) for r in rows}
    assert not keys(train) & keys(test)
    for ex in train[:30] + test[:10]:
        assert _reachable(ex["nums"], ex["target"]), ex
    # the split is a property of the problem, whatever the seed
    assert all(split_of(ex["nums"], ex["target"], 0.1) == "test" for ex in test)
    assert generate_examples(200, 40, seed=3) == (train, test)
    assert generate_examples(200, 40, seed=4) != (train, test)


def test_local_file_and_its_errors(tmp_path):
    rows = [{"nums": [1, 2, 3], "target": t} for t in range(1, 11)]
    f = tmp_path / "cd.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    task = CountdownTask(source="file", data_files=str(f), n_train=100, n_test=3)
    assert len(task.train_examples) == 7 and len(task.test_examples) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"numbers": [1, 2], "target": 3}))
    with pytest.raises(DatasetUnavailableError, match="nums"):
        CountdownTask(source="file", data_files=str(bad))
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        CountdownTask(source="file", data_files=str(tmp_path / "missing.json"))


def test_uncached_hub_dataset_names_data_files(offline_hub):
    with pytest.raises(DatasetUnavailableError, match="task.data_files"):
        CountdownTask(source="hub", hub_id="Jiayi-Pan/Countdown-Tasks-3to4")


def test_format_weights_are_checked():
    with pytest.raises(ValueError, match="sum to 1"):
        CountdownTask(n_train=5, n_test=2, format_weights={"think": 0.5})
    with pytest.raises(ValueError, match="unknown"):
        CountdownTask(n_train=5, n_test=2, format_weights={"thinking": 1.0})
