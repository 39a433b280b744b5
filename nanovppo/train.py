"""Train a policy with reinforcement learning on verifiable rewards.

    python -m nanovppo.train                                    # GRPO, Countdown, SmolLM2, CPU
    python -m nanovppo.train algo.lr=1e-5 seed=1 trainer.max_steps=20
    python -m nanovppo.train -m seed=0,1 algo.lr=1e-5,2e-5       # sweep: one MLflow run a job
    python -m nanovppo.train resume=outputs/runs/DATE/TIME       # continue an interrupted run
    mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db    # look at the runs

One step: sample ``trainer.prompts_per_step`` prompts; the engine samples
``algo.group_size`` completions of each; the task scores them; the algorithm turns rewards
into advantages and updates the policy; the engine gets the new weights; the tracker logs.
``train(cfg)`` holds all of it; ``main`` only lets Hydra compose ``cfg``.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from nanovppo import checkpoint as ckpt
from nanovppo.errors import ConfigError, NanovppoError
from nanovppo.engines.base import Sampling
from nanovppo.logprobs import group_logprobs, pad_groups
from nanovppo.rollout import RolloutSource, Sample
from nanovppo.models import load_model, to_dtype
from nanovppo.tracking import Tracker, default_tracking_uri, flatten

log = logging.getLogger("nanovppo")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


# ----------------------------------------------------------------------------------------
# Plumbing: seeds, prompts, data order
# ----------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def examples_for_step(n_examples: int, per_step: int, seed: int, step: int) -> list[int]:
    """Indices of the training examples of ``step`` (1-based): epochs of seeded permutations.

    A pure function of (seed, step), so a resumed run sees the prompts it would have seen.
    """
    out = []
    start = (step - 1) * per_step
    for pos in range(start, start + per_step):
        epoch, offset = divmod(pos, n_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(n_examples)
        out.append(int(perm[offset]))
    return out


def autocast_ctx(cfg):
    dtype = to_dtype(cfg.hardware.compute_dtype)
    if dtype == to_dtype(cfg.hardware.param_dtype):
        return torch.autocast(cfg.hardware.device, enabled=False)
    return torch.autocast(cfg.hardware.device, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Update
# ----------------------------------------------------------------------------------------

def micro_batches(samples: list[Sample], size: int) -> list[list[Sample]]:
    """Pack whole groups into micro-batches of at most ``size`` sequences (at least one
    group each), groups of similar length together so little padding is computed."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    ordered = sorted(groups.values(),
                     key=lambda g: len(g[0].prompt_ids) + max(len(s.completion_ids) for s in g))
    out: list[list[Sample]] = []
    for g in ordered:
        if out and len(out[-1]) + len(g) <= size:
            out[-1].extend(g)
        else:
            out.append(list(g))
    return out


def _logprobs(model, mb: list[Sample], pad_id: int, cfg, with_entropy=False):
    """Log-probs [b, C] of a micro-batch (entropy too if asked), each prompt run once."""
    prompts, completions, seen = [], [], {}
    for s in mb:  # samples of a group are adjacent (see micro_batches)
        if s.group not in seen:
            seen[s.group] = len(prompts)
            prompts.append(s.prompt_ids)
            completions.append([])
        completions[seen[s.group]].append(s.completion_ids)
    batch = pad_groups(prompts, completions, pad_id)
    with autocast_ctx(cfg):
        out = group_logprobs(model, batch, cfg.rollout.temperature,
                             cfg.trainer.logprob_chunk_rows, with_entropy)
    return out, batch


@torch.no_grad()
def precompute_logprobs(model, batches, pad_id, cfg) -> list[torch.Tensor]:
    return [_logprobs(model, mb, pad_id, cfg)[0] for mb in batches]


def split_groups(samples: list[Sample], parts: int, rng: random.Random) -> list[list[Sample]]:
    """Shuffle the groups and deal them into ``parts`` minibatches (a group is never split)."""
    ids = sorted({s.group for s in samples})
    rng.shuffle(ids)
    per = math.ceil(len(ids) / parts)
    chunks = [set(ids[i:i + per]) for i in range(0, len(ids), per)]
    return [[s for s in samples if s.group in chunk] for chunk in chunks]


