"""The command line, run for real as a subprocess on the tiny model, tracked in MLflow."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def run_cli(tmp_path, *args, check=True, base=TINY, file_size_limit=None):
    """The CLI in a subprocess; ``file_size_limit`` (bytes): no file it writes may grow
    beyond it (RLIMIT_FSIZE: a write past it fails with EFBIG, as one on a full disk does
    with ENOSPC)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    flags = [a for a in args if a.startswith("-")]  # Hydra wants flags before overrides
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "-m", "nanovppo.train", *flags, *base, f"paths.outputs={tmp_path}",
           *overrides]
    limit = None if file_size_limit is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit)))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=limit)
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
    for key in ["train/reward_mean", "train/accuracy", "train/shaping/format_mean",
                "train/shaping/numbers_mean", "train/distinct_completions",
                "train/distinct_answers", "train/frac_reward_zero_std",
                "train/frac_mixed_correct", "eval/accuracy", "train/entropy",
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


def test_a_damaged_latest_checkpoint_is_skipped_on_resume(tmp_path):
    """Steps 1-4 with checkpoints at 2 and 4; step 4's weights are cut to half their size
    (a full disk). The resume names step_000004 as damaged, continues from step_000002
    into the same MLflow run, and ends with a whole step_000004."""
    run_cli(tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every=2")
    c, runs = only_run(tmp_path)
    run_dir = Path(runs[0].data.tags["nanovppo.run_dir"])
    weights = run_dir / "checkpoints" / "step_000004" / "model" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    proc = run_cli(tmp_path, f"resume={run_dir}", "trainer.max_steps=5")
    err = proc.stdout + proc.stderr
    assert "step_000004 is damaged: model/model.safetensors holds" in err, err[-3000:]
    assert "resuming from step_000002" in err, err[-3000:]
    assert "Traceback" not in proc.stderr
    c, runs = only_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in c.get_metric_history(runs[0].info.run_id,
                                                           "train/reward_mean"))
    assert steps == [1, 2, 3, 4, 5]
    assert weights.stat().st_size == size  # step 4 written again, whole


def test_all_checkpoints_damaged_is_a_clear_error(tmp_path):
    run_cli(tmp_path, "trainer.max_steps=1")
    c, runs = only_run(tmp_path)
    run_dir = Path(runs[0].data.tags["nanovppo.run_dir"])
    for state in (run_dir / "checkpoints").glob("step_*/state.pt"):
        state.write_bytes(b"not a pickle")
    proc = run_cli(tmp_path, f"resume={run_dir}", check=False)
    assert proc.returncode == 2
    assert "checkpoints under" in proc.stderr and "are damaged" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_the_run_resumes(tmp_path):
    """Steps 1-2 with checkpoints at 0 and 2, then a resume to step 4 under a file-size
    limit of 8 MB: the tiny model's weights file (~13 MB) cannot be written, as on a full
    disk. The run stops with one line naming the checkpoint and the remedy, exit 2, no
    traceback, no half-written folder, the MLflow run FAILED; resumed without the limit it
    continues from step 2 into the same run and logs steps 3-4 once each."""
    run_cli(tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=2")
    c, runs = only_run(tmp_path)
    run_dir = Path(runs[0].data.tags["nanovppo.run_dir"])
    weights = run_dir / "checkpoints" / "step_000002" / "model" / "model.safetensors"
    assert weights.stat().st_size > 8 * 2 ** 20  # else the limit below would not bite
    proc = run_cli(tmp_path, f"resume={run_dir}", "trainer.max_steps=4",
                   "trainer.checkpoint_every=2", check=False, file_size_limit=8 * 2 ** 20)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: could not write checkpoint step 4" in proc.stderr, proc.stderr[-3000:]
    assert "File too large" in proc.stderr and f"resume={run_dir}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_000000", "step_000002"]
    c, runs = only_run(tmp_path)
    assert runs[0].info.status == "FAILED"
    run_cli(tmp_path, f"resume={run_dir}", "trainer.max_steps=4", "trainer.checkpoint_every=2")
    c, runs = only_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train/reward_mean"))
    assert steps == [1, 2, 3, 4]


def test_bf16_weights_with_checkpointed_layers_train_and_resume(tmp_path, monkeypatch):
    """hardware.param_dtype=bfloat16: weights and AdamW moments in bf16 (updates written
    back with Kahan's compensation, the default hardware.bf16_rounding, whose buffers the
    checkpoint carries), here with activation checkpointing and low_memory; the run
    trains, saves and resumes. (A
    length bonus gives the random model's completions different rewards, so gradients.)"""
    import torch

    monkeypatch.setenv("PYTHONPATH", str(ROOT / "examples"))
    hw = ["hardware.param_dtype=bfloat16", "hardware.gradient_checkpointing=true",
          "hardware.low_memory=true", "algo.lr=1e-3", "task._target_=my_tasks.ConciseCountdown", "+task.length_bonus=0.5"]
    run_cli(tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=2", *hw)
    c, runs = only_run(tmp_path)
    run_dir = Path(runs[0].data.tags["nanovppo.run_dir"])
    state = torch.load(run_dir / "checkpoints" / "step_000002" / "state.pt", weights_only=False)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    assert any(m.abs().max() > 0 for m in moments)
    buffers = [s["compensation"] for s in state["optimizer"]["state"].values()]
    assert len(buffers) == len(moments) and all(b.dtype == torch.bfloat16 for b in buffers)
    assert any(b.abs().max() > 0 for b in buffers)
    run_cli(tmp_path, f"resume={run_dir}", "trainer.max_steps=3", *hw)
    c, runs = only_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = c.get_metric_history(runs[0].info.run_id, "train/grad_norm")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert all(m.value > 0 for m in history)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    proc = run_cli(tmp_path, f"resume={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode != 0
    assert "error: resume=" in proc.stderr and "no checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_model_directory_is_a_clear_error(tmp_path):
    for model in ["model=qwen2.5-0.5b-instruct", "model=smollm2-135m"]:
        proc = run_cli(tmp_path, model, "model.source=dir", f"model.path={tmp_path / 'nope'}",
                       check=False, base=[t for t in TINY if not t.startswith("model")])
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


def test_unreachable_hub_model_is_a_clear_error(tmp_path):
    env_base = [t for t in TINY if not t.startswith("model")]
    proc = run_cli(tmp_path, "model=qwen2.5-0.5b-instruct", "trainer.max_steps=1",
                   check=False, base=env_base)
    assert proc.returncode == 2
    assert "cannot load model 'Qwen/Qwen2.5-0.5B-Instruct'" in proc.stderr
    assert "model.source=dir model.path=" in proc.stderr


# The tiny random model never earns Countdown's reward, so every advantage would be 0 and
# the policy would not move; the length bonus of examples/my_tasks.py gives it a signal.
MOVING = ["task._target_=my_tasks.ConciseCountdown", "+task.length_bonus=1.0"]


def test_epochs_minibatches_and_kl_path_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "examples"))
    run_cli(tmp_path, *MOVING, "trainer.max_steps=1", "algo.ppo_epochs=2", "algo.num_minibatches=2",
            "algo.kl_coef=0.05", "trainer.micro_batch_size=1", "trainer.prompts_per_step=4",
            "trainer.lr_schedule=cosine", "trainer.warmup_steps=1", "algo.lr=1e-3")
    c, runs = only_run(tmp_path)
    m = runs[0].data.metrics
    assert runs[0].info.status == "FINISHED"
    # the second minibatch and epoch see a policy that moved away from the reference
    assert m["train/kl"] > 0
    assert m["train/lr"] == pytest.approx(1e-3)  # warmup step 1 of 1


# A scripted verdict (tests/scripted_tasks.py): about half of the tiny model's samples are
# "correct", so RFT keeps some and DAPO's filter has mixed groups to keep.
SCRIPTED = ["task._target_=tests.scripted_tasks.EvenLengthCountdown"]


@pytest.mark.parametrize("algo", ["vppo", "rft", "dapo"])
def test_other_algorithms_run_two_steps(tmp_path, algo, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    extra = {"rft": SCRIPTED, "vppo": ["algo.mc_rollouts=2"], "dapo": SCRIPTED}[algo]
    run_cli(tmp_path, f"algo={algo}", "trainer.max_steps=2", *extra)
    c, runs = only_run(tmp_path)
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["algo.name"] == algo
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/reward_mean")] == [1, 2]
    key = {"vppo": "train/states_valued", "rft": "train/kept_frac",
           "dapo": "train/kept_groups"}[algo]
    assert key in run.data.metrics
    if algo == "rft":  # correct samples were kept, so the policy was updated
        skipped = c.get_metric_history(run.info.run_id, "train/skipped_update")
        kept = c.get_metric_history(run.info.run_id, "train/kept_frac")
        assert any(m.value == 0.0 for m in skipped) and max(m.value for m in kept) > 0


def test_rft_that_keeps_nothing_skips_the_update(tmp_path):
    # the tiny random model solves nothing, so RFT has nothing to keep
    proc = run_cli(tmp_path, "algo=rft", "trainer.max_steps=1")
    c, runs = only_run(tmp_path)
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["train/skipped_update"] == 1.0
    assert "update skipped" in proc.stdout + proc.stderr


def test_a_task_from_the_users_own_module(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "examples"))
    """The user's task scores the rollouts: its shaping term, 0.5 x (1 - characters / 100)
    (at least 0) for each completion of the logged samples table, averages to the logged
    ``train/shaping/concise_mean``."""
    run_cli(tmp_path, "task._target_=my_tasks.ConciseCountdown", "+task.length_bonus=0.5",
            "trainer.max_steps=1", "trainer.samples_every=1")
    c, runs = only_run(tmp_path)
    m = runs[0].data.metrics
    assert runs[0].data.params["task._target_"] == "my_tasks.ConciseCountdown"
    table = json.loads(Path(c.download_artifacts(runs[0].info.run_id, "samples/step_000001.json",
                                                 str(tmp_path))).read_text())
    completions = [row[table["columns"].index("completion")] for row in table["data"]]
    want = sum(0.5 * max(0.0, 1 - len(t) / 100) for t in completions) / len(completions)
    assert m["train/shaping/concise_mean"] == pytest.approx(want)


FIX = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("task,algo", [("gsm8k", "grpo"), ("math", "vppo"), ("math", "rft")])
def test_math_tasks_train_with_each_algorithm(tmp_path, task, algo):
    extra = ["algo.splitter=math"] if algo == "vppo" else []
    run_cli(tmp_path, f"task={task}", f"algo={algo}", f"task.data_files={FIX / f'{task}_train.jsonl'}",
            f"task.test_files={FIX / f'{task}_test.jsonl'}", "trainer.max_steps=1", *extra,
            base=[t for t in TINY if not t.startswith("task.")])
    c, runs = only_run(tmp_path)
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["task.name"] == task
    assert "eval/accuracy" in runs[0].data.metrics


def test_resume_keeps_the_initial_policy_as_kl_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "examples"))
    common = [*MOVING, "algo.kl_coef=0.1", "algo.lr=1e-3", "trainer.checkpoint_every=1"]
    run_cli(tmp_path, "trainer.max_steps=1", *common)
    c, runs = only_run(tmp_path)
    run_dir = runs[0].data.tags["nanovppo.run_dir"]
    run_cli(tmp_path, f"resume={run_dir}", "trainer.max_steps=2")
    assert runs[0].data.metrics["train/grad_norm"] > 0, "the policy must move in step 1"
    kl = {m.step: m.value for m in c.get_metric_history(runs[0].info.run_id, "train/kl")}
    # step 1's single minibatch starts at the reference: KL 0. Step 2 starts from the
    # checkpoint, which moved away from the initial policy: KL > 0 (it would be 0 if the
    # resumed run took the checkpoint as its reference).
    assert kl[1] == pytest.approx(0.0, abs=1e-6)
    assert kl[2] > 1e-6


