"""Countdown: reach a target from a few numbers with + - * /, each number used once.

A response is *correct* when the equation in its last ``<answer>`` (after the ``</think>``)
uses each given number exactly once and equals the target. That verdict is the task's
signal of accuracy. Training adds small *shaping* terms, paid only for an *attempt*: an
equation with an operator whose numbers all come from the given ones (none foreign, none
used more often than given). Prose, empty tags, a bare number or a copied example with
other numbers are no attempt and earn nothing, so the only way up is to work on the
problem:

- ``format``: the think block has content (a weight times 0 or 1);
- ``numbers``: the share of the given numbers the equation uses;
- ``closeness``: for an equation over exactly the given numbers, how near its value is to
  the target, 1 - |value - target| / max(|target|, 1), at least 0.

With positive ``format`` and ``numbers`` weights the reward orders responses as a grader
should: correct > a wrong equation over exactly the given numbers > an attempt with some
of them > prose in the tags = empty tags = no output = 0 (tests/test_countdown.py).

>>> from nanovppo.config import load_task
>>> task = load_task("countdown", n_train=1, n_test=1)  # shaping: format 0.1, numbers 0.2
>>> r = task.reward("<think>6-2=4, 4*3=12</think> <answer>(6 - 2) * 3</answer>",
...                 {"nums": [2, 3, 6], "target": 12})
>>> r.correct, round(r.total, 6)
(True, 1.3)
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from nanovppo.errors import ConfigError
from nanovppo.tasks.arith import InvalidEquation, evaluate
from nanovppo.tasks.base import Reward, Task, load_records, shaping_weights, split_rows

SHAPING = ("format", "numbers", "closeness")
DEMONSTRATION_STYLES = ("direct", "search", "goal", "checked")



# ----------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------

def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _random_target(nums: list[int], rng: random.Random) -> tuple[int, str, list[str]] | None:
    """Combine ``nums`` in a random order with random operators, left to right.

    Returns (target, an equation that reaches it, its steps as "a op b = c"), or None if
    the value is not a whole number or a step would divide by zero.
    """
    order = nums[:]
    rng.shuffle(order)
    value, expr, steps = Fraction(order[0]), str(order[0]), []
    for n in order[1:]:
        op = rng.choice("+-*/")
        inner = f"({expr})" if " " in expr else expr
        if op == "+":
            new, expr = value + n, f"{expr} + {n}"
            steps.append(f"{_fmt(value)} + {n} = {_fmt(new)}")
        elif op == "-" and value >= n:
            new, expr = value - n, f"{expr} - {n}"
            steps.append(f"{_fmt(value)} - {n} = {_fmt(new)}")
        elif op == "-":
            new, expr = n - value, f"{n} - {inner}"
            steps.append(f"{n} - {_fmt(value)} = {_fmt(new)}")
        elif op == "*":
            new, expr = value * n, f"{inner} * {n}"
            steps.append(f"{_fmt(value)} * {n} = {_fmt(new)}")
        elif n == 0:
            return None  # no division by zero: draw again
        else:
            new, expr = value / n, f"{inner} / {n}"
            steps.append(f"{_fmt(value)} / {n} = {_fmt(new)}")
        value = new
    return (int(value), expr, steps) if value.denominator == 1 else None


def _compact_line(steps: list[str]) -> str:
    """Steps "a op b = c" as one line without spaces, "a*b=c, c+d=e", each fraction in
    brackets so that "(3/2)*2=3" reads one way."""
    bracket = lambda x: f"({x})" if "/" in x else x  # noqa: E731 (a fraction like 3/2)
    out = []
    for step in steps:
        a, op, b, _, c = step.split(" ")
        out.append(f"{bracket(a)}{op}{bracket(b)}={bracket(c)}")
    return ", ".join(out)


def _pair_values(x: int, y: int) -> list[tuple[str, int]]:
    """What two numbers make in one step: (the step, its value), whole values only."""
    big, small = max(x, y), min(x, y)
    out = [(f"{x}+{y}", x + y), (f"{big}-{small}", big - small), (f"{x}*{y}", x * y)]
    if small and big % small == 0:
        out.append((f"{big}/{small}", big // small))
    return out


def _goal_search(nums: list[int], target: int, checked: bool = False
                 ) -> tuple[list[str], str] | None:
    """A search of three numbers that works back from the target: for each number z in
    turn and each way z can take part in the last step, the value the other two must make,
    then whether they make it. Returns the lines and the equation found, or None if no
    equation of the form (x op y) op z (whole values) reaches the target.

    ``checked``: each number z's lines follow a line with everything the other two make in
    one step ("3+6=9 6-3=3 3*6=18 6/3=2"), so that every verdict compares the value needed
    with values written just above it."""
    lines, splits, written = [], set(), set()
    for i, z in enumerate(nums):
        x, y = (n for j, n in enumerate(nums) if j != i)
        if (z, min(x, y), max(x, y)) in splits:  # the same split again: nothing new
            continue
        splits.add((z, min(x, y), max(x, y)))
        pairs = _pair_values(x, y)
        header = " ".join(f"{step}={v}" for step, v in pairs) if checked else None
        t = target
        # the last step, how the other two's value v must follow, and the equation's shape
        ways = [(t - z, f"{t}-{z}", "{e} + " + str(z)),       # v + z = t
                (t + z, f"{t}+{z}", "{e} - " + str(z)),       # v - z = t
                (z - t, f"{z}-{t}", str(z) + " - ({e})"),     # z - v = t
                (t // z if z and t % z == 0 else None, f"{t}/{z}", "({e}) * " + str(z)),
                (t * z if z else None, f"{t}*{z}", "({e}) / " + str(z)),  # v / z = t
                (z // t if z and z % t == 0 else None, f"{z}/{t}", str(z) + " / ({e})")]
        for need, how, shape in ways:
            if need is None or need < 0 or how in written:  # z = t: t-z is z-t, t/z is z/t
                continue
            written.add(how)
            if header is not None:  # the pair's values, once per z, before its first need
                lines.append(header)
                header = None
            hit = next((step for step, v in pairs if v == need), None)
            if hit is None:
                lines.append(f"{how}={need} no")
                continue
            lines.append(f"{how}={need}: {hit}={need} yes")
            spaced = "".join(f" {c} " if c in "+-*/" else c for c in hit)
            return lines, shape.format(e=spaced)
    return None


def split_of(nums: list[int], target: int, test_fraction: float) -> str:
    """'test' or 'train', fixed by a hash of the problem, so the splits never share one."""
    key = f"{sorted(nums)}={target}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def generate_examples(n_train: int, n_test: int, seed: int, counts=(3, 4), low: int = 1,
                      high: int = 20, max_target: int = 100, test_fraction: float = 0.1):
    """Reachable Countdown problems, train and test disjoint by construction.

    Each example holds ``nums``, ``target`` and one ``solution`` (an equation that reaches
    the target, with its ``steps``), from which ``CountdownTask.demonstration`` writes a
    response to imitate.
    """
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    wanted = {"train": n_train, "test": n_test}
    seen = set()
    attempts = 0
    while any(len(splits[k]) < wanted[k] for k in splits):
        attempts += 1
        if attempts > 200 * (n_train + n_test) + 10_000:
            raise ConfigError(
                f"cannot generate {n_train} + {n_test} distinct Countdown problems from "
                f"{list(counts)} numbers in [{low}, {high}] with targets up to {max_target} "
                f"(found {len(splits['train'])} + {len(splits['test'])}); widen task.generate "
                "or lower task.n_train / task.n_test")
        nums = [rng.randint(low, high) for _ in range(rng.choice(list(counts)))]
        made = _random_target(nums, rng)
        if made is None or not 1 <= made[0] <= max_target:
            continue
        target, solution, steps = made
        key = (tuple(sorted(nums)), target)
        if key in seen:
            continue
        seen.add(key)
        split = split_of(nums, target, test_fraction)
        if len(splits[split]) < wanted[split]:
            splits[split].append({"nums": nums, "target": target, "solution": solution,
                                  "steps": steps})
    return splits["train"], splits["test"]


# ----------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------

def last_answer(text: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>``, found in linear time."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>"):end]


@dataclass(frozen=True)
class Attempt:
    """What a response tried: its think text, and the equation of its last answer with
    the equation's value and the numbers it uses (in order)."""

    think: str
    equation: str
    value: Fraction
    used: tuple[int, ...]


