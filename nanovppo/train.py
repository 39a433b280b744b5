"""Train a policy with reinforcement learning on verifiable rewards.

    python -m nanovppo.train                                    # GRPO, Countdown, SmolLM2, CPU
    python -m nanovppo.train algo.lr=1e-5 seed=1 trainer.max_steps=20
    python -m nanovppo.train -m seed=0,1 algo.lr=1e-5,2e-5       # sweep: one MLflow run a job
    python -m nanovppo.train resume=outputs/runs/DATE/TIME       # continue an interrupted run
    mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db    # look at the runs

One step (``train_step``): sample ``trainer.prompts_per_step`` prompts; the engine samples
``algo.group_size`` completions of each (rollout); the task scores them (reward); the
algorithm turns rewards into advantages (experience); the policy is optimised on them
(``nanovppo.update``); the engine gets the new weights (weight sync). ``train(cfg)`` builds
the run's parts (``build_run``) and loops over steps, evaluating and checkpointing;
``main`` only lets Hydra compose ``cfg``. Reading order: docs/design.md.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from nanovppo import checkpoint as ckpt
from nanovppo import distributed as dd
from nanovppo import lora as lora_mod
from nanovppo import memory
from nanovppo.config import CONF_DIR, build, seed_everything
from nanovppo.ema import EMA
from nanovppo.engines.base import Sampling
from nanovppo.errors import ConfigError, NanovppoError
from nanovppo.optim import adamw, lr_factor
from nanovppo.policy import load_policy, reference_model, sync_engine
from nanovppo.progress import bar, logging_redirect_tqdm
from nanovppo.rollout import RolloutSource, context_length, drop_over_context, render_prompt
from nanovppo.schema import check_against_task, check_config
from nanovppo.runs import Launch, finish, make_tracker, prepare_run, save_checkpoint
from nanovppo.tracking import Tracker
from nanovppo.batching import examples_for_step
from nanovppo.sync import SyncCheck
from nanovppo.update import logprob_module, probe_logprobs, resolve_correction, update
from nanovppo.warm_start import warm_start

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
        run = build_run(cfg, run_dir, launch or Launch(), d)
        return _loop(run, stop or threading.Event())
    finally:
        dd.shutdown()


@dataclass
class Run:
    """A run's parts, as ``build_run`` made them."""

    cfg: DictConfig
    run_dir: Path
    d: dd.Dist
    task: object
    algo: object
    policy: torch.nn.Module        # the transformers model (with LoRA: a peft model)
    tokenizer: object
    model: torch.nn.Module         # the log-prob module around the policy (DDP/FSDP2-wrapped)
    ref: torch.nn.Module | None    # the KL reference's log-prob module
    engine: object
    source: RolloutSource
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    correction: dict | None        # the engine/trainer mismatch correction (None: off)
    sync: SyncCheck | None         # checks each weight push (None: nothing is pushed)
    ema: EMA | None                # trainer.ema: the policy's average (None: off)
    tracker: Tracker | None        # rank 0 only
    start_step: int                # steps already done (a resumed run's checkpoint)
    start_metrics: dict            # a new run: the warm start's figures


