"""MATH (Hendrycks et al.) and GSM8K: reasoning in text, a final answer to check.

Both load from the hub or from local JSON/JSONL/Parquet files and score the response's
final answer against the gold one (MATH: the last ``\\boxed{}`` checked with math-verify;
GSM8K: exact numeric equality). An example whose gold answer cannot be parsed is dropped
at load time, with a warning that counts them, so it can never hand out a free reward.
"""

from __future__ import annotations

import logging
import random

from nanovppo.errors import ConfigError
from nanovppo.tasks.base import (DatasetUnavailableError, Reward, Task, load_records,
                                 shaping_weights)
from nanovppo.tasks.grading import (MathGrader, gsm8k_correct, gsm8k_final_answer, has_content,
                                    last_boxed, parse_number)

log = logging.getLogger(__name__)


def _load_split(hub_id, hub_configs, data_files, split, required):
    """Rows of one split: local files, or the hub (one or several dataset configs)."""
    if data_files:
        return load_records(None, data_files, split, required)
    if not hub_id:
        return []
    rows = []
    for config in (hub_configs or [None]):
        rows += load_records(hub_id, None, split, required, hub_config=config)
    return rows


class _AnswerTask(Task):
    """Shared loading, splitting and prompt plumbing of MATH and GSM8K."""

    question_field = "problem"

    # Shaping terms: ``boxed`` pays for ending with a boxed answer that has content.
    SHAPING = ("boxed",)

    def __init__(self, name, templates: dict, template: str, prefill: str, shaping: dict,
                 seed: int, n_train: int | None, n_test: int | None):
        if template not in templates:
            raise ConfigError(f"task.template={template!r}; choose one of {sorted(templates)}")
        t = templates[template]
        if ("user" in t) == ("raw" in t):
            raise ConfigError(f"task.templates.{template} needs either user (a chat message) "
                              "or raw (plain text, for models without a chat template)")
        super().__init__(t.get("system"), t.get("user", ""), prefill)
        self.raw_template = t.get("raw")
        self.stop = tuple(t.get("stop") or ())
        self.name = name
        self.shaping = shaping_weights(shaping, self.SHAPING, "task.shaping")
        self.seed, self.n_train, self.n_test = seed, n_train, n_test
        self.dropped = 0  # examples whose gold answer could not be parsed

    def _finish_loading(self, train: list[dict], test: list[dict] | None,
                        test_from_train: int) -> None:
        """``test`` None: no test source was configured, hold out part of train."""
        rng = random.Random(self.seed)
        rng.shuffle(train)
        if test is not None and not test:
            raise DatasetUnavailableError(f"{self.name}: the test set is empty (after filters)")
        if test is None:
            if len(train) <= test_from_train:
                raise DatasetUnavailableError(
                    f"{self.name}: {len(train)} usable examples, too few to hold out "
                    f"{test_from_train} for testing; give task.test_files")
            test, train = train[-test_from_train:], train[:-test_from_train]
        self.train_examples = train[: self.n_train] if self.n_train else train
        self.test_examples = test[: self.n_test] if self.n_test else test
        if not self.train_examples:
            raise DatasetUnavailableError(f"{self.name}: no usable training examples")

    def _shaping(self, boxed: str | None) -> dict[str, float]:
        return {"boxed": self.shaping["boxed"] * float(boxed is not None and has_content(boxed))}

    def _keep(self, row: dict) -> bool:
        """Whether a row passes the task's filters (subjects, levels)."""
        return True

    def _example(self, row: dict) -> dict | None:
        """``{"question", "gold"}`` of a row, or None when its gold answer cannot be parsed."""
        raise NotImplementedError

    def _prepare(self, rows: list[dict]) -> list[dict]:
        out, dropped = [], 0
        for row in filter(self._keep, rows):
            example = self._example(row)
            if example is None:
                dropped += 1
            else:
                out.append(example)
        if dropped:
            log.warning("%s: dropped %d of %d examples whose gold answer cannot be parsed",
                        self.name, dropped, len(rows))
        self.dropped += dropped
        return out

    def messages(self, example: dict) -> list[dict[str, str]]:
        if self.raw_template is not None:
            return [{"role": "user", "content": self.prompt_text(example)}]
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        # plain replacement, not str.format: templates hold LaTeX braces such as \boxed{}
        msgs.append({"role": "user",
                     "content": self.user_template.replace("{question}", example["question"])})
        return msgs

    def prompt_text(self, example: dict) -> str | None:
        """The whole prompt as plain text for a ``raw`` template (no chat template)."""
        if self.raw_template is None:
            return None
        return self.raw_template.replace("{question}", example["question"])



