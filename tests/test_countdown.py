"""The Countdown reward on good, bad and adversarial outputs, and its data."""

import itertools
import re
from collections import Counter
import json
import time
from fractions import Fraction

import pytest

from nanovppo.errors import ConfigError
from nanovppo.tasks.arith import InvalidEquation, evaluate
from nanovppo.tasks.base import DatasetUnavailableError
from nanovppo.tasks.countdown import generate_examples, split_of
from tests.conftest import compose_cfg

EX = {"nums": [2, 3, 6], "target": 12}


def CountdownTask(**overrides):
    """The task as conf/task/countdown.yaml builds it, with ``overrides``."""
    from nanovppo.config import build

    return build(compose_cfg(["task=countdown"]).task, "task", **overrides)


@pytest.fixture(scope="module")
def task():
    return CountdownTask(n_train=20, n_test=5)


# The ordering table (also in docs/tasks.md): hand-written responses to 2, 3, 6 -> 12,
# from best to worst, and their rewards with format 0.1, numbers 0.2, closeness 0.3.
W = {"format": 0.1, "numbers": 0.2, "closeness": 0.3}
ORDERING = [
    # correct: 1 + 0.1 + 0.2 * 3/3 + 0.3 * 1
    ("correct", "<think>6-2=4, 4*3=12</think> <answer>(6 - 2) * 3</answer>", True, 1.6),
    # exactly the given numbers, value 11: 0.1 + 0.2 + 0.3 * (1 - 1/12)
    ("wrong equation, given numbers", "<think>6+2=8, 8+3=11</think> <answer>6 + 2 + 3</answer>",
     False, 0.1 + 0.2 + 0.3 * 11 / 12),
    # two of the three numbers (no closeness: not all numbers): 0.1 + 0.2 * 2/3
    ("partial attempt", "<think>6*2=12</think> <answer>6 * 2</answer>", False, 0.1 + 0.2 * 2 / 3),
    # the same without a think block: 0.2 * 2/3
    ("partial attempt, no thinking", "<think></think> <answer>6 * 2</answer>", False, 0.2 * 2 / 3),
    ("prose in the tags", "<think>I should add them up.</think> <answer>twelve</answer>", False, 0.0),
    ("a bare number", "<think>it is 12</think> <answer>12</answer>", False, 0.0),
    ("foreign numbers", "<think>10 + 2 = 12</think> <answer>10 + 2</answer>", False, 0.0),
    ("a number used twice", "<think>6 * 2 = 12</think> <answer>6 + 6</answer>", False, 0.0),
    ("empty tags", "<think> </think> <answer> </answer>", False, 0.0),
    ("the prompt's example", "<think>(a + b) * c</think> <answer>(a + b) * c</answer>", False, 0.0),
    ("no output", "<think>", False, 0.0),
]


@pytest.mark.parametrize("name,text,correct,total", ORDERING, ids=[r[0] for r in ORDERING])
def test_the_reward_of_each_kind_of_response_by_hand(name, text, correct, total):
    r = CountdownTask(shaping=W, n_train=1, n_test=1).reward(text, EX)
    assert r.correct is correct
    assert r.total == pytest.approx(total)


@pytest.mark.parametrize("weights", [W, {"format": 0.1, "numbers": 0.2, "closeness": 0.0},
                                     {"format": 0.0, "numbers": 0.05, "closeness": 0.0}])
def test_the_reward_orders_responses_as_a_grader_would(weights):
    """correct > a wrong equation over the given numbers > a partial attempt > prose in
    the tags = empty tags = a copied example = no output, for positive numbers weights."""
    task = CountdownTask(shaping=weights, n_train=1, n_test=1)
    totals = {name: task.reward(text, EX).total for name, text, _, _ in ORDERING}
    assert totals["correct"] > totals["wrong equation, given numbers"] > totals["partial attempt"]
    assert totals["partial attempt"] > totals["prose in the tags"]
    nothing = ["prose in the tags", "a bare number", "foreign numbers", "a number used twice",
               "empty tags", "the prompt's example", "no output"]
    assert {totals[k] for k in nothing} == {0.0}


def test_default_shaping_orders_responses_and_the_prompt_holds_nothing_to_copy():
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    task = instantiate(compose_cfg([]).task, n_train=5, n_test=2)
    totals = [task.reward(text, EX).total for _, text, _, _ in ORDERING[:3]]
    assert totals[0] > totals[1] > totals[2] > 0
    # whatever the prompt shows inside <answer> tags earns nothing when copied
    prompt = task.messages(task.train_examples[0])[-1]["content"]
    example = prompt[prompt.rindex("<answer>"):prompt.rindex("</answer>") + len("</answer>")]
    for ex in task.train_examples + task.test_examples:
        assert task.reward("<think>" + example + "</think> " + example, ex).total == 0.0


def test_numbers_must_be_used_exactly_once(task):
    assert not task.reward("<think>x</think><answer>6 * 2</answer>", EX).correct
    assert not task.reward("<think>x</think><answer>6 * 2 * 3 / 3</answer>", EX).correct
    assert task.reward("<think>x</think><answer>2 * 6 * 3 / 3</answer>",
                       {"nums": [2, 3, 6, 3], "target": 12}).correct