def build_run(cfg: DictConfig, run_dir, launch: Launch, d: dd.Dist) -> Run:
    """Everything a run needs, in the order its parts depend on each other: the config and
    folder (a resumed run's own), task, algorithm, policy, any warm start, reference,
    engine, optimizer, and a resumed run's state."""
    cfg, run_dir, state, policy_cfg = prepare_run(cfg, run_dir, launch, d)
    check_config(cfg)  # every run-level value, before anything loads (nanovppo/schema.py)
    if cfg.hardware.threads:
        torch.set_num_threads(int(cfg.hardware.threads))
    if cfg.trainer.prompts_per_step % d.world:
        raise ConfigError(f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} must be a "
                          f"multiple of the number of processes ({d.world})")
    seed_everything(cfg.seed + d.rank)
    device = dd.device_for(str(cfg.hardware.device), d)
    strategy, fast = str(cfg.hardware.strategy), bool(cfg.trainer.fast)
    sharded = d.on and strategy == "fsdp2"
    task = build(cfg.task, "task")
    check_against_task(cfg, task)
    algo = build(cfg.algo, "algo")
    lora = cfg.model.lora
    if lora and sharded:
        raise ConfigError("model.lora trains under one process or hardware.strategy=ddp; "
                          "FSDP2 shards the frozen base for nothing")
    resuming = state is not None
    policy, tokenizer = load_policy(cfg, policy_cfg, run_dir, resuming, device)
    # A prompt that leaves no room for rollout.max_new_tokens is dropped, never cut.
    context = context_length(cfg, policy)
    dropped = drop_over_context(task, tokenizer, context, cfg.rollout.max_new_tokens)
    if any(dropped.values()) and d.main:
        log.warning("%d training and %d test prompts of task %s do not fit the %d-token "
                    "context with rollout.max_new_tokens=%d: dropped (%d and %d remain)",
                    dropped["train"], dropped["test"], task.name, context,
                    cfg.rollout.max_new_tokens, len(task.train_examples), len(task.test_examples))
    tracker = make_tracker(cfg, run_dir, state, task, launch) if d.main else None
    wrap = lambda p: dd.wrap(logprob_module(p, fast, not d.on), strategy, d, device)  # noqa: E731
    model = None
    start_metrics = {f"data/dropped_over_context_{k}": float(v) for k, v in dropped.items()}
    if not resuming and cfg.warm_start.steps > 0:
        if sharded and cfg.inference_backend.name == "hf":
            raise ConfigError("warm_start.steps > 0 under FSDP2 needs the vllm or sglang "
                              "engine (the hf engine copies the policy before it is sharded)"
                              "; or use hardware.strategy=ddp")
        model = wrap(policy)
        start_metrics.update(warm_start(cfg, task, tokenizer, model, tracker, d))
        if lora:  # RL starts from the warm-started weights, with fresh adapters over them
            policy = lora_mod.add_adapters(policy.merge_and_unload(), lora)
            model = None
    ref = None
    if algo.uses_reference:
        frozen = reference_model(cfg, policy, run_dir, resuming, device)
        ref = (lora_mod.AdapterOffLogprobs(logprob_module(policy, fast, False)) if frozen is None
               else logprob_module(frozen, fast, False))
    # The engine is built before sharding: an hf engine under FSDP2 keeps its own whole
    # copy (a sharded module cannot sample on one rank alone). Each engine samples its own
    # stream; the ranks of one tensor-parallel vLLM engine share a seed, as vLLM requires.
    extra = {"copy_model": True} if cfg.inference_backend.name == "hf" and sharded else {}
    tp = (int(cfg.inference_backend.tensor_parallel_size)  # only vLLM shards one engine
          if "tensor_parallel_size" in cfg.inference_backend else 1)
    engine_group = d.rank // tp
    engine = build(cfg.inference_backend, "inference_backend", model=policy, tokenizer=tokenizer,
                   seed=cfg.seed + 1009 * engine_group, _convert_="partial", **extra)
    engine.progress = cfg.trainer.progress and d.main
    model = model or wrap(policy)
    # Only what trains reaches the optimizer (with LoRA: the adapters).
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=algo.lr,
                      betas=tuple(cfg.trainer.adam_betas),
                      weight_decay=cfg.trainer.weight_decay, seed=cfg.seed,
                      kind=cfg.trainer.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        cfg.trainer.warmup_steps, cfg.trainer.max_steps, cfg.trainer.lr_schedule))
    ema = None
    if cfg.trainer.ema is not None:  # averaged after each optimizer step (nanovppo/ema.py)
        ema = EMA(policy, cfg.trainer.ema)
        ema.hook(optimizer)
    start_step = 0
    if resuming:
        start_step = state["step"]
        ranks = state.get("ranks") or [{"rng": state["rng"], "engine": state["engine"]}]
        if len(ranks) != d.world:
            raise ConfigError(f"resume={run_dir}: the run used {len(ranks)} process(es); "
                              f"resume it with the same number, not {d.world}")
        dd.load_optimizer_state(model, optimizer, state["optimizer"], d)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(ranks[d.rank]["rng"])
        engine.load_state_dict(ranks[d.rank]["engine"])
        if ema is not None:
            saved = ranks[d.rank].get("ema") or state.get("ema")
            if saved is None:
                raise ConfigError(f"resume={run_dir}: trainer.ema={cfg.trainer.ema}, but the "
                                  "run's checkpoint holds no EMA (it ran with trainer.ema=null)")
            ema.load_state_dict(saved)
        if d.main:
            log.info("resuming %s from step %d", run_dir, start_step)
    sampling = Sampling(n=algo.group_size, temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                        stop=task.stop)
    source = RolloutSource(task, tokenizer, engine, sampling, more_examples=_refill(cfg, task, d))
    sync = None
    if cfg.rollout.sync_check.enabled and not engine.shares_policy:
        probe = render_prompt(task, tokenizer, (task.test_examples or task.train_examples)[0])
        sync = SyncCheck(probe, cfg.rollout.sync_check.max_gap,
                         lambda ids: probe_logprobs(model, ids, cfg, tokenizer.pad_token_id), d)
        sync.after_push(engine, start_step)  # the engine as loaded: its baseline
    return Run(cfg, run_dir, d, task, algo, policy, tokenizer, model, ref, engine, source,
               optimizer, scheduler, resolve_correction(cfg.rollout.correction, engine),
               sync, ema, tracker, start_step, start_metrics)