def parse_attempt(response: str, nums: list[int]) -> Attempt | None:
    """The response's attempt at the problem, or None if it makes none: no closed
    ``<answer>`` after the think block, no equation with an operator in it, or a number in
    it that was not given (or is used more often than given)."""
    think_open = response.find("<think>")
    think_close = response.find("</think>", think_open + 1) if think_open >= 0 else -1
    think = response[think_open + len("<think>"):think_close] if think_close > think_open >= 0 else ""
    answer = last_answer(response[think_close:] if think_close >= 0 else response)
    if answer is None:
        return None
    equation = answer.replace("×", "*").replace("÷", "/").strip()
    try:
        value, used = evaluate(equation)
    except InvalidEquation:
        return None
    if len(used) < 2 or Counter(used) - Counter(int(n) for n in nums):
        return None
    return Attempt(think, equation, value, tuple(used))


class CountdownTask(Task):
    name = "countdown"
    stop = ("</answer>",)

    def __init__(self, *, name: str, source: str, hub_id: str | None, data_files,
                 generate: dict, n_train: int, n_test: int, seed: int,
                 system_prompt: str | None, user_template: str, prefill: str,
                 shaping: dict, demonstration: dict):
        """Every option comes from conf/task/countdown.yaml, where each is described (no
        defaults here)."""
        super().__init__(system_prompt, user_template, prefill)
        self.name = name
        self.shaping = shaping_weights(shaping, SHAPING, "task.shaping")
        demo = dict(demonstration)
        if set(demo) != {"style", "max_wrong_tries"} or demo["style"] not in DEMONSTRATION_STYLES \
                or not (isinstance(demo["max_wrong_tries"], int) and demo["max_wrong_tries"] >= 0):
            raise ConfigError("task.demonstration takes style (direct, search, goal or "
                              f"checked) and max_wrong_tries (an integer >= 0); got {demo}")
        self.demo_style, self.max_wrong_tries = demo["style"], demo["max_wrong_tries"]
        self.seed = seed
        if source == "generate":
            keys = ("counts", "low", "high", "max_target")  # conf/task/countdown.yaml
            g = dict(generate or {})
            if set(g) != set(keys):
                raise ConfigError(f"task.generate takes exactly {', '.join(keys)}; got "
                                  f"{', '.join(sorted(g)) or 'nothing'}")
            settings = {"counts": list(g["counts"]), "low": g["low"], "high": g["high"],
                        "max_target": g["max_target"]}
            if self.demo_style in ("goal", "checked") and settings["counts"] != [3]:
                raise ConfigError(f"task.demonstration.style={self.demo_style} writes searches "
                                  "over three numbers; task.generate.counts is "
                                  f"{settings['counts']}: set it to [3] or choose style direct "
                                  "or search")
            self.train_examples, self.test_examples = generate_examples(
                n_train, n_test, seed, counts=tuple(settings["counts"]), low=settings["low"],
                high=settings["high"], max_target=settings["max_target"])
            self.data_source = ("code", {"generator": f"{__name__}.generate_examples",
                                         "seed": seed, "n_train": n_train, "n_test": n_test,
                                         **settings})
        elif source in ("hub", "file"):
            rows = load_records(hub_id if source == "hub" else None,
                                data_files if source == "file" else None, "train",
                                required=("nums", "target"))
            rows = [{"nums": [int(n) for n in r["nums"]], "target": int(r["target"])}
                    for r in rows]
            random.Random(seed).shuffle(rows)
            self.train_examples, self.test_examples = split_rows(rows, n_test, n_train)
            self.data_source = (("hugging_face", {"path": hub_id, "split": "train"}) if source == "hub"
                                else ("local", {"uri": str(data_files)}))
        else:
            raise ConfigError(f"task.source must be generate, hub or file, not {source!r}")

    def final_answer(self, response: str) -> str | None:
        answer = last_answer(response)
        return None if answer is None else "".join(answer.split())

    def solution_key(self, response: str) -> str:
        """Two correct responses are the same solution when their equations match, spaces
        aside."""
        return self.final_answer(response) or ""

    def demonstration(self, example: dict) -> str | None:
        """A response that solves ``example``, written from the solution the generator
        recorded (None for problems loaded without one). It continues the prefill.

        ``direct``: the solution's steps, then the answer. ``search``: first 0 to
        ``max_wrong_tries`` other combinations of the numbers, each computed exactly, its
        value set beside the target (``36 vs 12``) and marked ``no``, then the solution's
        steps marked ``yes``: a search to imitate, whose checks the answer can rest on.
        The comparison puts the two numbers it compares side by side, so that the verdict
        need not look back into the prompt. Its lines are written without spaces
        (``3*6=18``; a fraction in brackets, ``(3/2)*2=3``), which takes a quarter fewer
        tokens than ``3 * 6 = 18`` with SmolLM2's tokenizer.

        >>> from nanovppo.config import load_task
        >>> task = load_task("countdown", n_train=1, n_test=1,
        ...                  demonstration={"style": "search", "max_wrong_tries": 2})
        >>> ex = {"nums": [2, 3, 6], "target": 12, "solution": "(6 - 2) * 3",
        ...       "steps": ["6 - 2 = 4", "4 * 3 = 12"]}
        >>> print(task.demonstration(ex))  # 3 * 6 * 2 = 36 and 6 / 3 / 2 = 1 miss 12
        3*6=18, 18*2=36 vs 12 no
        6/3=2, 2/2=1 vs 12 no
        6-2=4, 4*3=12 vs 12 yes</think> <answer>(6 - 2) * 3</answer>

        ``goal`` (three numbers): a search that works back from the target, tried in a
        fixed order so that it never repeats itself. For each number z in turn and each
        way z can take the last step (v + z, v - z, z - v, v * z, v / z, z / v), the value
        v the other two must make, marked ``no`` until they make it in one step; then the
        equation. It reaches every problem whose solution needs no fraction on the way
        (all of countdown_small's); for the others it writes the direct demonstration.

        >>> task = load_task("countdown_small", n_train=1, n_test=1,
        ...                  demonstration={"style": "goal", "max_wrong_tries": 0})
        >>> print(task.demonstration(ex))  # 3, 6 make neither 10, 14, 6 nor 24
        12-2=10 no
        12+2=14 no
        12/2=6 no
        12*2=24 no
        12-3=9 no
        12+3=15 no
        12/3=4: 6-2=4 yes</think> <answer>(6 - 2) * 3</answer>

        ``checked``: the goal search with each number's lines preceded by what the other
        two make in one step, so that a verdict compares numbers written side by side
        rather than a value the model must work out unseen.

        >>> task = load_task("countdown_small", n_train=1, n_test=1,
        ...                  demonstration={"style": "checked", "max_wrong_tries": 0})
        >>> print(task.demonstration(ex))
        3+6=9 6-3=3 3*6=18 6/3=2
        12-2=10 no
        12+2=14 no
        12/2=6 no
        12*2=24 no
        2+6=8 6-2=4 2*6=12 6/2=3
        12-3=9 no
        12+3=15 no
        12/3=4: 6-2=4 yes</think> <answer>(6 - 2) * 3</answer>
        """
        if "solution" not in example:
            return None
        answer = f"</think> <answer>{example['solution']}</answer>"
        direct = ", ".join(example["steps"]) + answer
        if self.demo_style == "direct":
            return direct
        if self.demo_style in ("goal", "checked"):
            nums = list(example["nums"])
            found = (_goal_search(nums, example["target"], checked=self.demo_style == "checked")
                     if len(nums) == 3 else None)
            if found is None:
                return direct
            lines, equation = found
            return "\n".join(lines) + f"</think> <answer>{equation}</answer>"
        right = _compact_line(example["steps"])
        key = f"{self.seed}:{sorted(example['nums'])}={example['target']}".encode()
        rng = random.Random(hashlib.sha256(key).digest())
        wanted = rng.randint(0, self.max_wrong_tries)
        tries, seen = [], {right}
        for _ in range(20 * wanted):  # a few problems have fewer wrong combinations
            if len(tries) == wanted:
                break
            made = _random_target(list(example["nums"]), rng)
            line = None if made is None else _compact_line(made[2])
            if line is None or made[0] == example["target"] or line in seen:
                continue
            seen.add(line)
            tries.append(f"{line} vs {example['target']} no")
        return "\n".join(tries + [f"{right} vs {example['target']} yes"]) + answer

    def reward(self, response: str, example: dict) -> Reward:
        nums = example["nums"]
        attempt = parse_attempt(response, nums)
        terms = dict.fromkeys(SHAPING, 0.0)
        if attempt is None:
            return Reward(False, terms)
        exact = Counter(attempt.used) == Counter(int(n) for n in nums)
        target = example["target"]
        correct = exact and attempt.value == target
        w = self.shaping
        terms["format"] = w["format"] * float(bool(attempt.think.strip()))
        terms["numbers"] = w["numbers"] * len(attempt.used) / len(nums)
        if exact:
            miss = abs(attempt.value - target) / max(abs(target), 1)
            terms["closeness"] = w["closeness"] * float(max(Fraction(0), 1 - miss))
        return Reward(correct, terms)
