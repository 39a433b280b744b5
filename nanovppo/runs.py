"""A run's folder, its resume, its MLflow run, its checkpoints and its summary.

Nothing here reads Hydra: ``Launch`` carries what the command line adds to a config (the
output folder Hydra chose, the overrides typed, the sweep a job is part of), and
``Launch.from_hydra()`` fills it in ``nanovppo.train.main``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from nanovppo import checkpoint as ckpt
from nanovppo import distributed as dd
from nanovppo import lora as lora_mod
from nanovppo.errors import ConfigError
from nanovppo.tracking import Tracker, default_tracking_uri, flatten

log = logging.getLogger("nanovppo")


@dataclass
class Launch:
    """What the command line adds to a run's config.

    ``overrides`` (``key=value`` as typed) are re-applied over a resumed run's saved config
    and recorded as the MLflow tag ``overrides``; ``output_dir`` is the run folder of a new
    run (else ``<paths.outputs>/runs/DATE/TIME``); ``sweep_dir`` and ``sweep_job`` tag a
    multirun's jobs."""

    output_dir: Path | None = None
    overrides: list[str] = field(default_factory=list)
    sweep_dir: Path | None = None
    sweep_job: int | None = None

    @classmethod
    def from_hydra(cls) -> "Launch":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return cls()
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        return cls(Path(hc.runtime.output_dir), list(hc.overrides.task),
                   Path(hc.sweep.dir).resolve() if multirun else None,
                   int(hc.job.num) if multirun else None)


def prepare_run(cfg: DictConfig, run_dir, launch: Launch, d: dd.Dist = dd.Dist()):
    """The config, run folder, checkpoint state (None for a new run) of this job, and the
    model config the policy loads from (the latest checkpoint when resuming)."""
    state = None
    policy_cfg = cfg.model
    if cfg.resume:
        run_dir = Path(str(cfg.resume))
        latest, state = ckpt.latest_intact(run_dir)
        if latest is None:
            found = ckpt.list_checkpoints(run_dir)
            raise ConfigError(f"resume={run_dir}: " + (
                f"all {len(found)} checkpoints under {run_dir}/checkpoints are damaged "
                "(see the warnings above)" if found else
                f"no checkpoint under {run_dir}/checkpoints (a run stopped before its RL "
                "start, e.g. during the warm start, saved none: start it again)"))
        if latest != ckpt.latest_checkpoint(run_dir) and d.main:
            log.warning("resuming from %s, the newest whole checkpoint", latest.name)
        saved = OmegaConf.load(latest / "config.yaml")
        cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(resume_overrides(saved, launch.overrides)))
        cfg.resume = str(run_dir)
        policy_cfg = OmegaConf.create({"name": cfg.model.name, "source": "dir",
                                       "path": str(latest / "model")})
    elif run_dir is None:
        run_dir = launch.output_dir or Path(cfg.paths.outputs) / "runs" / time.strftime(
            "%Y-%m-%d/%H-%M-%S")
    # Ranks started a moment apart may name different folders: rank 0's is the run's.
    run_dir = Path(dd.broadcast_object(str(run_dir), d))
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir, state, policy_cfg


def resume_overrides(saved: DictConfig, overrides: list[str]) -> list[str]:
    """The ``key=value`` overrides to apply over a resumed run's saved config.

    A config group (``model=...``) may be named again only with the choice the run used.
    """
    out = []
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "resume":
            continue
        if "." not in key and OmegaConf.is_dict(saved.get(key)):
            if saved[key].get("name") != value:
                raise ConfigError(f"cannot change {key} from {saved[key].get('name')!r} to "
                                  f"{value!r} when resuming; start a new run instead")
            continue
        out.append(o.lstrip("+"))
    return out


def make_tracker(cfg, run_dir: Path, state, task, launch: Launch) -> Tracker:
    """The run's MLflow run: a new one with its params, config, datasets and tags, or the
    resumed run's."""
    uri = cfg.tracking.uri or default_tracking_uri(cfg.paths.outputs)
    if state is not None:
        tracker = Tracker(uri, cfg.tracking.experiment, run_id=state["mlflow_run_id"])
        tracker.start_system_metrics(cfg.tracking.system_metrics_interval, resume=True)
        return tracker
    what = cfg.algo.name if cfg.tracking.kind == "train" else cfg.tracking.kind
    name = cfg.tracking.run_name or f"{what}-{cfg.task.name}-{cfg.model.name}-seed{cfg.seed}"
    tags = {"nanovppo.run_dir": str(run_dir.resolve()), "nanovppo.kind": cfg.tracking.kind,
            "overrides": " ".join(launch.overrides) or "(none)"}
    if launch.sweep_dir is not None:
        tags.update({"sweep.dir": str(launch.sweep_dir), "sweep.job": str(launch.sweep_job)})
    tracker = Tracker(uri, cfg.tracking.experiment, run_name=name, tags=tags,
                      artifact_dir=Path(cfg.paths.outputs) / "mlartifacts")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tracker.log_params(flatten(resolved))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    tracker.log_datasets(task.datasets())
    tracker.start_system_metrics(cfg.tracking.system_metrics_interval)
    return tracker