def update(policy, ref, algo, samples: list[Sample], cfg, optimizer, pad_id: int, step: int) -> dict:
    """One training step's optimisation over the scored samples; returns its metrics."""
    norm_len = cfg.rollout.max_new_tokens
    rng = random.Random(cfg.seed * 1_000_003 + step)
    totals = {"loss": 0.0, "clip_tokens": 0.0, "kl_tokens": 0.0, "entropy_tokens": 0.0,
              "tokens": 0.0, "grad_norm": [], "entropy_count": 0.0}
    # With one pass and one minibatch the policy has not moved since sampling, so the
    # "old" log-probs are the current ones (detached): no extra forward is needed.
    reuse_current = algo.ppo_epochs == 1 and algo.num_minibatches == 1
    plan = [[micro_batches(mb, cfg.trainer.micro_batch_size)
             for mb in split_groups(samples, algo.num_minibatches, rng)]
            for _ in range(algo.ppo_epochs)]
    bar = tqdm(total=sum(len(b) for epoch in plan for b in epoch), desc="update", unit="mb",
               leave=False, disable=not cfg.trainer.progress)
    policy.train()
    for epoch, minibatches in enumerate(plan):
        for batches in minibatches:
            old = None if reuse_current else precompute_logprobs(policy, batches, pad_id, cfg)
            refs = precompute_logprobs(ref, batches, pad_id, cfg) if ref is not None else None
            masks = [_train_mask(mb, algo) for mb in batches]
            n_tokens = max(1.0, sum(m.sum().item() for m in masks))
            n_seqs = max(1.0, float(sum((m.sum(-1) > 0).sum().item() for m in masks)))
            optimizer.zero_grad(set_to_none=True)
            for i, mb in enumerate(batches):
                (logp, ent), batch = _logprobs(policy, mb, pad_id, cfg, with_entropy=True)
                mask = masks[i]
                adv = _advantages(mb, mask.shape[1])                              # [b, C]
                old_logp = logp.detach() if old is None else old[i]
                loss, stats = algo.loss(logp, old_logp, None if refs is None else refs[i],
                                        adv, mask, n_tokens, n_seqs, norm_len)
                loss.backward()
                totals["loss"] += loss.item()
                totals["clip_tokens"] += stats["clip_tokens"]
                totals["kl_tokens"] += stats.get("kl_tokens", 0.0)
                totals["tokens"] += mask.sum().item()
                if epoch == 0:
                    totals["entropy_tokens"] += (ent * batch.completion_mask).sum().item()
                    totals["entropy_count"] += batch.completion_mask.sum().item()
                bar.update()
            clip = cfg.trainer.max_grad_norm
            norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                  clip if clip else float("inf"))
            totals["grad_norm"].append(norm.item())
            optimizer.step()
    bar.close()
    optimizer.zero_grad(set_to_none=True)
    tokens = max(totals["tokens"], 1.0)
    updates = max(1, algo.ppo_epochs * algo.num_minibatches)
    return {"train/loss": totals["loss"] / updates,
            "train/clip_frac": totals["clip_tokens"] / tokens,
            "train/kl": totals["kl_tokens"] / tokens,
            "train/entropy": totals["entropy_tokens"] / max(totals["entropy_count"], 1.0),
            "train/grad_norm": float(np.mean(totals["grad_norm"]))}


def _advantages(mb: list[Sample], width: int) -> torch.Tensor:
    """[b, C] advantages: a sample's number on all its tokens, or its per-token list."""
    adv = torch.zeros(len(mb), width)
    for r, s in enumerate(mb):
        if isinstance(s.advantage, (int, float)):
            adv[r, :len(s.completion_ids)] = float(s.advantage)
        else:
            adv[r, :len(s.advantage)] = torch.tensor(s.advantage, dtype=torch.float32)
    return adv