def _loop(run: Run, stop: threading.Event) -> dict:
    """The RL start (a new run: evaluated and saved as step 0), then the steps."""
    cfg, d, tracker = run.cfg, run.d, run.tracker
    if run.start_step == 0:
        start = evaluate(run.engine, run.task, run.tokenizer, cfg, d, cfg.trainer.eval_pass_k)
        start["eval/accuracy_rl_start"] = start.get("eval/accuracy", 0.0)
        start.update(run.start_metrics)
        # With LoRA after a warm start, the RL start is saved whole: its adapters were merged
        # into the base, and the RL adapters that later checkpoints hold apply to it.
        _, model_id = _checkpoint(run, 0, whole=bool(cfg.model.lora) and cfg.warm_start.steps > 0)
        if d.main:
            tracker.log_metrics(start, 0, model_id)
            log.info("RL starts at eval accuracy %.3f (%d test problems)",
                     start["eval/accuracy_rl_start"],
                     len(run.task.test_examples[:cfg.trainer.eval_examples]))
    last_ckpt, status = ckpt.latest_checkpoint(run.run_dir), "FAILED"
    # Steps done, their ETA, and the latest reward and accuracy; the step lines go above it.
    run_bar = bar(cfg.trainer.progress and d.main, total=cfg.trainer.max_steps,
                  initial=run.start_step, desc="RL", unit="step")
    try:
        with logging_redirect_tqdm(loggers=[log]) if not run_bar.disable else contextlib.nullcontext():
            for step in range(run.start_step + 1, cfg.trainer.max_steps + 1):
                last = step == cfg.trainer.max_steps
                metrics, samples_table = train_step(run, step)
                run.scheduler.step()
                if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 or last:
                    t0 = time.perf_counter()
                    k = cfg.trainer.eval_pass_k if last else 0  # pass@k at both ends only
                    metrics.update(evaluate(run.engine, run.task, run.tokenizer, cfg, d, k))
                    if run.ema is not None:
                        metrics.update(evaluate_ema(run))
                    metrics["perf/eval_s"] = time.perf_counter() - t0
                stopping = dd.all_reduce_max([float(stop.is_set())], d)[0] > 0  # all ranks agree
                every, model_id = cfg.trainer.checkpoint_every, None
                if (every and step % every == 0) or last or stopping:
                    last_ckpt, model_id = _checkpoint(run, step)
                if d.main:
                    if tracker.log_metrics(metrics, step, model_id) and cfg.trainer.samples_every \
                            and step % cfg.trainer.samples_every == 0:
                        tracker.log_table(samples_table, f"samples/step_{step:06d}.json")
                    log.info(_step_line(step, cfg.trainer.max_steps, metrics))
                    run_bar.set_postfix_str(_bar_postfix(metrics), refresh=False)
                    run_bar.update()
                if stopping and not last:
                    raise KeyboardInterrupt(f"stopped after step {step}")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        run_bar.close()
        run.engine.close()
        summary = finish(tracker, cfg, run.run_dir, last_ckpt, status) if d.main else {
            "status": status, "run_dir": str(run.run_dir), "rank": d.rank}
    return summary


