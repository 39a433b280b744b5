"""One RL step: prompts -> rollouts (the engine samples, the task scores) -> experience (the
algorithm's advantages) -> update (``nanovppo/update.py``) -> weight sync (the engine gets
the new weights, and ``nanovppo/sync.py`` checks that they arrived)."""

from __future__ import annotations

import logging
import time

from nanovppo import distributed as dd
from nanovppo import fast
from nanovppo.batching import examples_for_step
from nanovppo.metrics import rollout_metrics, samples_table
from nanovppo.policy import sync_engine
from nanovppo.update import update

log = logging.getLogger("nanovppo")


def train_step(run, step: int) -> tuple[dict, dict]:
    """Step ``step`` of ``run`` (a ``nanovppo.parts.Run``) on this rank's share of the
    prompts; returns (the metrics of the whole job, this rank's samples table)."""
    cfg, d, task, engine = run.cfg, run.d, run.task, run.engine
    t_start = time.perf_counter()
    idx = examples_for_step(len(task.train_examples), cfg.trainer.prompts_per_step, cfg.seed,
                            step)[d.rank::d.world]
    run.source.begin(step)

    t0 = time.perf_counter()
    with fast.phase(cfg):  # rollout and reward: the engine samples, the task scores
        ro = run.source.collect([task.train_examples[i] for i in idx])
    rollout_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    with fast.phase(cfg):  # experience: advantages (VinePPO: Monte-Carlo values)
        samples, metrics = run.algo.make_samples(ro, run.source)
    experience_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    job_wide = {}  # update's metrics, reduced over ranks already
    trains = dd.any_rank(len(samples) > 0, d)
    if trains:
        engine.sleep()
        job_wide = update(run.model, run.ref, run.algo, samples, cfg, run.optimizer,
                          run.tokenizer.pad_token_id, step, d, run.correction)
        engine.wake_up()
        metrics.update(push_weights(run, step))
    elif d.main:
        log.warning("step %d: no samples to train on (e.g. RFT kept nothing); update skipped",
                    step)
    metrics["train/skipped_update"] = float(not trains)
    update_s = time.perf_counter() - t0

    metrics.update(rollout_metrics(ro, task, rollout_s))
    step_s = time.perf_counter() - t_start
    metrics.update({
        "train/lr": run.optimizer.param_groups[0]["lr"],
        "perf/rollout_s": rollout_s, "perf/experience_s": experience_s, "perf/update_s": update_s,
        "perf/step_s": step_s,
        # the share of the step spent building experience (VinePPO: value estimation)
        "perf/experience_frac": experience_s / max(step_s, 1e-9),
    })
    metrics = dd.reduce_metrics(metrics, d)
    metrics.update(job_wide)
    return metrics, samples_table(ro, task)


def push_weights(run, step: int) -> dict:
    """Weight sync: the engine gets the policy's new weights; then, if on, the sync check
    (did they arrive?)."""
    t0 = time.perf_counter()
    sync_engine(run.engine, run.policy)
    metrics = {"perf/weight_sync_s": time.perf_counter() - t0}
    if run.sync is not None:
        t0 = time.perf_counter()
        metrics.update(run.sync.after_push(run.engine, step))
        metrics["perf/sync_check_s"] = time.perf_counter() - t0
    return metrics