def test_sigterm_marks_the_run_killed_and_it_resumes(tmp_path):
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "nanovppo.train", *TINY, f"paths.outputs={tmp_path}",
           "trainer.max_steps=1000", "trainer.checkpoint_every=1"]
    log_file = open(tmp_path / "train.log", "w")  # not a pipe: nobody would drain it
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(tmp_path.glob("runs/*/*/checkpoints/step_*"))) < 2:
        time.sleep(0.2)  # two checkpoints kept: at least two steps done
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log_file.close()
    text = (tmp_path / "train.log").read_text()
    assert proc.returncode == 130 and "stopped: stopped after step" in text, text[-2000:]
    assert "Traceback" not in text
    c, runs = only_run(tmp_path)
    assert runs[0].info.status == "KILLED"
    run_dir = runs[0].data.tags["nanovppo.run_dir"]
    last = max(m.step for m in c.get_metric_history(runs[0].info.run_id, "train/reward_mean"))
    run_cli(tmp_path, f"resume={run_dir}", f"trainer.max_steps={last + 1}")
    c, runs = only_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "train/reward_mean")]
    assert sorted(steps) == list(range(1, last + 2)), "every step once, none lost"


def test_a_signal_during_the_warm_start_stops_it_and_marks_the_run_killed(tmp_path):
    """A SIGTERM during a long warm start ends it after the current step, not after the
    whole stage and the first RL step: the MLflow run is KILLED (not left RUNNING) with
    fewer warm-start steps than asked, no checkpoint, and resume= says why it cannot go on."""
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    steps = 100_000  # hours of warm start: only the signal can end it within the test
    cmd = [sys.executable, "-m", "nanovppo.train", *TINY, f"paths.outputs={tmp_path}",
           f"warm_start.steps={steps}", "warm_start.batch_size=2"]
    log = tmp_path / "train.log"
    with open(log, "w") as log_file:  # not a pipe: nobody would drain it
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and "supervised steps" not in log.read_text():
                time.sleep(0.2)
            time.sleep(1.0)  # some steps done
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            proc.kill()  # only if it outlived the wait
    assert proc.returncode == 130
    assert "stopped: stopped during the warm start" in log.read_text()
    assert "Traceback" not in log.read_text()
    c, runs = only_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    done = c.get_metric_history(runs[0].info.run_id, "warm_start/loss")
    assert 0 < len(done) < steps
    run_dir = runs[0].data.tags["nanovppo.run_dir"]
    assert not list(Path(run_dir).glob("checkpoints/step_*"))
    proc = run_cli(tmp_path, f"resume={run_dir}", check=False)
    assert proc.returncode == 2 and "saved none" in proc.stderr and "Traceback" not in proc.stderr