def train_step(run: Run, step: int):
    """Rollout, reward, experience, update and weight sync for one step on this rank's
    share of the prompts; returns (metrics of the whole job, this rank's samples table)."""
    cfg, d, task, engine = run.cfg, run.d, run.task, run.engine
    fast = bool(cfg.trainer.fast)
    t_start = time.perf_counter()
    idx = examples_for_step(len(task.train_examples), cfg.trainer.prompts_per_step, cfg.seed,
                            step)[d.rank::d.world]
    run.source.begin(step)

    t0 = time.perf_counter()
    with memory.phase(fast):  # rollout and reward: the engine samples, the task scores
        ro = run.source.collect([task.train_examples[i] for i in idx])
    rollout_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    with memory.phase(fast):  # experience: advantages (VinePPO: Monte-Carlo values)
        samples, metrics = run.algo.make_samples(ro, run.source)
    experience_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    job_wide = {}  # update's metrics, reduced over ranks already
    if dd.all_reduce_sum([float(len(samples))], d)[0] > 0:
        engine.sleep()
        job_wide = update(run.model, run.ref, run.algo, samples, cfg, run.optimizer,
                          run.tokenizer.pad_token_id, step, d, run.correction)
        engine.wake_up()
        t1 = time.perf_counter()
        sync_engine(engine, run.policy)
        metrics["perf/weight_sync_s"] = time.perf_counter() - t1
        if run.sync is not None:  # did the weights arrive? (nanovppo/sync.py)
            t1 = time.perf_counter()
            metrics.update(run.sync.after_push(engine, step))
            metrics["perf/sync_check_s"] = time.perf_counter() - t1
        metrics["train/skipped_update"] = 0.0
    else:
        if d.main:
            log.warning("step %d: no samples to train on (e.g. RFT kept nothing); update "
                        "skipped", step)
        metrics["train/skipped_update"] = 1.0
    update_s = time.perf_counter() - t0

    lengths = [len(c.token_ids) for g in ro.groups for c in g]
    truncated = [c.finish_reason == "length" for g in ro.groups for c in g]
    step_s = time.perf_counter() - t_start
    metrics.update({
        "train/reward_mean": ro.rewards.mean().item(),
        "train/reward_std": ro.rewards.std(unbiased=False).item(),
        "train/accuracy": ro.correct.float().mean().item(),
        **collapse_metrics(ro, task), **signal_metrics(ro),
        "train/response_length": float(np.mean(lengths)),
        "train/truncated_frac": float(np.mean(truncated)),
        "train/lr": run.optimizer.param_groups[0]["lr"],
        "perf/rollout_s": rollout_s, "perf/experience_s": experience_s, "perf/update_s": update_s,
        "perf/step_s": step_s,
        # the share of the step spent building experience (VinePPO: value estimation)
        "perf/experience_frac": experience_s / max(step_s, 1e-9),
        "perf/gen_tokens_per_s": sum(lengths) / max(rollout_s, 1e-9),
    })
    metrics.update({f"train/shaping/{k}_mean": v.mean().item() for k, v in ro.shaping.items()})
    metrics = dd.reduce_metrics(metrics, d)
    metrics.update(job_wide)
    return metrics, samples_table(ro, task)


def evaluate(engine, task, tokenizer, cfg, d: dd.Dist = dd.Dist(), pass_k: int = 0) -> dict:
    """Greedy decoding on the first ``trainer.eval_examples`` held-out test prompts (each
    rank takes its share): the task's accuracy and mean reward. With ``pass_k``, also
    ``pass_k`` samples per prompt at the rollout temperature: ``eval/pass@k``, the share of
    prompts with a correct one among them (n = k, so the unbiased estimator is exactly that)."""
    examples = task.test_examples[: cfg.trainer.eval_examples]
    if not examples:
        return {}
    mine = examples[d.rank::d.world]
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                      stop=task.stop)
    sums = [0.0, 0.0, 0.0]  # reward, correct (greedy), prompts solved in k samples
    if mine:
        ro = RolloutSource(task, tokenizer, engine, greedy).collect(mine)
        sums[0] = ro.rewards.sum().item()
        sums[1] = ro.correct.float().sum().item()
        if pass_k:
            sampled = Sampling(n=pass_k, temperature=cfg.rollout.temperature,
                               top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                               stop=task.stop)
            ro = RolloutSource(task, tokenizer, engine, sampled).collect(mine)
            sums[2] = ro.correct.any(dim=1).float().sum().item()
    total = dd.all_reduce_sum(sums, d)
    out = {"eval/reward_mean": total[0] / len(examples), "eval/accuracy": total[1] / len(examples)}
    if pass_k:
        out[f"eval/pass@{pass_k}"] = total[2] / len(examples)
    return out