class MathTask(_AnswerTask):
    """``task=math``: see conf/task/math.yaml."""

    def __init__(self, *, name: str, hub_id: str | None, hub_configs: list[str] | None,
                 data_files, test_hub_id: str | None, test_files, subjects, levels,
                 problem_field: str, answer_field: str | None, solution_field: str,
                 templates: dict, template: str, prefill: str, shaping: dict,
                 grading_timeout: float, seed: int, n_train: int | None, n_test: int | None,
                 test_from_train: int):
        # Every option comes from conf/task/math.yaml, where each is described.
        super().__init__(name, templates, template, prefill,
                         shaping, seed, n_train, n_test)
        self.grader = MathGrader(timeout=grading_timeout)
        self.problem_field, self.answer_field, self.solution_field = \
            problem_field, answer_field, solution_field
        self.subjects = set(subjects) if subjects else None
        self.levels = {str(x) for x in levels} if levels else None
        train = _load_split(hub_id, hub_configs, data_files, "train", [problem_field])
        if test_files or not data_files:  # with local data, no hub is asked for the test set
            test = self._prepare(_load_split(test_hub_id or hub_id,
                                             None if test_hub_id else hub_configs,
                                             test_files, "test", [problem_field]))
        else:
            test = None
        self._finish_loading(self._prepare(train), test, test_from_train)
        self.data_source = (("local", {"uri": str(data_files), "test_uri": str(test_files)})
                            if data_files else
                            ("hugging_face", {"path": hub_id, "configs": list(hub_configs or []),
                                              "test_path": test_hub_id or hub_id}))

    def gold_of(self, row: dict) -> str | None:
        answer = row.get(self.answer_field) if self.answer_field else None
        if answer not in (None, ""):
            return str(answer)
        solution = row.get(self.solution_field)
        return last_boxed(solution) if isinstance(solution, str) else None

    def _keep(self, row: dict) -> bool:
        if self.subjects and str(row.get("type", row.get("subject", ""))) not in self.subjects:
            return False
        return not (self.levels and str(row.get("level", "")).replace("Level ", "") not in self.levels)

    def _example(self, row: dict) -> dict | None:
        gold = self.gold_of(row)
        if gold is None or not gold.strip():
            return None
        return {"question": row[self.problem_field], "gold": gold.strip()}

    def final_answer(self, response: str) -> str | None:
        return last_boxed(response)

    def reward(self, response: str, example: dict) -> Reward:
        boxed = last_boxed(response)
        correct = boxed is not None and self.grader.equal(example["gold"], boxed)
        return Reward(correct, self._shaping(boxed))


class GSM8KTask(_AnswerTask):
    """``task=gsm8k``: see conf/task/gsm8k.yaml."""

    def __init__(self, *, name: str, hub_id: str | None, hub_config: str | None, data_files,
                 test_files, question_field: str, answer_field: str, templates: dict,
                 template: str, prefill: str, shaping: dict, seed: int, n_train: int | None,
                 n_test: int | None, test_from_train: int):
        # Every option comes from conf/task/gsm8k.yaml, where each is described.
        super().__init__(name, templates, template, prefill,
                         shaping, seed, n_train, n_test)
        self.question_field, self.answer_field = question_field, answer_field
        required = [question_field, answer_field]
        configs = [hub_config] if hub_config else None
        train = _load_split(hub_id, configs, data_files, "train", required)
        test = None
        if test_files or not data_files:
            test = self._prepare(_load_split(hub_id if not data_files else None, configs,
                                             test_files, "test", required))
        self._finish_loading(self._prepare(train), test, test_from_train)
        self.data_source = (("local", {"uri": str(data_files), "test_uri": str(test_files)})
                            if data_files else ("hugging_face", {"path": hub_id, "config": hub_config}))

    def _example(self, row: dict) -> dict | None:
        answer = str(row[self.answer_field])
        gold = answer[answer.rfind("####") + 4:] if "####" in answer else answer
        if parse_number(gold) is None:
            return None
        return {"question": row[self.question_field], "gold": gold.strip()}

    def final_answer(self, response: str) -> str | None:
        answer = gsm8k_final_answer(response)
        value = parse_number(answer) if answer is not None else None
        return None if value is None else str(value)

    def reward(self, response: str, example: dict) -> Reward:
        return Reward(gsm8k_correct(response, example["gold"]), self._shaping(last_boxed(response)))
