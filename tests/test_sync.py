"""The weight-sync check (nanovppo/sync.py): runs whose engine does not receive the
trainer's weights stop at the first step; runs whose engine does are never stopped."""

import pytest

from tests.test_cli import ROOT, only_run, run_cli

# The hf engine keeps a bf16 copy of the fp32 policy (so weights are pushed to it); a
# scripted verdict gives the tiny model's groups mixed rewards, so the policy moves.
COPY = ["hardware.compute_dtype=bfloat16", "hardware.param_dtype=float32",
        "task._target_=tests.scripted_tasks.EvenLengthCountdown", "algo.lr=1e-3",
        "trainer.max_steps=3", "trainer.eval_every=0", "algo.group_size=4",
        "trainer.prompts_per_step=4", "trainer.micro_batch_size=16"]


@pytest.fixture(autouse=True)
def importable_tests(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # tests.broken_engines, tests.scripted_tasks


def test_a_push_that_does_nothing_stops_the_run_at_the_first_step(tmp_path):
    proc = run_cli(tmp_path, *COPY, "inference_backend._target_=tests.broken_engines.NoPushHFEngine",
                   check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "step 1: the hf engine does not hold the trainer's weights" in line
    assert "did not change" in line
    c, [run] = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert not c.get_metric_history(run.info.run_id, "train/reward_mean")  # no step counted


def test_a_working_push_is_checked_every_step_and_never_stops(tmp_path):
    run_cli(tmp_path, *COPY)
    c, [run] = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    gaps = c.get_metric_history(run.info.run_id, "sync/gap_mean")
    engine = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "sync/engine_moved")}
    trainer = {m.step: m.value for m in c.get_metric_history(run.info.run_id,
                                                                "sync/trainer_moved")}
    assert [m.step for m in gaps] == [1, 2, 3]
    assert trainer[1] > 0  # 4 groups of 4: some have mixed verdicts
    # the engine's log-probs followed the trainer's whenever it moved
    assert all(engine[k] > 0 for k in trainer if trainer[k] > 0)
    assert all(m.value < 0.5 for m in gaps)


def test_an_engine_that_samples_from_the_policy_is_not_checked(tmp_path):
    # fp32 weights and matmuls: the hf engine samples from the policy's own module
    run_cli(tmp_path, "trainer.max_steps=1", "hardware.compute_dtype=float32")
    c, [run] = only_run(tmp_path)
    assert "sync/gap_mean" not in run.data.metrics
