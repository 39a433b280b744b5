"""The task interface and the dataset loading shared by all tasks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nanovppo.errors import ConfigError, NanovppoError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reward:
    """A verifiable reward: whether the response solves the problem, and the shaping
    terms that training adds to it.

    ``correct`` is the task's own verdict, the one signal that accuracy, pass@k, maj@k and
    the filters of RFT and DAPO read. ``shaping`` holds named extra terms (partial credit
    for layout or progress), each logged as ``train/shaping/<name>_mean``; ``total``, what
    training optimises, is 1 for a correct response plus the shaping terms.
    """

    correct: bool
    shaping: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(self.correct) + sum(self.shaping.values())


def shaping_weights(given: dict, names: tuple[str, ...], where: str) -> dict[str, float]:
    """``given`` checked against the shaping terms ``names`` a task knows: each one given
    (the task's YAML lists them all, 0 for off), no other."""
    given = dict(given)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown shaping term(s) {unknown}; the terms are {list(names)}")
    missing = [k for k in names if k not in given]
    if missing:
        raise ConfigError(f"{where} lacks the shaping term(s) {missing} (0 turns one off)")
    weights = {k: float(given[k]) for k in names}
    if min(weights.values(), default=0.0) < 0:
        raise ConfigError(f"{where}: shaping weights must be >= 0, got {weights}")
    return weights


class DatasetUnavailableError(NanovppoError):
    """The configured dataset cannot be loaded."""


class Task:
    """Base class: subclasses set the examples and implement ``reward``."""

    name = "task"
    # Strings that end a completion (the engine stops once one has been generated).
    stop: tuple[str, ...] = ()

    def __init__(self, system_prompt: str | None, user_template: str, prefill: str = ""):
        self.system_prompt = system_prompt
        self.user_template = user_template
        self.prefill = prefill
        self.train_examples: list[dict] = []
        self.test_examples: list[dict] = []
        # Where the examples came from, for the run's dataset inputs in MLflow: a source
        # type (code | hugging_face | local) and its description; subclasses set it.
        self.data_source: tuple[str, dict] = (
            "code", {"task": f"{type(self).__module__}.{type(self).__qualname__}"})

    def messages(self, example: dict) -> list[dict[str, str]]:
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": self.user_template.format(**example)})
        return msgs

    def datasets(self) -> dict[str, dict]:
        """The training and test sets as MLflow dataset inputs describe them."""
        kind, source = self.data_source
        return {context: {"name": f"{self.name}-{context}", "rows": rows, "source_type": kind,
                          "source": source}
                for context, rows in (("train", self.train_examples), ("test", self.test_examples))}

    def prompt_text(self, example: dict) -> str | None:
        """The prompt as plain text, for a model without a chat template; None (the
        default) renders ``messages`` with the tokenizer's chat template."""
        return None

    def reward(self, response: str, example: dict) -> Reward:  # pragma: no cover - abstract
        raise NotImplementedError

    def final_answer(self, response: str) -> str | None:
        """The response's final answer, normalised for comparison (None if it has none):
        maj@k votes on it and the collapse metrics count distinct ones."""
        return None

    def solution_key(self, response: str) -> str:
        """What makes two solutions the same for RFT's ``dedup: solution``: by default the
        response with its whitespace collapsed and lower-cased."""
        return " ".join(response.lower().split())


def load_records(hub_id: str | None, data_files: str | Sequence[str] | None,
                 split: str, required: Sequence[str], hub_config: str | None = None) -> list[dict]:
    """Rows of a local JSON/JSONL/Parquet file or a hub dataset, checked for ``required`` fields."""
    if data_files:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        for f in files:
            if not Path(f).is_file():
                raise DatasetUnavailableError(f"task.data_files: {f} does not exist")
        rows = _read_files(files)
        where = ", ".join(map(str, files))
    elif hub_id:
        rows = _read_hub(hub_id, hub_config, split)
        where = hub_id
    else:
        raise DatasetUnavailableError("set task.data_files=PATH or task.hub_id")
    if not rows:
        raise DatasetUnavailableError(f"{where} holds no rows")
    missing = [k for k in required if k not in rows[0]]
    if missing:
        raise DatasetUnavailableError(
            f"{where} lacks the field(s) {missing}; its rows have {sorted(rows[0])}")
    return rows


def _read_files(files: list[str]) -> list[dict]:
    rows: list[dict] = []
    for f in files:
        suffix = Path(f).suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(f).to_pylist())
        elif suffix == ".jsonl":
            with open(f) as fh:
                rows.extend(json.loads(line) for line in fh if line.strip())
        elif suffix == ".json":
            with open(f) as fh:
                data = json.load(fh)
            rows.extend(data if isinstance(data, list) else data.get("data", []))
        else:
            raise DatasetUnavailableError(f"{f}: use a .json, .jsonl or .parquet file")
    return rows


def _read_hub(hub_id: str, hub_config: str | None, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, hub_config, split=split)
    except Exception as e:  # the hub raises many types when offline or the id is wrong
        raise DatasetUnavailableError(
            f"dataset {hub_id!r} is not cached and the hub cannot be reached ({type(e).__name__}: "
            f"{str(e)[:200]}): pass task.data_files=PATH to a local JSON/JSONL/Parquet copy") from e
    return [dict(r) for r in ds]


def split_rows(rows: list[Any], test_size: int, max_train: int | None) -> tuple[list, list]:
    """Hold out the last ``test_size`` rows as the test set (disjoint from train by index)."""
    if test_size >= len(rows):
        raise DatasetUnavailableError(
            f"the dataset has {len(rows)} rows, not enough for {test_size} test examples")
    train, test = rows[: len(rows) - test_size], rows[len(rows) - test_size:]
    return (train[:max_train] if max_train else train), test