def _train_mask(mb: list[Sample], algo) -> torch.Tensor:
    """[b, C] mask of tokens that carry loss (truncated completions dropped if asked)."""
    width = max(1, max(len(s.completion_ids) for s in mb))
    mask = torch.zeros(len(mb), width)
    for r, s in enumerate(mb):
        if not (algo.mask_truncated and s.truncated):
            mask[r, :len(s.completion_ids)] = 1.0
    return mask


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

def evaluate(engine, task, tokenizer, cfg) -> dict:
    """Greedy decoding on held-out test prompts."""
    examples = task.test_examples[: cfg.trainer.eval_examples]
    if not examples:
        return {}
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                      stop=task.stop)
    ro = RolloutSource(task, tokenizer, engine, greedy).collect(examples)
    out = {"eval/reward_mean": ro.rewards.mean().item()}
    out.update({f"eval/{k}_mean": v for k, v in ro.part_means().items()})
    out["eval/accuracy"] = ro.part_means().get("answer", 0.0)
    return out


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------

def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run (or resume) one training job described by ``cfg``; return its summary."""
    cfg, run_dir, state, policy_cfg = _prepare_run(cfg, run_dir)
    if cfg.hardware.threads:
        torch.set_num_threads(int(cfg.hardware.threads))
    seed_everything(cfg.seed)

    task = instantiate(cfg.task)
    policy, tokenizer = load_model(policy_cfg, dtype=cfg.hardware.param_dtype)
    policy.to(cfg.hardware.device)
    algo = instantiate(cfg.algo)
    ref = None
    if algo.kl_coef > 0:  # the frozen *initial* policy, also when resuming
        ref, _ = load_model(cfg.model, dtype=cfg.hardware.param_dtype)
        ref.to(cfg.hardware.device).eval().requires_grad_(False)
    engine = instantiate(cfg.inference_backend, model=policy, tokenizer=tokenizer,
                         seed=cfg.seed, _convert_="partial")
    engine.progress = cfg.trainer.progress
    optimizer = torch.optim.AdamW(policy.parameters(), lr=algo.lr,
                                  betas=tuple(cfg.trainer.adam_betas),
                                  weight_decay=cfg.trainer.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    start_step = 0
    if state is not None:
        start_step = state["step"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        engine.load_state_dict(state["engine"])
        log.info("resuming %s from step %d", run_dir, start_step)

    tracker = _make_tracker(cfg, run_dir, state)
    pad_id = tokenizer.pad_token_id
    sampling = Sampling(n=algo.group_size, temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                        stop=task.stop)
    source = RolloutSource(task, tokenizer, engine, sampling)
    last_ckpt = ckpt.latest_checkpoint(run_dir)
    status = "FAILED"
    try:
        for step in range(start_step + 1, cfg.trainer.max_steps + 1):
            metrics, samples_table = train_step(step, cfg, source, policy, ref, algo,
                                                optimizer, pad_id)
            scheduler.step()
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 \
                    or step == cfg.trainer.max_steps:
                t0 = time.perf_counter()
                metrics.update(evaluate(engine, task, tokenizer, cfg))
                metrics["perf/eval_s"] = time.perf_counter() - t0
            if tracker.log_metrics(metrics, step) and cfg.trainer.samples_every \
                    and step % cfg.trainer.samples_every == 0:
                tracker.log_table(samples_table, f"samples/step_{step:06d}.json")
            log.info(_step_line(step, cfg.trainer.max_steps, metrics))
            every = cfg.trainer.checkpoint_every
            if (every and step % every == 0) or step == cfg.trainer.max_steps:
                last_ckpt = ckpt.save_checkpoint(
                    run_dir, step, cfg, policy, tokenizer, optimizer, scheduler,
                    {"mlflow_run_id": tracker.run_id, "engine": engine.state_dict()},
                    keep=cfg.trainer.keep_checkpoints)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        summary = _finish(tracker, cfg, run_dir, last_ckpt, status)
        engine.close()
    return summary


def train_step(step, cfg, source: RolloutSource, policy, ref, algo, optimizer, pad_id):
    """Rollout, reward, experience and update for one step; returns (metrics, samples table)."""
    task, engine = source.task, source.engine
    t_start = time.perf_counter()
    n_train = len(task.train_examples)
    idx = examples_for_step(n_train, cfg.trainer.prompts_per_step, cfg.seed, step)
    extra = iter(range(1, 1_000_000))
    source.extra_examples = lambda k: [task.train_examples[i] for i in examples_for_step(
        n_train, k, cfg.seed + 7919 * next(extra), step)]

    t0 = time.perf_counter()
    ro = source.collect([task.train_examples[i] for i in idx])
    rollout_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples, metrics = algo.make_samples(ro, source)
    experience_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if samples:
        metrics.update(update(policy, ref, algo, samples, cfg, optimizer, pad_id, step))
        engine.update_weights(policy.named_parameters())
        metrics["train/skipped_update"] = 0.0
    else:
        log.warning("step %d: no samples to train on (e.g. RFT kept nothing); update skipped", step)
        metrics["train/skipped_update"] = 1.0
    update_s = time.perf_counter() - t0

    lengths = [len(c.token_ids) for g in ro.groups for c in g]
    truncated = [c.finish_reason == "length" for g in ro.groups for c in g]
    parts = ro.part_means()
    metrics.update({
        "train/reward_mean": ro.rewards.mean().item(),
        "train/reward_std": ro.rewards.std(unbiased=False).item(),
        "train/accuracy": parts.get("answer", 0.0),
        "train/response_length": float(np.mean(lengths)),
        "train/truncated_frac": float(np.mean(truncated)),
        "train/lr": optimizer.param_groups[0]["lr"],
        "perf/rollout_s": rollout_s, "perf/experience_s": experience_s, "perf/update_s": update_s,
        "perf/step_s": time.perf_counter() - t_start,
        "perf/gen_tokens_per_s": sum(lengths) / max(rollout_s, 1e-9),
    })
    metrics.update({f"train/{k}_mean": v for k, v in parts.items()})
    metrics.update({f"train/{k}_std": v for k, v in ro.part_stds().items()})
    table = {"prompt": [], "completion": [], "reward": [], "finish_reason": []}
    for g, group in enumerate(ro.groups):
        for j, c in enumerate(group):
            table["prompt"].append(task.messages(ro.examples[g])[-1]["content"])
            table["completion"].append(task.prefill + c.text)
            table["reward"].append(ro.rewards[g, j].item())
            table["finish_reason"].append(c.finish_reason)
    return metrics, table


def _lr_lambda(cfg):
    warmup, total, kind = cfg.trainer.warmup_steps, cfg.trainer.max_steps, cfg.trainer.lr_schedule
    if kind not in ("constant", "cosine"):
        raise ConfigError(f"trainer.lr_schedule={kind!r}; use constant or cosine")

    def factor(done: int) -> float:  # ``done`` optimizer steps taken so far
        if warmup and done < warmup:
            return (done + 1) / warmup
        if kind == "cosine":
            progress = min(1.0, (done - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _step_line(step: int, total: int, m: dict) -> str:
    line = (f"step {step}/{total} | reward {m['train/reward_mean']:.3f} "
            f"(answer {m.get('train/answer_mean', 0):.2f}, format {m.get('train/format_mean', 0):.2f})"
            f" | len {m['train/response_length']:.0f} | rollout {m['perf/rollout_s']:.1f}s "
            + (f"values {m['perf/experience_s']:.1f}s " if m["perf/experience_s"] > 0.5 else "")
            + f"update {m['perf/update_s']:.1f}s | {m['perf/gen_tokens_per_s']:.0f} tok/s")
    if "eval/reward_mean" in m:
        line += f" | eval reward {m['eval/reward_mean']:.3f} acc {m['eval/accuracy']:.2f}"
    return line


# ----------------------------------------------------------------------------------------
# Run folder, resume, tracking, summary
# ----------------------------------------------------------------------------------------

def _prepare_run(cfg: DictConfig, run_dir):
    """The config, run folder, checkpoint state (None for a new run) of this job, and the
    model config the policy loads from (the latest checkpoint when resuming)."""
    state = None
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume))
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None:
            raise ConfigError(f"resume={run_dir}: no checkpoint under {run_dir}/checkpoints")
        saved = OmegaConf.load(latest / "config.yaml")
        overrides = _command_line_overrides(saved)
        cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))
        cfg.resume = str(run_dir)
        state = ckpt.load_state(latest)
        policy_cfg = OmegaConf.create({"name": cfg.model.name, "source": "dir",
                                       "path": str(latest / "model")})
    elif run_dir is None:
        run_dir = _hydra_output_dir() or Path(cfg.paths.outputs) / "runs" / time.strftime(
            "%Y-%m-%d/%H-%M-%S")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir, state, (policy_cfg if state is not None else cfg.model)


def _hydra_output_dir() -> Path | None:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return None


def _command_line_overrides(saved: DictConfig) -> list[str]:
    """This invocation's ``key=value`` overrides to apply over a resumed run's config.

    A config group (``model=...``) may be named again only with the choice the run used.
    """
    if not HydraConfig.initialized():
        return []
    out = []
    for o in HydraConfig.get().overrides.task:
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


def _make_tracker(cfg, run_dir: Path, state) -> Tracker:
    uri = cfg.tracking.uri or default_tracking_uri(cfg.paths.outputs)
    if state is not None:
        return Tracker(uri, cfg.tracking.experiment, run_id=state["mlflow_run_id"])
    name = cfg.tracking.run_name or f"{cfg.algo.name}-{cfg.task.name}-{cfg.model.name}-seed{cfg.seed}"
    tags = {"nanovppo.run_dir": str(run_dir.resolve())}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        tags["overrides"] = " ".join(hc.overrides.task) or "(none)"
        if hc.mode == RunMode.MULTIRUN:
            tags.update({"sweep.dir": str(Path(hc.sweep.dir).resolve()),
                         "sweep.job": str(hc.job.num)})
    tracker = Tracker(uri, cfg.tracking.experiment, run_name=name, tags=tags,
                      artifact_dir=Path(cfg.paths.outputs) / "mlartifacts")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tracker.log_params(flatten(resolved))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    return tracker


def _finish(tracker: Tracker, cfg, run_dir: Path, last_ckpt, status: str) -> dict:
    history = tracker.history("train/reward_mean")
    rewards = [v for _, v in sorted(history)]
    first5 = float(np.mean(rewards[:5])) if rewards else float("nan")
    last5 = float(np.mean(rewards[-5:])) if rewards else float("nan")
    if rewards:
        png = _plot_rewards(tracker, run_dir)
        tracker.log_artifact(png)
    tracker.finish(status)
    summary = {"steps": len(rewards), "reward_first5": first5, "reward_last5": last5,
               "run_dir": str(run_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
               "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri, "status": status}
    log.info("\n".join([
        f"done ({status}): {summary['steps']} steps; train reward first-5 {first5:.3f} -> "
        f"last-5 {last5:.3f}",
        f"  run folder:  {run_dir}",
        f"  checkpoint:  {summary['checkpoint']}",
        f"  MLflow run:  {tracker.run_id} (experiment {cfg.tracking.experiment!r})",
        f"  look at it:  mlflow ui --backend-store-uri {tracker.uri}"]))
    return summary


def _plot_rewards(tracker: Tracker, run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in [("train/reward_mean", "train reward"), ("eval/reward_mean", "eval reward"),
                       ("train/accuracy", "train accuracy")]:
        points = sorted(tracker.history(key))
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 3 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "reward_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # A scheduler's SIGTERM (SLURM preemption, `kill`) ends the run like Ctrl-C: the MLflow
    # run is marked KILLED and `resume=` continues it from the last checkpoint.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        train(cfg)
    except (NanovppoError, InstantiationException) as e:
        # Bad input (config, model path, dataset): say what is wrong, not where it broke.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