def save_checkpoint(run_dir, step, cfg, model, policy, tokenizer, optimizer, scheduler,
                    engine, tracker, d: dd.Dist, whole: bool = False, ema=None):
    """Every rank contributes (whole FSDP2 tensors are gathered); rank 0 writes it and
    registers it in MLflow as a logged model. Returns (its folder, the model id) on rank 0.
    ``whole``: a LoRA policy is saved with its adapters merged in, as a plain model.
    ``ema``: the policy's EMA, saved whole from rank 0, or each rank's shard under FSDP2."""
    model_state, optim_state = dd.full_state_dicts(model, optimizer, d)
    if whole:
        policy, model_state = lora_mod.merged_model(policy), None
    mine = {"rng": ckpt.rng_state(), "engine": engine.state_dict()}
    extra = {}
    if ema is not None and ema.sharded:
        mine["ema"] = ema.state_dict()
    elif ema is not None:
        extra["ema"] = ema.state_dict()
    ranks = dd.gather_objects(mine, d)
    path = model_id = failed = None
    if d.main:
        if model_state is not None:  # keys of the log-prob module around the policy: drop "model."
            model_state = {k.removeprefix("model."): v for k, v in model_state.items()}
        try:
            path = ckpt.save_checkpoint(
                run_dir, step, cfg, policy, tokenizer, optim_state, scheduler,
                {"mlflow_run_id": tracker.run_id, "ranks": ranks, "world_size": d.world, **extra},
                keep=cfg.trainer.keep_checkpoints, model_state=model_state)
        except ckpt.CheckpointWriteError as e:  # a full disk: every rank stops, none waits
            failed = e
        if cfg.tracking.log_models and not failed:
            model_id = tracker.log_checkpoint(step, path, {"algo": cfg.algo.name,
                                                           "model": cfg.model.name})
    if dd.any_rank(failed is not None, d):
        raise failed or ckpt.CheckpointWriteError(
            f"rank 0 could not write checkpoint step {step} (its error says why)")
    dd.barrier(d)
    return path, model_id


def finish(tracker: Tracker, cfg, run_dir: Path, last_ckpt, status: str) -> dict:
    """End the MLflow run (with the reward curve as an artifact); the run's summary."""
    history = tracker.history("train/reward_mean")
    rewards = [v for _, v in sorted(history)]
    first5 = float(np.mean(rewards[:5])) if rewards else float("nan")
    last5 = float(np.mean(rewards[-5:])) if rewards else float("nan")
    accuracy = sorted(tracker.history("eval/accuracy"))  # (step, value), step 0: the RL start
    if rewards:
        tracker.log_artifact(plot_rewards(tracker, run_dir))
    tracker.finish(status)
    summary = {"steps": len(rewards), "reward_first5": first5, "reward_last5": last5,
               "eval_accuracy_rl_start": accuracy[0][1] if accuracy else None,
               "eval_accuracy_last": accuracy[-1][1] if accuracy else None,
               "run_dir": str(run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
               "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri, "status": status}
    acc_line = (f"; eval accuracy {accuracy[0][1]:.3f} at the RL start -> {accuracy[-1][1]:.3f}"
                f" at step {accuracy[-1][0]}" if accuracy else "")
    log.info("\n".join([
        f"done ({status}): {summary['steps']} steps; train reward first-5 {first5:.3f} -> "
        f"last-5 {last5:.3f}{acc_line}",
        f"  run folder:  {run_dir}",
        f"  checkpoint:  {summary['checkpoint']}",
        f"  MLflow run:  {tracker.run_id} (experiment {cfg.tracking.experiment!r})",
        f"  look at it:  mlflow ui --backend-store-uri {tracker.uri}"]))
    return summary


def plot_rewards(tracker: Tracker, run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in [("train/reward_mean", "train reward"), ("eval/reward_mean", "eval reward"),
                       ("train/accuracy", "train accuracy"), ("eval/accuracy", "eval accuracy")]:
        points = sorted(tracker.history(key))
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 3 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "reward_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
