"""The evaluation command: estimators by hand, and real runs of the CLI."""

import itertools
import os
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nanovppo.evaluate import ks_up_to, majority_correct, pass_at_k
from tests.test_cli import TINY, run_cli

FIX = Path(__file__).parent / "fixtures"


def test_pass_at_k_matches_counting_subsets():
    for n, c in [(4, 0), (4, 1), (4, 3), (8, 2), (5, 5)]:
        for k in range(1, n + 1):
            # the chance that a random k-subset of the n samples holds a correct one
            hits = sum(any(i < c for i in s) for s in itertools.combinations(range(n), k))
            assert pass_at_k(n, c, k) == pytest.approx(hits / comb(n, k))


def test_majority_vote_by_hand():
    answers = ["3", "4", "4", None, "3", "3"]
    correct = [True, False, False, False, True, True]
    assert majority_correct(answers, correct, 1) is True     # "3"
    assert majority_correct(answers, correct, 3) is False    # "4" twice
    assert majority_correct(answers, correct, 4) is False
    assert majority_correct(answers, correct, 6) is True     # "3" three times
    assert majority_correct([None, None], [False, False], 2) is False
    assert majority_correct(["1", "2"], [False, True], 2) is False  # tie: first seen
    assert ks_up_to(16) == [1, 2, 4, 8, 16] and ks_up_to(6) == [1, 2, 4]


def run_eval(tmp_path, *args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "nanovppo.evaluate", "experiment=bare", "model=tiny-random",
           "trainer.progress=false", f"paths.outputs={tmp_path}", "rollout.max_new_tokens=8",
           *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_evaluate_gsm8k_fixture_with_samples(tmp_path):
    proc = run_eval(tmp_path, "task=gsm8k", f"task.data_files={FIX / 'gsm8k_train.jsonl'}",
                    f"task.test_files={FIX / 'gsm8k_test.jsonl'}", "eval.n=4",
                    "eval.temperature=1.0")
    for key in ["pass@1", "pass@2", "pass@4", "maj@4", "reward_mean", "response_length"]:
        assert key in proc.stdout
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("nanovppo").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["nanovppo.kind"] == "eval"
    m = runs[0].data.metrics
    assert m["eval/examples"] == 4 and 0.0 <= m["eval/pass_at_1"] <= m["eval/pass_at_4"] <= 1.0


def test_evaluate_a_trained_run_by_checkpoint_and_by_run_id(tmp_path):
    run_cli(tmp_path, "trainer.max_steps=1")
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("nanovppo").experiment_id
    train_run = c.search_runs([exp])[0]
    run_dir = train_run.data.tags["nanovppo.run_dir"]
    base = ["task.n_train=50", "task.n_test=4"]
    proc = run_eval(tmp_path, *base, f"eval.checkpoint={run_dir}")
    assert "tiny-random@step_000001" in proc.stdout and "greedy_accuracy" in proc.stdout
    proc = run_eval(tmp_path, *base, f"eval.run_id={train_run.info.run_id}")
    evals = c.search_runs([exp], "tags.`nanovppo.kind` = 'eval'")
    assert len(evals) == 2
    assert {r.data.tags.get("nanovppo.evaluated_run") for r in evals} == {None, train_run.info.run_id}
    bad = run_eval(tmp_path, *base, "eval.run_id=0123456789abcdef", check=False)
    assert bad.returncode == 2 and "no such MLflow run" in bad.stderr
    bad = run_eval(tmp_path, *base, "eval.n=4", check=False)
    assert bad.returncode == 2 and "temperature" in bad.stderr



def test_evaluating_a_runs_last_checkpoint_reproduces_its_last_accuracy(tmp_path, monkeypatch):
    """The same test problems and greedy decoding as the run's last evaluation: the same
    accuracy and mean reward. The scripted task (a response is correct when its length plus
    the target is even) gives the tiny model an accuracy that is neither 0 nor 1 to match,
    and one that other problems or another decoding would change."""
    from tests.test_cli import ROOT

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    task = ["task._target_=tests.scripted_tasks.TargetParityCountdown", "task.n_train=50",
            "task.n_test=16"]
    run_cli(tmp_path, "trainer.max_steps=2", "algo.lr=1e-3", "trainer.eval_examples=16",
            "rollout.max_new_tokens=8", *task)
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [train_run] = c.search_runs([c.get_experiment_by_name("nanovppo").experiment_id])
    last = {k: c.get_metric_history(train_run.info.run_id, k)[-1] for k in
            ("eval/accuracy", "eval/reward_mean")}
    assert last["eval/accuracy"].step == 2 and 0 < last["eval/accuracy"].value < 1
    proc = run_eval(tmp_path, *task, "eval.examples=16",
                    f"eval.checkpoint={train_run.data.tags['nanovppo.run_dir']}")
    assert "tiny-random@step_000002" in proc.stdout
    got = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
           if line.split() and line.split()[0] in ("greedy_accuracy", "reward_mean")}
    assert got["greedy_accuracy"] == pytest.approx(last["eval/accuracy"].value, abs=1e-6)
    assert got["reward_mean"] == pytest.approx(last["eval/reward_mean"].value, abs=1e-4)
