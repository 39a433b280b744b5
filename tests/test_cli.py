"""The command line, run for real as a subprocess on the tiny model, tracked in MLflow."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def run_cli(tmp_path, *args, check=True, base=TINY):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    flags = [a for a in args if a.startswith("-")]  # Hydra wants flags before overrides
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "-m", "nanovppo.train", *flags, *base, f"paths.outputs={tmp_path}",
           *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def client(tmp_path):
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def only_run(tmp_path, experiment="nanovppo"):
    c = client(tmp_path)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    return c, runs


def test_two_steps_log_a_run_with_metrics_and_a_checkpoint(tmp_path):
    proc = run_cli(tmp_path, "trainer.max_steps=2", "seed=1", "algo.lr=3e-5",
                   "trainer.samples_every=1")
    c, runs = only_run(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # params are the resolved config, with the overrides given
    assert run.data.params["algo.lr"] == "3e-05"
    assert run.data.params["seed"] == "1"
    assert run.data.params["model.name"] == "tiny-random"
    for key in ["train/reward_mean", "train/format_mean", "train/answer_mean", "train/entropy",
                "train/grad_norm", "train/lr", "train/clip_frac", "train/response_length",
                "perf/rollout_s", "perf/update_s", "perf/gen_tokens_per_s", "eval/reward_mean"]:
        assert key in run.data.metrics, key
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/reward_mean")] == [1, 2]
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "reward_curve.png", "samples"} <= artifacts
    run_dir = Path(run.data.tags["nanovppo.run_dir"])
    ckpt = run_dir / "checkpoints" / "step_000002"
    assert (ckpt / "model" / "config.json").is_file()
    assert (ckpt / "state.pt").is_file() and (ckpt / "config.yaml").is_file()
    # the closing summary says where things are and how to look at them
    out = proc.stdout + proc.stderr
    assert "mlflow ui --backend-store-uri" in out and str(ckpt) in out


def test_resume_continues_the_same_mlflow_run(tmp_path):
    run_cli(tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=2")
    c, runs = only_run(tmp_path)
    run_dir = Path(runs[0].data.tags["nanovppo.run_dir"])
    run_cli(tmp_path, f"resume={run_dir}", "trainer.max_steps=4")
    c, runs = only_run(tmp_path)
    assert len(runs) == 1, "resume must not open a new MLflow run"
    history = c.get_metric_history(runs[0].info.run_id, "train/reward_mean")
    assert sorted(m.step for m in history) == [1, 2, 3, 4], "no step logged twice or lost"
    assert runs[0].info.status == "FINISHED"
    assert (run_dir / "checkpoints" / "step_000004" / "state.pt").is_file()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    proc = run_cli(tmp_path, f"resume={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode != 0
    assert "error: resume=" in proc.stderr and "no checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_model_directory_is_a_clear_error(tmp_path):
    for model in ["model=qwen2.5-0.5b-instruct", "model=smollm2-135m"]:
        proc = run_cli(tmp_path, model, "model.source=dir", f"model.path={tmp_path / 'nope'}",
                       check=False, base=[t for t in TINY if not t.startswith("model=")])
        assert proc.returncode != 0
        assert f"model directory {tmp_path / 'nope'} does not exist" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_multirun_gives_each_job_its_own_tagged_run(tmp_path):
    run_cli(tmp_path, "-m", "seed=0,1", "trainer.max_steps=1")
    c, runs = only_run(tmp_path)
    assert len(runs) == 2
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    sweep_dirs = {r.data.tags["sweep.dir"] for r in runs}
    assert len(sweep_dirs) == 1
    assert sorted(r.data.tags["sweep.job"] for r in runs) == ["0", "1"]
    assert sorted(o for r in runs for o in r.data.tags["overrides"].split() if o.startswith("seed=")) \
        == ["seed=0", "seed=1"]
