"""MATH and GSM8K: answer extraction, loading, rewards and bad input (the graders' labelled
set is in test_grading.py)."""

import time
from pathlib import Path

import pytest

from nanovppo.tasks.base import DatasetUnavailableError
from nanovppo.tasks.grading import gsm8k_final_answer, last_boxed
from nanovppo.config import load_task

FIX = Path(__file__).parent / "fixtures"


def MathTask(**overrides):
    """The task as conf/task/math.yaml builds it, with ``overrides``."""
    return load_task("math", **overrides)


def GSM8KTask(**overrides):
    """The task as conf/task/gsm8k.yaml builds it, with ``overrides``."""
    return load_task("gsm8k", **overrides)

def test_last_boxed_handles_nesting_and_bad_input():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2^{3}}}") == "\\frac{1}{2^{3}}"
    assert last_boxed("\\boxed 5") == "5"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed {x}") is None
    assert last_boxed("\\fbox{3}") == "3"


ADVERSARIAL = [
    "\\boxed{" + "{" * 20000 + "1" + "}" * 20000 + "}",
    "\\boxed{" + "9" * 10000 + "}",
    "\\boxed{1",
    "x" * 100_000 + "\\boxed{",
    "\\boxed{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}",
    "\\boxed{\\frac{" * 500,
    "\\boxed{}",
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_answers_score_zero_within_the_timeout(text):
    task = MathTask(hub_id=None, data_files=str(FIX / "math_train.jsonl"),
                    test_files=str(FIX / "math_test.jsonl"), grading_timeout=1.0)
    # Start the grading worker first: its start-up is not part of an answer's timeout.
    assert task.reward("so \\boxed{\\frac{3}{3}}", {"gold": "1"}).total == 1.0
    t0 = time.perf_counter()
    r = task.reward(text, {"gold": "1"})
    assert r.total == 0.0
    assert time.perf_counter() - t0 < 1.0 + 0.5
    # a timeout leaves nothing behind: the next answer is graded normally
    assert task.reward("so \\boxed{\\frac{2}{2}}", {"gold": "1"}).total == 1.0
    task.grader.close()


def test_math_fixture_loads_with_gold_answers_and_drops_unparseable(caplog):
    task = MathTask(hub_id=None, data_files=str(FIX / "math_train.jsonl"),
                    test_files=str(FIX / "math_test.jsonl"))
    assert task.dropped == 1  # the training row without a boxed answer
    assert len(task.test_examples) == 3
    assert {ex["gold"] for ex in task.test_examples} == {"7", "\\frac{1}{2}", "8"}
    # 12 training rows, one without any boxed answer in its solution
    assert len(task.train_examples) == 11
    assert "\\{-3, 3\\}" in {ex["gold"] for ex in task.train_examples}
    held_out = MathTask(hub_id=None, data_files=str(FIX / "math_train.jsonl"), test_from_train=3)
    assert held_out.dropped == 1 and len(held_out.test_examples) == 3
    assert "dropped 1 of 12" in caplog.text
    only = MathTask(hub_id=None, data_files=str(FIX / "math_train.jsonl"),
                    test_files=str(FIX / "math_test.jsonl"), subjects=["Algebra"], levels=[1])
    # Algebra, level 1: "Solve 2x + 6", "sqrt(16) + 1" and "y = x meets y = 2"
    assert len(only.train_examples) == 3 and len(only.test_examples) == 3
    ex = task.test_examples[0]
    assert task.reward("steps... \\boxed{" + ex["gold"] + "}", ex).total == 1.0
    assert task.reward("no box, just " + ex["gold"], ex).total == 0.0


def test_math_templates_render_the_question():
    for template in ("cot", "lcot", "qst"):
        from tests.conftest import compose_cfg
        from hydra.utils import instantiate

        cfg = compose_cfg(["task=math", f"task.template={template}",
                           f"task.data_files={FIX / 'math_train.jsonl'}",
                           f"task.test_files={FIX / 'math_test.jsonl'}"])
        task = instantiate(cfg.task)
        content = task.messages({"question": "What is {x}?"})[-1]["content"]
        assert content.startswith("What is {x}?") and "\\boxed{}" in content


def test_gsm8k_numeric_answers():
    task = GSM8KTask(hub_id=None, data_files=str(FIX / "gsm8k_train.jsonl"),
                     test_files=str(FIX / "gsm8k_test.jsonl"))
    assert task.dropped == 1 and len(task.train_examples) == 7 and len(task.test_examples) == 4
    golds = {ex["gold"] for ex in task.train_examples}
    assert {"2,400", "2.5", "-2"} <= golds
    ex = {"gold": "2,400"}
    assert task.reward("He earns \\boxed{\\$2,400}.", ex).total == 1.0
    assert task.reward("1200 * 2 = 2400 dollars", ex).total == 1.0
    assert task.reward("#### 2400.00", ex).total == 1.0
    assert task.reward("2400 / 2 = 1200", ex).total == 0.0
    assert task.reward("", ex).total == 0.0
    assert task.reward("\\boxed{" + "9" * 10000 + "}", ex).total == 0.0
    assert gsm8k_final_answer("a 1 b 22 c") == "22"


def test_offline_hub_datasets_name_data_files(offline_hub):
    with pytest.raises(DatasetUnavailableError, match="task.data_files"):
        GSM8KTask()
    with pytest.raises(DatasetUnavailableError, match="task.data_files"):
        MathTask(hub_configs=["algebra"])


def test_a_plain_text_template_renders_without_the_chat_template(tiny):
    """VinePPO's SFT models have no chat template: task.template=vineppo gives the plain
    prompt, with the tokenizer's BOS where it has one, and the official stop string."""
    from nanovppo.rollout import render_prompt

    _, tok = tiny
    task = MathTask(hub_id=None, data_files=str(FIX / "math_train.jsonl"),
                    test_files=str(FIX / "math_test.jsonl"), template="vineppo",
                    templates={"vineppo": {"raw": "[MATH_TASK] Problem:\n{question}\n\nSolution:",
                                           "stop": ["\n\n\nProblem:"]}})
    ex = task.test_examples[0]
    text = "[MATH_TASK] Problem:\n" + ex["question"] + "\n\nSolution:"
    assert render_prompt(task, tok, ex) == tok(text, add_special_tokens=True).input_ids
    assert task.stop == ("\n\n\nProblem:",)
    with pytest.raises(ValueError, match="either user"):
        MathTask(hub_id=None, data_files=str(FIX / "math_train.jsonl"), template="x",
                 templates={"x": {"user": "{question}", "raw": "{question}"}})
