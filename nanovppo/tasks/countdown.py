"""Countdown: reach a target from a few numbers with + - * /, each number used once.

Reward = ``answer`` (1 when the last ``<answer>`` holds an equation that uses each given
number exactly once and equals the target) + ``format`` (in [0, 1]: partial credit for
each part of the ``<think> ... </think> <answer> ... </answer>`` layout, weighted as the
task config says). Partial credit matters: a small model rarely produces the whole layout,
and a reward that is always 0 gives GRPO nothing to learn from.

>>> task = CountdownTask(format_weights={"think": 0.5, "answer_tags": 0.5,
...                                     "equation": 0.0, "numbers": 0.0})
>>> task.reward("<think>6-2=4, 4*3=12</think> <answer>(6 - 2) * 3</answer>",
...             {"nums": [2, 3, 6], "target": 12}).total
2.0
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from fractions import Fraction

from nanovppo.errors import ConfigError
from nanovppo.tasks.arith import InvalidEquation, evaluate
from nanovppo.tasks.base import Reward, Task, load_records, split_rows

FORMAT_PARTS = ("think", "answer_tags", "equation", "numbers")

SYSTEM = ("You are a helpful assistant. You first think about the reasoning process "
          "and then give the answer.")
USER = ("Using the numbers {nums}, create an equation that equals {target}. You can use "
        "+, -, * and /, and each number exactly once. Think in <think> </think> tags, then "
        "give the equation in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")


# ----------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------

def _random_target(nums: list[int], rng: random.Random) -> int | None:
    """Combine ``nums`` in a random order with random operators; None if not a whole number."""
    order = nums[:]
    rng.shuffle(order)
    value = Fraction(order[0])
    for n in order[1:]:
        op = rng.choice("+-*/")
        if op == "+":
            value += n
        elif op == "-":
            value = value - n if value >= n else n - value
        elif op == "*":
            value *= n
        else:
            value = value / n
    return int(value) if value.denominator == 1 else None


def split_of(nums: list[int], target: int, test_fraction: float) -> str:
    """'test' or 'train', fixed by a hash of the problem, so the splits never share one."""
    key = f"{sorted(nums)}={target}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def generate_examples(n_train: int, n_test: int, seed: int, counts=(3, 4), low: int = 1,
                      high: int = 20, max_target: int = 100, test_fraction: float = 0.1):
    """Reachable Countdown problems, train and test disjoint by construction."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    wanted = {"train": n_train, "test": n_test}
    seen = set()
    attempts = 0
    while any(len(splits[k]) < wanted[k] for k in splits):
        attempts += 1
        if attempts > 200 * (n_train + n_test) + 10_000:
            raise RuntimeError("cannot generate enough distinct Countdown problems; "
                               "widen task.generate.high or task.generate.max_target")
        nums = [rng.randint(low, high) for _ in range(rng.choice(list(counts)))]
        target = _random_target(nums, rng)
        if target is None or not 1 <= target <= max_target:
            continue
        key = (tuple(sorted(nums)), target)
        if key in seen:
            continue
        seen.add(key)
        split = split_of(nums, target, test_fraction)
        if len(splits[split]) < wanted[split]:
            splits[split].append({"nums": nums, "target": target})
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


def format_parts(response: str, nums: list[int]) -> tuple[dict[str, float], str | None]:
    """How much of the layout the response has (each part in [0, 1]), and the answer text.

    think: a closed ``<think>...</think>``; answer_tags: ``<answer>...</answer>`` after it;
    equation: the answer is an equation with at least one operator (a bare number is not);
    numbers: how well its numbers match the given ones, |used & given| / max(|given|,
    |used|), so missing and foreign numbers both cost. Each step towards a full answer
    earns a little more, so GRPO's groups keep a spread of rewards to learn from instead
    of all settling on one shortcut.
    """
    parts = dict.fromkeys(FORMAT_PARTS, 0.0)
    think_open = response.find("<think>")
    think_close = response.find("</think>", think_open + 1) if think_open >= 0 else -1
    if think_close > think_open >= 0:
        parts["think"] = 1.0
    tail = response[think_close:] if think_close >= 0 else response
    answer = last_answer(tail)
    if answer is None:
        return parts, None
    parts["answer_tags"] = 1.0
    answer = answer.replace("×", "*").replace("÷", "/")
    try:
        _, used = evaluate(answer.strip())
    except InvalidEquation:
        return parts, answer
    given, used = Counter(int(n) for n in nums), Counter(used)
    if sum(used.values()) >= 2:
        parts["equation"] = 1.0
        # overlap with the given numbers, diluted by missing and by foreign ones
        parts["numbers"] = sum((used & given).values()) / max(sum(given.values()), sum(used.values()))
    return parts, answer


class CountdownTask(Task):
    name = "countdown"
    stop = ("</answer>",)

    def __init__(self, name: str = "countdown", source: str = "generate", hub_id: str | None = None,
                 data_files=None, generate: dict | None = None, n_train: int = 2000,
                 n_test: int = 64, seed: int = 0, system_prompt: str | None = SYSTEM,
                 user_template: str = USER, prefill: str = "<think>",
                 format_weights: dict | None = None):
        super().__init__(system_prompt, user_template, prefill)
        self.name = name
        weights = dict(format_weights or dict.fromkeys(FORMAT_PARTS, 1 / len(FORMAT_PARTS)))
        unknown = set(weights) - set(FORMAT_PARTS)
        if unknown:
            raise ConfigError(f"task.format_weights: unknown part(s) {sorted(unknown)}; "
                             f"the parts are {list(FORMAT_PARTS)}")
        if abs(sum(weights.values()) - 1.0) > 1e-6 or min(weights.values()) < 0:
            raise ConfigError(f"task.format_weights must be >= 0 and sum to 1, got {weights}")
        self.format_weights = {k: float(weights.get(k, 0.0)) for k in FORMAT_PARTS}
        if source == "generate":
            g = dict(generate or {})
            self.train_examples, self.test_examples = generate_examples(
                n_train, n_test, seed, counts=tuple(g.get("counts", (3, 4))),
                low=g.get("low", 1), high=g.get("high", 20),
                max_target=g.get("max_target", 100))
        elif source in ("hub", "file"):
            rows = load_records(hub_id if source == "hub" else None,
                                data_files if source == "file" else None, "train",
                                required=("nums", "target"))
            rows = [{"nums": [int(n) for n in r["nums"]], "target": int(r["target"])}
                    for r in rows]
            random.Random(seed).shuffle(rows)
            self.train_examples, self.test_examples = split_rows(rows, n_test, n_train)
        else:
            raise ConfigError(f"task.source must be generate, hub or file, not {source!r}")

    def final_answer(self, response: str) -> str | None:
        answer = last_answer(response)
        return None if answer is None else "".join(answer.split())

    def reward(self, response: str, example: dict) -> Reward:
        parts, answer = format_parts(response, example["nums"])
        correct = 0.0
        if parts["numbers"] == 1.0:
            value, _ = evaluate(answer.replace("×", "*").replace("÷", "/").strip())
            correct = float(value == example["target"])
        fmt = sum(self.format_weights[k] * v for k, v in parts.items())
        named = {"answer": correct, "format": fmt, **{f"format_{k}": v for k, v in parts.items()}}
        return Reward(total=correct + fmt, parts=named)