def test_last_answer_counts(task):
    text = "<think>x</think><answer>1 + 1</answer> no wait <answer>(6 - 2) * 3</answer>"
    assert task.reward(text, EX).correct


def test_exact_rational_arithmetic(task):
    # 6 / (3 / 2) = 4 exactly; floats would also agree here, but 1/3*3 must be exactly 1
    assert task.reward("<think>x</think><answer>6 / (3 / 2)</answer>",
                       {"nums": [6, 3, 2], "target": 4}).correct
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
    assert not r.correct
    assert r.total == 0.0  # none of them is an attempt over the given numbers


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


def test_shaping_weights_are_checked():
    with pytest.raises(ValueError, match=">= 0"):
        CountdownTask(n_train=5, n_test=2, shaping={"format": -0.5})
    with pytest.raises(ValueError, match="unknown shaping term.*'thinking'"):
        CountdownTask(n_train=5, n_test=2, shaping={"thinking": 1.0})


def test_each_generated_problem_carries_a_solution_and_a_demonstration_that_solves_it():
    task = CountdownTask(n_train=200, n_test=20, seed=5)
    for ex in task.train_examples + task.test_examples:
        demo = task.demonstration(ex)
        assert task.reward(task.prefill + demo, ex).correct, (ex, demo)
    rows = CountdownTask(n_train=3, n_test=2).train_examples
    assert all(task.demonstration({k: r[k] for k in ("nums", "target")}) is None for r in rows)


def test_the_warm_start_draws_on_the_first_n_problems_demonstrations_only():
    from nanovppo.warm_start import demonstrations
    task = CountdownTask(n_train=50, n_test=5, seed=3)
    first = demonstrations(task, 7)
    assert [ex for ex, _ in first] == task.train_examples[:7]
    assert [demo for _, demo in first] == [task.demonstration(ex) for ex in task.train_examples[:7]]
    assert len(demonstrations(task, None)) == 50 and len(demonstrations(task, 500)) == 50


def test_search_demonstrations_compute_each_try_exactly_and_end_at_the_target():
    """Each line of a search demonstration is a chain "a*b=c, c+d=e vs TARGET no|yes" (a
    fraction in brackets): every step's arithmetic holds, the numbers of a line are the
    problem's, a "no" line misses the target and the one "yes" line, last, reaches it; the
    answer is correct."""
    task = CountdownTask(n_train=300, n_test=10, seed=2, generate={"counts": [3], "low": 1,
                         "high": 12, "max_target": 36},
                         demonstration={"style": "search", "max_wrong_tries": 3})
    number = r"(\d+|\(\d+/\d+\))"
    step_re = re.compile(rf"{number}([-+*/]){number}={number}")
    wrong, fractions = Counter(), 0
    for ex in task.train_examples:
        demo = task.demonstration(ex)
        assert demo == task.demonstration(ex)  # a pure function of the problem
        assert task.reward(task.prefill + demo, ex).correct, demo
        lines = demo.split("</think>")[0].split("\n")
        wrong[len(lines) - 1] += 1
        for i, line in enumerate(lines):
            chain, target, verdict = re.fullmatch(r"(.*) vs (\d+) (yes|no)", line).groups()
            assert int(target) == ex["target"], demo
            assert verdict == ("yes" if i == len(lines) - 1 else "no"), demo
            value, used = None, []
            for step in chain.split(", "):
                a, op, b, right = step_re.fullmatch(step).groups()
                fractions += "(" in step
                x, y, z = (Fraction(v.strip("()")) for v in (a, b, right))
                assert value is None or x == value or y == value, demo
                used += [x, y] if value is None else [y if x == value else x]
                value = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x / y
                assert z == value, step
            assert sorted(used) == sorted(ex["nums"]), demo
            assert (value == ex["target"]) == (i == len(lines) - 1), demo
    assert fractions > 0  # the brackets were exercised
    # 0 to 3 wrong tries, each count drawn about equally often (75 of 300 expected each)
    assert set(wrong) == {0, 1, 2, 3} and min(wrong.values()) > 40, wrong


# What the goal and checked demonstration tests read: a step "a op b=c" of whole numbers,
# each operator's exact value, and the problems both draw (3 numbers from 1-12).
STEP = r"(\d+)([-+*/])(\d+)=(\d+)"
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: Fraction(a, b)}
GOAL_PROBLEMS = dict(n_train=300, n_test=10, seed=4, generate={"counts": [3], "low": 1,
                     "high": 12, "max_target": 36})


