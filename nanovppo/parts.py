"""A run's parts, built in the order they depend on each other: the config and run folder
(a resumed run's own), task, algorithm, policy, the warm start, reference, engine,
optimizer, a resumed run's state, the rollout source and the weight-sync check."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from nanovppo import checkpoint as ckpt
from nanovppo import distributed as dd
from nanovppo import lora as lora_mod
from nanovppo import memory
from nanovppo.batching import refill_stream
from nanovppo.config import build, seed_everything
from nanovppo.ema import EMA
from nanovppo.engines.base import Sampling
from nanovppo.errors import ConfigError
from nanovppo.optim import adamw, lr_factor
from nanovppo.policy import load_policy, reference_model
from nanovppo.rollout import RolloutSource, context_length, drop_over_context, render_prompt
from nanovppo.runs import Launch, make_tracker, prepare_run
from nanovppo.schema import check_against_task, check_config
from nanovppo.sync import SyncCheck
from nanovppo.tracking import Tracker
from nanovppo.fast import logprob_module
from nanovppo.update import probe_logprobs, resolve_correction
from nanovppo.warm_start import warm_start

log = logging.getLogger("nanovppo")


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


def build_run(cfg: DictConfig, run_dir, launch: Launch, d: dd.Dist,
              stop: threading.Event) -> Run:
    """Everything a run needs (see the module's docstring for the order). ``stop``, when
    set, ends the warm start after its current step (the run is then KILLED, with no
    checkpoint)."""
    cfg, run_dir, state, policy_cfg = prepare_run(cfg, run_dir, launch, d)
    check_config(cfg)  # every run-level value, before anything loads (nanovppo/schema.py)
    if cfg.hardware.threads:
        torch.set_num_threads(int(cfg.hardware.threads))
    memory.limit_onednn_cache(cfg.hardware.onednn_cache)  # before the first matmul
    if cfg.trainer.prompts_per_step % d.world:
        raise ConfigError(f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} must be a "
                          f"multiple of the number of processes ({d.world})")
    seed_everything(cfg.seed + d.rank)
    device = dd.device_for(str(cfg.hardware.device), d)
    task = build(cfg.task, "task")
    check_against_task(cfg, task)
    algo = build(cfg.algo, "algo")
    if cfg.model.lora and sharded(cfg, d):
        raise ConfigError("model.lora trains under one process or hardware.strategy=ddp; "
                          "FSDP2 shards the frozen base for nothing")
    resuming = state is not None
    policy, tokenizer = load_policy(cfg, policy_cfg, run_dir, resuming, device)
    start_metrics = _drop_long_prompts(cfg, task, tokenizer, policy, d)
    tracker = make_tracker(cfg, run_dir, state, task, launch) if d.main else None
    with _ends_run_on_error(tracker):  # a run that stops here is not left RUNNING
        strategy = str(cfg.hardware.strategy) if d.on else None
        wrap = lambda p: dd.wrap(logprob_module(p, bool(cfg.trainer.fast), strategy,  # noqa: E731
                                                bool(cfg.trainer.fused_kernels)),
                                 str(cfg.hardware.strategy), d, device)
        model = None
        if not resuming and cfg.warm_start.steps > 0:
            if sharded(cfg, d) and cfg.inference_backend.name == "hf":
                raise ConfigError("warm_start.steps > 0 under FSDP2 needs the vllm or sglang "
                                  "engine (the hf engine copies the policy before it is sharded)"
                                  "; or use hardware.strategy=ddp")
            model = wrap(policy)
            start_metrics.update(warm_start(cfg, task, tokenizer, model, tracker, d, stop))
            if cfg.model.lora:  # RL starts from the warm-started weights, with fresh adapters
                policy = lora_mod.add_adapters(policy.merge_and_unload(), cfg.model.lora)
                model = None
        ref = _reference(cfg, algo, policy, run_dir, resuming, device, strategy)
        engine = _engine(cfg, policy, tokenizer, d)
        model = model or wrap(policy)
        optimizer, scheduler, ema = _optimizer(cfg, algo, model, policy)
        start_step = 0
        if resuming:
            start_step = _restore(state, run_dir, cfg, model, optimizer, scheduler, engine, ema, d)
        sampling = Sampling(n=algo.group_size, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                            stop=task.stop)
        source = RolloutSource(task, tokenizer, engine, sampling,
                               more_examples=refill_stream(task.train_examples, cfg.seed, d.rank))
        sync = _sync_check(cfg, task, tokenizer, model, engine, start_step, d)
        return Run(cfg, run_dir, d, task, algo, policy, tokenizer, model, ref, engine, source,
                   optimizer, scheduler, resolve_correction(cfg.rollout.correction, engine),
                   sync, ema, tracker, start_step, start_metrics)


@contextlib.contextmanager
def _ends_run_on_error(tracker: Tracker | None):
    """A run that stops before its loop (bad input found late, a signal during the warm
    start) ends its MLflow run as FAILED or KILLED instead of leaving it RUNNING."""
    try:
        yield
    except BaseException as e:
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def sharded(cfg, d: dd.Dist) -> bool:
    """Whether the policy is sharded over the processes (FSDP2)."""
    return d.on and str(cfg.hardware.strategy) == "fsdp2"


def _drop_long_prompts(cfg, task, tokenizer, policy, d: dd.Dist) -> dict:
    """A prompt that leaves no room for ``rollout.max_new_tokens`` is dropped, never cut;
    returns the counts as step-0 metrics."""
    context = context_length(cfg, policy)
    dropped = drop_over_context(task, tokenizer, context, cfg.rollout.max_new_tokens)
    if any(dropped.values()) and d.main:
        log.warning("%d training and %d test prompts of task %s do not fit the %d-token "
                    "context with rollout.max_new_tokens=%d: dropped (%d and %d remain)",
                    dropped["train"], dropped["test"], task.name, context,
                    cfg.rollout.max_new_tokens, len(task.train_examples), len(task.test_examples))
    return {f"data/dropped_over_context_{k}": float(v) for k, v in dropped.items()}


def _reference(cfg, algo, policy, run_dir, resuming: bool, device, strategy: str | None):
    """The KL reference's log-prob module (None when the algorithm uses none)."""
    if not algo.uses_reference:
        return None
    fast, fused = bool(cfg.trainer.fast), bool(cfg.trainer.fused_kernels)
    frozen = reference_model(cfg, policy, run_dir, resuming, device)
    if frozen is None:  # LoRA: the policy with its adapters off, as it trains
        return lora_mod.AdapterOffLogprobs(logprob_module(policy, fast, strategy, fused))
    return logprob_module(frozen, fast, fused=fused)  # a whole frozen copy on every process


def _engine(cfg, policy, tokenizer, d: dd.Dist):
    """The rollout engine, built before the policy is sharded: an hf engine under FSDP2
    keeps its own whole copy (a sharded module cannot sample on one rank alone). Each engine
    samples its own stream; the ranks of one tensor-parallel vLLM engine share a seed, as
    vLLM requires."""
    hf = cfg.inference_backend.name == "hf"
    extra = {"copy_model": True} if hf and sharded(cfg, d) else {}
    tp = (int(cfg.inference_backend.tensor_parallel_size)  # only vLLM shards one engine
          if "tensor_parallel_size" in cfg.inference_backend else 1)
    engine = build(cfg.inference_backend, "inference_backend", model=policy, tokenizer=tokenizer,
                   seed=cfg.seed + 1009 * (d.rank // tp), _convert_="partial", **extra)
    engine.progress = cfg.trainer.progress and d.main
    return engine


def _optimizer(cfg, algo, model, policy):
    """AdamW over what trains (with LoRA: the adapters), its schedule, and the EMA of the
    policy (``trainer.ema``; averaged after each optimizer step) or None."""
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=algo.lr,
                      betas=tuple(cfg.trainer.adam_betas),
                      weight_decay=cfg.trainer.weight_decay, seed=cfg.seed,
                      kind=cfg.trainer.optimizer, bf16_rounding=cfg.hardware.bf16_rounding)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        cfg.trainer.warmup_steps, cfg.trainer.max_steps, cfg.trainer.lr_schedule))
    ema = None
    if cfg.trainer.ema is not None:
        ema = EMA(policy, cfg.trainer.ema)
        ema.hook(optimizer)
    return optimizer, scheduler, ema


def _restore(state: dict, run_dir, cfg, model, optimizer, scheduler, engine, ema,
             d: dd.Dist) -> int:
    """A resumed run's optimizer, schedule, RNG, engine sampler and EMA, from the
    checkpoint's ``state``; returns the steps already done."""
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
        log.info("resuming %s from step %d", run_dir, state["step"])
    return state["step"]


def _sync_check(cfg, task, tokenizer, model, engine, start_step: int, d: dd.Dist):
    """The weight-sync check (``rollout.sync_check``), given the engine as loaded as its
    baseline; None when off or when the engine samples from the policy itself."""
    if not cfg.rollout.sync_check.enabled or engine.shares_policy:
        return None
    probe = render_prompt(task, tokenizer, (task.test_examples or task.train_examples)[0])
    sync = SyncCheck(probe, cfg.rollout.sync_check.max_gap,
                     lambda ids: probe_logprobs(model, ids, cfg, tokenizer.pad_token_id), d)
    sync.after_push(engine, start_step)
    return sync
