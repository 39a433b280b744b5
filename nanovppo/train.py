"""Train a policy with reinforcement learning on verifiable rewards.

    python -m nanovppo.train                                    # GRPO, Countdown, SmolLM2, CPU
    python -m nanovppo.train algo.lr=1e-5 seed=1 trainer.max_steps=20
    python -m nanovppo.train -m seed=0,1 algo.lr=1e-5,2e-5       # sweep: one MLflow run a job
    python -m nanovppo.train resume=outputs/runs/DATE/TIME       # continue an interrupted run
    mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db    # look at the runs

``train(cfg)`` builds the run's parts (``nanovppo/parts.py``), evaluates and saves the RL
start, then loops over steps (``nanovppo/step.py``: rollout, reward, experience, update,
weight sync), evaluating and checkpointing on the configured cadence; ``main`` only lets
Hydra compose ``cfg`` and turns signals into a clean stop. Reading order: docs/design.md.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from nanovppo import checkpoint as ckpt
from nanovppo import distributed as dd
from nanovppo import memory
from nanovppo.config import CONF_DIR
from nanovppo.errors import NanovppoError
from nanovppo.evaluate import evaluate
from nanovppo.metrics import bar_postfix, step_line
from nanovppo.parts import Run, build_run
from nanovppo.policy import sync_engine
from nanovppo.progress import bar, logging_redirect_tqdm
from nanovppo.runs import Launch, finish, save_checkpoint
from nanovppo.step import train_step

log = logging.getLogger("nanovppo")


def train(cfg: DictConfig, run_dir: str | Path | None = None, launch: Launch | None = None,
          stop: threading.Event | None = None) -> dict:
    """Run (or resume) one training job described by ``cfg``; return its summary.

    ``launch``: what the command line added (overrides to re-apply when resuming, Hydra's
    output folder, the sweep); ``stop``: when set, the run stops after the current step
    with a checkpoint. Under torchrun every rank calls this; rank 0 logs and checkpoints.
    """
    d = dd.init(str(cfg.hardware.device))
    memory.keep_freed_memory(bool(cfg.trainer.fast))  # nanovppo/memory.py: no page faults
    try:
        stop = stop or threading.Event()
        return loop(build_run(cfg, run_dir, launch or Launch(), d, stop), stop)
    finally:
        dd.shutdown()


def loop(run: Run, stop: threading.Event) -> dict:
    """The RL start (a new run: evaluated and saved as step 0), then the steps, each
    followed by its evaluation and checkpoint when they are due."""
    cfg, d, tracker = run.cfg, run.d, run.tracker
    last_ckpt, status, run_bar = None, "FAILED", None
    try:
        if run.start_step == 0:
            rl_start(run)
        last_ckpt = ckpt.latest_checkpoint(run.run_dir)
        # Steps done, their ETA, the latest reward and accuracy; the step lines go above it.
        run_bar = bar(cfg.trainer.progress and d.main, total=cfg.trainer.max_steps,
                      initial=run.start_step, desc="RL", unit="step")
        with logging_redirect_tqdm(loggers=[log]) if not run_bar.disable else contextlib.nullcontext():
            for step in range(run.start_step + 1, cfg.trainer.max_steps + 1):
                last = step == cfg.trainer.max_steps
                metrics, samples_table = train_step(run, step)
                run.scheduler.step()
                if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 or last:
                    metrics.update(evaluate_policy(run, pass_k=cfg.trainer.eval_pass_k if last else 0))
                stopping = dd.any_rank(stop.is_set(), d)
                every, model_id = cfg.trainer.checkpoint_every, None
                if (every and step % every == 0) or last or stopping:
                    last_ckpt, model_id = checkpoint(run, step)
                if d.main:
                    if tracker.log_metrics(metrics, step, model_id) and cfg.trainer.samples_every \
                            and step % cfg.trainer.samples_every == 0:
                        tracker.log_table(samples_table, f"samples/step_{step:06d}.json")
                    log.info(step_line(step, cfg.trainer.max_steps, metrics))
                    run_bar.set_postfix_str(bar_postfix(metrics), refresh=False)
                    run_bar.update()
                if stopping and not last:
                    raise KeyboardInterrupt(f"stopped after step {step}")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if run_bar is not None:
            run_bar.close()
        run.engine.close()
        summary = finish(tracker, cfg, run.run_dir, last_ckpt, status) if d.main else {
            "status": status, "run_dir": str(run.run_dir), "rank": d.rank}
    return summary


def rl_start(run: Run) -> None:
    """A new run's step 0: the policy RL starts from (after any warm start), evaluated
    (``eval/accuracy_rl_start``, pass@k) and saved as checkpoint step_000000."""
    cfg = run.cfg
    start = evaluate(run.engine, run.task, run.tokenizer, cfg, run.d, cfg.trainer.eval_pass_k)
    start["eval/accuracy_rl_start"] = start.get("eval/accuracy", 0.0)
    start.update(run.start_metrics)
    # With LoRA after a warm start, the RL start is saved whole: its adapters were merged
    # into the base, and the RL adapters that later checkpoints hold apply to it.
    _, model_id = checkpoint(run, 0, whole=bool(cfg.model.lora) and cfg.warm_start.steps > 0)
    if run.d.main:
        run.tracker.log_metrics(start, 0, model_id)
        log.info("RL starts at eval accuracy %.3f (%d test problems)",
                 start["eval/accuracy_rl_start"],
                 len(run.task.test_examples[:cfg.trainer.eval_examples]))


def evaluate_policy(run: Run, pass_k: int) -> dict:
    """The held-out evaluation of a step (``nanovppo.evaluate.evaluate``); with
    ``trainer.ema``, also that of the policy's average (``eval/accuracy_ema``: the engine
    gets the averaged weights for it, then the live ones back)."""
    t0 = time.perf_counter()
    metrics = evaluate(run.engine, run.task, run.tokenizer, run.cfg, run.d, pass_k)
    if run.ema is not None:
        with run.ema.swapped_in():
            sync_engine(run.engine, run.policy)
            ema = evaluate(run.engine, run.task, run.tokenizer, run.cfg, run.d)
        sync_engine(run.engine, run.policy)
        metrics.update({f"{k}_ema": v for k, v in ema.items()})
    metrics["perf/eval_s"] = time.perf_counter() - t0
    return metrics


def checkpoint(run: Run, step: int, whole: bool = False):
    """Save step ``step`` (``nanovppo/runs.py: save_checkpoint``); returns (its folder, the
    MLflow model id)."""
    return save_checkpoint(run.run_dir, step, run.cfg, run.model, run.policy, run.tokenizer,
                           run.optimizer, run.scheduler, run.engine, run.tracker, run.d, whole,
                           run.ema)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # The first SIGTERM (SLURM preemption, `kill`) or Ctrl-C ends the run after the current
    # step and a checkpoint (a signal in the middle of an MLflow write would leave its
    # SQLite store locked and the run marked RUNNING): the MLflow run is marked KILLED and
    # `resume=` continues it. During the warm start it ends after the current warm-start
    # step, with nothing saved. A second signal stops at once.
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt(f"signal {signum}")
        stop.set()
        log.warning("signal %d: stopping after this step (send it again to stop at once)", signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        train(cfg, launch=Launch.from_hydra(), stop=stop)
    except (NanovppoError, InstantiationException) as e:
        # Bad input (config, model path, dataset): say what is wrong, not where it broke.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # the stop asked for above: where it stopped, no traceback
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