def test_goal_demonstrations_work_back_from_the_target_in_a_fixed_order():
    """A goal demonstration: lines "t op z=v no", then "t op z=v: x op y=v yes", then the
    equation. Each line's arithmetic holds and uses the target and one of the numbers; a
    "no" line's v is none of what the other two numbers make in one step (x+y, |x-y|, x*y,
    x/y when whole), the "yes" line's step makes v from exactly those two; no line comes
    twice, and the answer is correct."""
    task = CountdownTask(**GOAL_PROBLEMS, demonstration={"style": "goal", "max_wrong_tries": 0})
    tries = Counter()
    for ex in task.train_examples:
        demo = task.demonstration(ex)
        assert task.reward(task.prefill + demo, ex).correct, demo
        lines = demo.split("</think>")[0].split("\n")
        assert len(set(lines)) == len(lines), demo
        tries[len(lines) - 1] += 1
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            m = re.fullmatch(rf"{STEP}(: {STEP})? (yes|no)", line)
            assert m and (m.group(10) == "yes") == last and bool(m.group(5)) == last, demo
            a, op, b, need = m.group(1), m.group(2), m.group(3), int(m.group(4))
            assert OPS[op](int(a), int(b)) == need, line
            assert str(ex["target"]) in (a, b), line
            z = int(b) if a == str(ex["target"]) else int(a)
            rest = list(ex["nums"])
            rest.remove(z)
            x, y = rest
            made = {x + y, abs(x - y), x * y}
            if min(x, y) > 0 and max(x, y) % min(x, y) == 0:
                made.add(max(x, y) // min(x, y))
            if not last:
                assert need not in made, (line, x, y)
            else:
                p, q = int(m.group(6)), int(m.group(8))
                assert sorted((p, q)) == sorted((x, y)) and OPS[m.group(7)](p, q) == need, line
    # most problems are solved within a few lines, some need many
    assert tries[0] > 30 and max(tries) >= 6, tries


def test_checked_demonstrations_set_each_verdict_beside_the_values_it_compares():
    """A checked demonstration is the goal search with, before each number z's lines, a
    line of everything the other two make in one step ("x+y=s big-small=d x*y=p big/small=q",
    the last only when whole). Each such line's arithmetic holds over exactly the two other
    numbers; every need line "t op z=v" that follows says yes exactly when v is among the
    values on the line above its block, and only the last line says yes; dropping the value
    lines leaves the goal demonstration, and the answer is correct."""
    checked = CountdownTask(**GOAL_PROBLEMS,
                            demonstration={"style": "checked", "max_wrong_tries": 0})
    goal = CountdownTask(**GOAL_PROBLEMS, demonstration={"style": "goal", "max_wrong_tries": 0})
    blocks = Counter()
    for ex in checked.train_examples:
        demo = checked.demonstration(ex)
        assert checked.reward(checked.prefill + demo, ex).correct, demo
        lines = demo.split("</think>")[0].split("\n")
        needs, values = [], None
        for i, line in enumerate(lines):
            if "yes" not in line and "no" not in line:  # a value line
                made = [re.fullmatch(STEP, part) for part in line.split(" ")]
                assert all(made) and 3 <= len(made) <= 4, line
                pair = {(int(m.group(1)), int(m.group(3))) for m in made}
                (x, y), = {tuple(sorted(p)) for p in pair}
                rest = list(ex["nums"])
                for n in (x, y):
                    rest.remove(n)
                z, = rest
                assert [m.group(2) for m in made] == list("+-*/")[:len(made)], line
                assert all(OPS[m.group(2)](int(m.group(1)), int(m.group(3))) == int(m.group(4))
                           for m in made), line
                values = [m.group(0) for m in made]
                blocks[len(lines)] += 1
                continue
            assert values is not None, demo  # a value line comes first
            m = re.fullmatch(rf"{STEP}(: {STEP})? (yes|no)", line)
            assert m, line
            need, says_yes = int(m.group(4)), m.group(10) == "yes"
            assert str(z) in (m.group(1), m.group(3)), line
            value_set = {int(v.split("=")[1]) for v in values}
            assert says_yes == (need in value_set) == (i == len(lines) - 1), (line, values)
            if says_yes:
                assert f"{m.group(6)}{m.group(7)}{m.group(8)}={need}" in values, line
            needs.append(line)
        assert needs == goal.demonstration(ex).split("</think>")[0].split("\n"), demo
    assert len(blocks) > 3  # searches of several lengths were checked


@pytest.mark.parametrize("style", ["goal", "checked"])
def test_goal_demonstrations_need_three_numbers(style):
    with pytest.raises(ConfigError, match=f"style={style} writes searches over three numbers"):
        CountdownTask(n_train=5, n_test=2, generate={"counts": [3, 4], "low": 1, "high": 12,
                                                     "max_target": 36},
                      demonstration={"style": style, "max_wrong_tries": 0})


def test_goal_demonstrations_never_divide_by_zero():
    """With 0 among the numbers (task.generate.low: 0) the generator draws no division by
    zero (it raised ZeroDivisionError) and a goal search's z of 0 takes no division step:
    every demonstration's equation is correct."""
    task = CountdownTask(n_train=200, n_test=5, seed=1, generate={"counts": [3], "low": 0,
                         "high": 6, "max_target": 20},
                         demonstration={"style": "goal", "max_wrong_tries": 0})
    with_zero = [ex for ex in task.train_examples if 0 in ex["nums"]]
    assert len(with_zero) > 10
    for ex in with_zero:
        demo = task.demonstration(ex)
        assert task.reward(task.prefill + demo, ex).correct, (ex, demo)