def evaluate_ema(run: Run) -> dict:
    """The greedy evaluation of the policy's EMA (``eval/accuracy_ema``): the engine gets
    the averaged weights for it, then the live ones back."""
    with run.ema.swapped_in():
        sync_engine(run.engine, run.policy)
        out = evaluate(run.engine, run.task, run.tokenizer, run.cfg, run.d)
    sync_engine(run.engine, run.policy)
    return {f"{k}_ema": v for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# Helpers of the loop: DAPO's refill, checkpoints, what a step reports
# ----------------------------------------------------------------------------------------

def _refill(cfg, task, d: dd.Dist):
    """DAPO's source of fresh prompts: for a step's ``call``-th refill, ``k`` examples from
    a stream of their own (a pure function of seed, rank, step and call, like the step's)."""
    n = len(task.train_examples)

    def more_examples(step: int, k: int, call: int) -> list[dict]:
        seed = cfg.seed + 7919 * call + 104_729 * d.rank
        return [task.train_examples[i] for i in examples_for_step(n, k, seed, step)]

    return more_examples


def _checkpoint(run: Run, step: int, whole: bool = False):
    return save_checkpoint(run.run_dir, step, run.cfg, run.model, run.policy, run.tokenizer,
                           run.optimizer, run.scheduler, run.engine, run.tracker, run.d, whole,
                           run.ema)


def samples_table(ro, task) -> dict:
    """The step's completions, one row each, as the MLflow samples table shows them."""
    table = {"prompt": [], "completion": [], "reward": [], "correct": [], "finish_reason": []}
    for g, group in enumerate(ro.groups):
        for j, c in enumerate(group):
            table["prompt"].append(task.messages(ro.examples[g])[-1]["content"])
            table["completion"].append(task.prefill + c.text)
            table["reward"].append(ro.rewards[g, j].item())
            table["correct"].append(bool(ro.correct[g, j]))
            table["finish_reason"].append(c.finish_reason)
    return table


def collapse_metrics(ro, task) -> dict:
    """How varied each group is: the share of distinct completions and of distinct final
    answers among a group's samples, averaged over groups. A policy that has collapsed to
    one output for a prompt scores 1 / group size on both.

    >>> from types import SimpleNamespace as NS
    >>> ro = NS(groups=[[NS(text="a"), NS(text="a")], [NS(text="a"), NS(text="b")]])
    >>> collapse_metrics(ro, NS(prefill="", final_answer=lambda t: "x"))
    {'train/distinct_completions': 0.75, 'train/distinct_answers': 0.5}
    """
    texts = [[c.text for c in g] for g in ro.groups]
    answers = [[task.final_answer(task.prefill + t) for t in g] for g in texts]
    share = lambda rows: float(np.mean([len(set(r)) / len(r) for r in rows])) if rows else 0.0
    return {"train/distinct_completions": share(texts), "train/distinct_answers": share(answers)}


def signal_metrics(ro) -> dict:
    """How many groups carry a learning signal. ``frac_reward_zero_std``: the share of
    groups whose samples all got the same reward (their group-relative advantages are all
    zero: no gradient; TRL logs the same figure under this name); ``frac_mixed_correct``:
    the share where some but not all samples are correct (what RL learns to solve from).

    >>> import torch
    >>> from types import SimpleNamespace as NS
    >>> ro = NS(rewards=torch.tensor([[1., 1.], [0., 0.3], [0., 0.]]),
    ...         correct=torch.tensor([[True, True], [False, False], [False, False]]))
    >>> {k: round(v, 3) for k, v in signal_metrics(ro).items()}
    {'train/frac_reward_zero_std': 0.667, 'train/frac_mixed_correct': 0.0}
    """
    if ro.rewards.numel() == 0:
        return {}
    flat = (ro.rewards == ro.rewards[:, :1]).all(dim=1)  # [G]
    some = ro.correct.any(dim=1) & ~ro.correct.all(dim=1)  # [G]
    return {"train/frac_reward_zero_std": flat.float().mean().item(),
            "train/frac_mixed_correct": some.float().mean().item()}


def _bar_postfix(m: dict) -> str:
    text = f"reward {m['train/reward_mean']:.2f} acc {m['train/accuracy']:.2f}"
    if "eval/accuracy" in m:
        text += f" eval acc {m['eval/accuracy']:.2f}"
    return text


def _step_line(step: int, total: int, m: dict) -> str:
    line = (f"step {step}/{total} | reward {m['train/reward_mean']:.3f} "
            f"acc {m['train/accuracy']:.2f} | distinct {m['train/distinct_completions']:.2f}"
            f" | zero-std {m.get('train/frac_reward_zero_std', 0):.2f}"
            f" | len {m['train/response_length']:.0f} | rollout {m['perf/rollout_s']:.1f}s "
            + (f"values {m['perf/experience_s']:.1f}s " if m["perf/experience_s"] > 0.5 else "")
            + f"update {m['perf/update_s']:.1f}s | {m['perf/gen_tokens_per_s']:.0f} tok/s")
    if "eval/reward_mean" in m:
        line += f" | eval reward {m['eval/reward_mean']:.3f} acc {m['eval/accuracy']:.2f}"
    return line


# ----------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------

@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # The first SIGTERM (SLURM preemption, `kill`) or Ctrl-C ends the run after the current
    # step and a checkpoint (a signal in the middle of an MLflow write would leave its
    # SQLite store locked and the run marked RUNNING): the MLflow run is marked KILLED and
    # `resume=` continues it. A second signal stops at once.
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


if __name__ == "__main__":
    main()