def test_a_control_run_spends_its_time_on_the_warm_start_and_is_tagged_control(tmp_path):
    """The control of the learning comparison: the warm start alone (trainer.max_steps=0),
    evaluated at its end with pass@k, in its own MLflow run tagged nanovppo.kind=control."""
    run_cli(tmp_path, "warm_start.steps=2", "warm_start.batch_size=2", "trainer.max_steps=0",
            "tracking.kind=control", "trainer.eval_pass_k=2")
    run_cli(tmp_path, "trainer.max_steps=1", "trainer.eval_pass_k=2")
    c, runs = only_run(tmp_path)
    kinds = {r.data.tags["nanovppo.kind"]: r for r in runs}
    assert set(kinds) == {"control", "train"}
    control, rl = kinds["control"], kinds["train"]
    assert control.info.status == "FINISHED" and control.info.run_name.startswith("control-")
    assert [m.step for m in c.get_metric_history(control.info.run_id, "warm_start/loss")] == [-2, -1]
    for key in ("eval/accuracy", "eval/pass_at_2"):  # MLflow spells pass@2 so
        assert [m.step for m in c.get_metric_history(control.info.run_id, key)] == [0]
    assert not [k for k in control.data.metrics if k.startswith("train/")]
    # the RL run reports pass@k at both ends of its RL phase, and nowhere between
    assert [m.step for m in c.get_metric_history(rl.info.run_id, "eval/pass_at_2")] == [0, 1]
    run_dir = Path(control.data.tags["nanovppo.run_dir"])
    assert (run_dir / "checkpoints" / "step_000000" / "model" / "config.json").is_file()
