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

import contextlib
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
from nanovppo.config import build
from omegaconf import DictConfig, OmegaConf

from nanovppo import checkpoint as ckpt
from nanovppo import distributed as dd
from nanovppo import lora as lora_mod
from nanovppo.errors import ConfigError, NanovppoError
from nanovppo.algos.losses import mismatch_stats, rollout_correction
from nanovppo.algos.pg import LossBatch
from nanovppo.engines.base import Sampling
from nanovppo.logprobs import (GroupLogprobs, checkpoint_layers, pad_groups, reuse_head_cast,
                               sparse_tied_embedding_grads)
from nanovppo.memory import keep_freed_memory, release_free_memory
from nanovppo.rollout import RolloutSource, Sample
from nanovppo.models import load_model, to_dtype
from nanovppo.optim import adamw
from nanovppo.progress import bar, logging_redirect_tqdm
from nanovppo.tracking import Tracker, default_tracking_uri, flatten
from nanovppo.warm_start import warm_start

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


def _autocast_device(cfg) -> str:
    return "cuda" if str(cfg.hardware.device).startswith("cuda") else "cpu"


def autocast_ctx(cfg):
    dtype = to_dtype(cfg.hardware.compute_dtype)
    if dtype == to_dtype(cfg.hardware.param_dtype):
        return _no_autocast(cfg)
    return torch.autocast(_autocast_device(cfg), dtype=dtype)


def _no_autocast(cfg):
    return torch.autocast(_autocast_device(cfg), enabled=False)


# ----------------------------------------------------------------------------------------
# Update
# ----------------------------------------------------------------------------------------

def _minibatch_autocast(model, cfg):
    """An autocast region around a minibatch's micro-batches. Autocast keeps the casts of
    leaf weights until its outermost region ends, so the fp32 weights are cast to bf16 once
    per minibatch instead of once per micro-batch (and again in checkpointed recomputes).
    The output head's cast is kept the same way (``reuse_head_cast``). Not under FSDP2,
    whose gathered weights are freed and refilled between forwards."""
    stack = contextlib.ExitStack()
    if not hasattr(model, "set_requires_gradient_sync"):  # not FSDP2
        stack.enter_context(autocast_ctx(cfg))
        stack.enter_context(reuse_head_cast())
    return stack


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


def _logprobs(model, mb: list[Sample], pad_id: int, cfg, temperature: float, with_entropy=False):
    """Log-probs [b, C] of a micro-batch (entropy too if asked), each prompt run once.

    ``model`` is a ``GroupLogprobs`` module (possibly DDP- or FSDP2-wrapped). An empty
    micro-batch stands for a rank that has less work than the others: it runs a one-token
    forward so that every rank makes the same collective calls.
    """
    prompts, completions, seen = [], [], {}
    for s in mb:  # samples of a group are adjacent (see micro_batches)
        if s.group not in seen:
            seen[s.group] = len(prompts)
            prompts.append(s.prompt_ids)
            completions.append([])
        completions[seen[s.group]].append(s.completion_ids)
    if mb:
        batch = pad_groups(prompts, completions, pad_id)
    else:  # one pad token as prompt and completion, masked out
        batch = pad_groups([[pad_id]], [[[pad_id]]], pad_id)
        batch = batch._replace(completion_mask=torch.zeros_like(batch.completion_mask))
    with autocast_ctx(cfg):
        out = model(batch, temperature, cfg.trainer.logprob_chunk_rows, with_entropy)
    return out, batch


@torch.no_grad()
def precompute_logprobs(model, batches, pad_id, cfg, temperature) -> list[torch.Tensor]:
    return [_logprobs(model, mb, pad_id, cfg, temperature)[0] for mb in batches]


def _pad_to_busiest(lists: list[list[list[Sample]]], d: dd.Dist) -> list[list[list[Sample]]]:
    """Each list of micro-batches lengthened with empty ones to the longest any rank has,
    so that every rank makes the same forward/backward (and collective) calls."""
    most = dd.all_reduce_max([float(len(b)) for b in lists], d)
    return [b + [[]] * (int(m) - len(b)) for b, m in zip(lists, most)]


def _sample_logprobs(model, samples: list[Sample], pad_id, cfg, d: dd.Dist, temperature) -> dict:
    """The current policy's log-probs of each sample's completion: {id(sample): [C_s]}."""
    [batches] = _pad_to_busiest([micro_batches(samples, cfg.trainer.micro_batch_size)], d)
    out = {}
    for mb, logp in zip(batches, precompute_logprobs(model, batches, pad_id, cfg, temperature)):
        for r, s in enumerate(mb):
            out[id(s)] = logp[r, :len(s.completion_ids)]
    return out


def _stack(mb: list[Sample], per_sample: dict, width: int) -> torch.Tensor:
    """[b, width] right-padded rows of ``per_sample`` for the samples of ``mb``."""
    out = torch.zeros(len(mb), width)
    for r, s in enumerate(mb):
        row = per_sample[id(s)]
        out[r, :len(row)] = row
    return out


def split_groups(samples: list[Sample], parts: int, rng: random.Random,
                 d: dd.Dist = dd.Dist()) -> list[list[Sample]]:
    """Shuffle the groups and deal them into ``parts`` minibatches (a group is never split;
    with fewer groups than parts some minibatches are empty).

    Under torchrun rank r's group g is the job's group g * world + r (the prompts of a step
    are dealt round-robin), and all ranks shuffle the job's groups with the same ``rng``:
    a minibatch holds the same groups as it would in one process.
    """
    local = sorted({s.group for s in samples})
    glob = {g: g * d.world + d.rank for g in local}
    n = int(dd.all_reduce_max([float(max(glob.values(), default=-1) + 1)], d)[0])
    order = list(range(n))
    rng.shuffle(order)
    position = {g: i for i, g in enumerate(order)}
    per = max(1, math.ceil(n / parts))
    part_of = {g: min(position[glob[g]] // per, parts - 1) for g in local}
    return [[s for s in samples if part_of[s.group] == i] for i in range(parts)]


def _grad_sync(model, on: bool):
    """Whether this backward pass reduces gradients across ranks (only a minibatch's last
    micro-batch does; the others accumulate locally)."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if on else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


def update(model, ref, algo, samples: list[Sample], cfg, optimizer, pad_id: int, step: int,
           d: dd.Dist = dd.Dist(), correction: dict | None = None) -> dict:
    """One training step's optimisation over this rank's scored samples; returns metrics
    for the whole job (already reduced over ranks). ``model`` and ``ref`` are
    ``GroupLogprobs`` modules; ``correction`` the engine/trainer mismatch correction
    (``resolve_correction``; None: off)."""
    norm_len = cfg.rollout.max_new_tokens
    temperature = algo.loss_temperature(cfg.rollout.temperature)
    rng = random.Random(cfg.seed * 1_000_003 + step)  # the same on every rank
    totals = {"loss": 0.0, "clip_tokens": 0.0, "kl_tokens": 0.0, "entropy_tokens": 0.0,
              "tokens": 0.0, "entropy_count": 0.0, "mismatch_k3_tokens": 0.0,
              "engine_tokens": 0.0, "corrected_tokens": 0.0}
    mismatch_max = 0.0
    # Where the update's time goes, and the work of its forward passes (for FLOP/s): the
    # tokens the decoder ran and the positions the output head scored.
    perf = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0, "tokens": 0.0,
            "head_tokens": 0.0}
    grad_norms = []
    low_memory = bool(cfg.hardware.get("low_memory", False))
    keep_freed_memory(not low_memory)  # the update is where memory peaks
    # With one pass and one minibatch the policy has not moved since sampling, so the
    # "old" log-probs are the current ones (detached): no extra forward is needed, unless
    # the advantages need them first (REINFORCE++ folds the KL into its returns).
    kl_in_reward = getattr(algo, "kl_in_reward", False)
    reuse_current = algo.ppo_epochs == 1 and algo.num_minibatches == 1 and not kl_in_reward
    # PPO's "old" log-probs are those of the policy that sampled, i.e. before this step's
    # first optimizer step: computed once for every sample.
    t0 = time.perf_counter()
    old = None if reuse_current else _sample_logprobs(model, samples, pad_id, cfg, d, temperature)
    refs = None if ref is None else _sample_logprobs(ref, samples, pad_id, cfg, d, temperature)
    perf["forward_s"] += time.perf_counter() - t0
    if kl_in_reward:
        algo.fold_kl(samples, [old[id(s)] for s in samples],
                     None if refs is None else [refs[id(s)] for s in samples])
    # The minibatches of each epoch, and each one's loss normalisers (its loss tokens and
    # sequences, all of them, over all ranks). Only samples that carry a gradient are
    # forwarded: without a KL term in the loss, a completion whose advantage is 0 on every
    # token (a group whose samples all scored the same) has a loss and gradient of exactly
    # 0 (tests/test_update_reference.py checks the update is unchanged).
    minibatch_lists = [split_groups(samples, algo.num_minibatches, rng, d)
                       for _ in range(algo.ppo_epochs)]
    norms = [[_normalisers(mb, algo, d) for mb in epoch] for epoch in minibatch_lists]
    for epoch in minibatch_lists:  # clip and KL fractions count every loss token, skipped or not
        totals["tokens"] += float(sum(len(s.completion_ids) for mb in epoch for s in mb
                                      if not (algo.mask_truncated and s.truncated)))
    plan = [[micro_batches([s for s in mb if algo.carries_gradient(s)],
                           cfg.trainer.micro_batch_size) for mb in epoch]
            for epoch in minibatch_lists]
    if d.on:  # every rank runs as many micro-batches as the busiest one (empty ones pad)
        flat = _pad_to_busiest([b for epoch in plan for b in epoch], d)
        plan = [flat[e * algo.num_minibatches:(e + 1) * algo.num_minibatches]
                for e in range(algo.ppo_epochs)]
    trained = sum(len(micro) for minibatch in plan[0] for micro in minibatch)
    totals["samples"], totals["skipped_samples"] = float(len(samples)), float(len(samples) - trained)
    micro = bar(cfg.trainer.progress and d.main, total=sum(len(b) for epoch in plan for b in epoch),
                desc="update", unit="micro-batch", leave=False)
    model.train()
    for epoch, minibatches in enumerate(plan):
        for batches, (n_tokens, n_seqs) in zip(minibatches, norms[epoch]):
            masks = [_train_mask(mb, algo) for mb in batches]
            optimizer.zero_grad(set_to_none=True)
            # One autocast region per minibatch: the weights' bf16 casts are made once and
            # reused by its micro-batches (the weights only change at optimizer.step()).
            with _minibatch_autocast(model, cfg):
                for i, mb in enumerate(batches):
                    with _grad_sync(model, i == len(batches) - 1):
                        t0 = time.perf_counter()
                        # Entropy is reported for the first pass over the samples only.
                        out, batch = _logprobs(model, mb, pad_id, cfg, temperature,
                                               with_entropy=epoch == 0)
                        logp, ent = out if epoch == 0 else (out, None)
                        mask = masks[i]
                        if not mb:
                            with _no_autocast(cfg):
                                (logp.sum() * 0.0).backward()
                            micro.update()
                            continue
                        adv = _advantages(mb, mask.shape[1])                      # [b, C]
                        old_logp = (logp.detach() if old is None
                                    else _stack(mb, old, logp.shape[1]))
                        ref_logp = None if refs is None else _stack(mb, refs, logp.shape[1])
                        weight = torch.ones_like(mask)
                        engine_logp = _engine_logprobs(mb, logp.shape[1])
                        if engine_logp is not None:
                            if epoch == 0:  # how far the sampler is from the trainer
                                m = mismatch_stats(old_logp, engine_logp, mask)
                                totals["mismatch_k3_tokens"] += m["mismatch_k3_tokens"]
                                totals["engine_tokens"] += mask.sum().item()
                                mismatch_max = max(mismatch_max, m["mismatch_max_abs"])
                            if correction:
                                weight, touched = rollout_correction(old_logp, engine_logp,
                                                                     mask, **correction)
                                totals["corrected_tokens"] += touched if epoch == 0 else 0.0
                        with _no_autocast(cfg):  # the loss and backward as before
                            loss, stats = algo.loss(LossBatch(
                                logp, old_logp, ref_logp, adv, mask, weight, n_tokens,
                                n_seqs, norm_len))
                            t1 = time.perf_counter()
                            (loss * d.world).backward()
                        if low_memory:  # the micro-batch's activations, now freed
                            release_free_memory()
                        perf["forward_s"] += t1 - t0
                        perf["backward_s"] += time.perf_counter() - t1
                        perf["tokens"] += batch.prompt_ids.numel() + batch.completion_ids.numel()
                        perf["head_tokens"] += batch.completion_mask.sum().item()
                    totals["loss"] += loss.item()
                    totals["clip_tokens"] += stats["clip_tokens"]
                    totals["kl_tokens"] += stats.get("kl_tokens", 0.0)
                    if epoch == 0:
                        totals["entropy_tokens"] += (ent * batch.completion_mask).sum().item()
                        totals["entropy_count"] += batch.completion_mask.sum().item()
                    micro.update()
            t0 = time.perf_counter()
            clip = cfg.trainer.max_grad_norm
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                  clip if clip else float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            grad_norms.append(norm.item())
            optimizer.step()
            perf["optimizer_s"] += time.perf_counter() - t0
    micro.close()
    optimizer.zero_grad(set_to_none=True)
    release_free_memory()
    if low_memory:
        keep_freed_memory()  # back to reusing freed pages for the rest of the step
    keys = sorted(totals)
    totals = dict(zip(keys, dd.all_reduce_sum([totals[k] for k in keys], d)))
    perf = dict(zip(perf, dd.all_reduce_max(list(perf.values()), d)))  # the slowest rank
    tokens = max(totals["tokens"], 1.0)
    updates = max(1, algo.ppo_epochs * algo.num_minibatches)
    out = {"train/loss": totals["loss"] / updates,
           "train/clip_frac": totals["clip_tokens"] / tokens,
           "train/kl": totals["kl_tokens"] / tokens,
           "train/entropy": totals["entropy_tokens"] / max(totals["entropy_count"], 1.0),
           "train/grad_norm": float(np.mean(grad_norms)),
           # samples not forwarded: their loss is exactly 0 (zero advantage, no KL)
           "train/skipped_samples_frac": totals["skipped_samples"] / max(totals["samples"], 1.0),
           **{f"perf/update_{k}": v for k, v in perf.items()}}
    if totals["engine_tokens"]:  # the engine reported log-probs
        engine_tokens = totals["engine_tokens"]
        out["train/mismatch_k3"] = totals["mismatch_k3_tokens"] / engine_tokens
        out["train/mismatch_max_abs"] = dd.all_reduce_max([mismatch_max], d)[0]
        out["train/mismatch_corrected_frac"] = totals["corrected_tokens"] / engine_tokens
    return out


def _advantages(mb: list[Sample], width: int) -> torch.Tensor:
    """[b, C] advantages: a sample's number on all its tokens, or its per-token list."""
    adv = torch.zeros(len(mb), width)
    for r, s in enumerate(mb):
        if isinstance(s.advantage, (int, float)):
            adv[r, :len(s.completion_ids)] = float(s.advantage)
        else:
            adv[r, :len(s.advantage)] = torch.tensor(s.advantage, dtype=torch.float32)
    return adv


def _normalisers(minibatch: list[Sample], algo, d: dd.Dist) -> tuple[float, float]:
    """The loss tokens and sequences of a minibatch, summed over all ranks: every loss
    divides by them (the loss is then scaled by the world size, because the ranks average
    their gradients; module doc of nanovppo/distributed.py)."""
    kept = [s for s in minibatch if not (algo.mask_truncated and s.truncated)]
    tokens, seqs = dd.all_reduce_sum([float(sum(len(s.completion_ids) for s in kept)),
                                      float(sum(1 for s in kept if s.completion_ids))], d)
    return max(1.0, tokens), max(1.0, seqs)


def _engine_logprobs(mb: list[Sample], width: int) -> torch.Tensor | None:
    """[b, C] the engine's log-probs of the sampled tokens, or None if any sample lacks them."""
    if not all(s.engine_logprobs is not None and len(s.engine_logprobs) == len(s.completion_ids)
               for s in mb):
        return None
    out = torch.zeros(len(mb), width)
    for r, s in enumerate(mb):
        out[r, :len(s.engine_logprobs)] = torch.tensor(s.engine_logprobs, dtype=torch.float32)
    return out


def _train_mask(mb: list[Sample], algo) -> torch.Tensor:
    """[b, C] mask of tokens that carry loss (truncated completions dropped if asked)."""
    width = max([1] + [len(s.completion_ids) for s in mb])
    mask = torch.zeros(len(mb), width)
    for r, s in enumerate(mb):
        if not (algo.mask_truncated and s.truncated):
            mask[r, :len(s.completion_ids)] = 1.0
    return mask


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

def evaluate(engine, task, tokenizer, cfg, d: dd.Dist = dd.Dist()) -> dict:
    """Greedy decoding on held-out test prompts (each rank takes its share)."""
    examples = task.test_examples[: cfg.trainer.eval_examples]
    if not examples:
        return {}
    mine = examples[d.rank::d.world]
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                      stop=task.stop)
    sums = {"reward": 0.0, "correct": 0.0}
    if mine:
        ro = RolloutSource(task, tokenizer, engine, greedy).collect(mine)
        sums["reward"] = ro.rewards.sum().item()
        sums["correct"] = ro.correct.float().sum().item()
    total = dd.all_reduce_sum([sums["reward"], sums["correct"]], d)
    return {"eval/reward_mean": total[0] / len(examples), "eval/accuracy": total[1] / len(examples)}


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------

def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run (or resume) one training job described by ``cfg``; return its summary.

    Under torchrun every rank calls this; rank 0 logs and writes checkpoints.
    """
    d = dd.init(str(cfg.hardware.device))
    _STOP["requested"] = False
    keep_freed_memory()  # nanovppo/memory.py: reuse freed pages, no page faults
    try:
        return _train(cfg, run_dir, d)
    finally:
        dd.shutdown()


def _train(cfg: DictConfig, run_dir, d: dd.Dist) -> dict:
    cfg, run_dir, state, policy_cfg = _prepare_run(cfg, run_dir, d)
    if cfg.hardware.threads:
        torch.set_num_threads(int(cfg.hardware.threads))
    if cfg.trainer.prompts_per_step % d.world:
        raise ConfigError(f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} must be a "
                          f"multiple of the number of processes ({d.world})")
    seed_everything(cfg.seed + d.rank)
    device = dd.device_for(str(cfg.hardware.device), d)
    strategy = str(cfg.hardware.get("strategy", "ddp"))

    task = build(cfg.task, "task")
    algo = build(cfg.algo, "algo")
    lora = cfg.model.lora
    if lora and d.on and strategy == "fsdp2":
        raise ConfigError("model.lora trains under one process or hardware.strategy=ddp; "
                          "FSDP2 shards the frozen base for nothing")
    policy, tokenizer = _load_policy(cfg, policy_cfg, run_dir, state, device)
    # One process: the update's backward in two phases (lower peak; see _PromptBoundary),
    # and a tied embedding's gradient sparse (no [vocab, hidden] zero-fill per pass).
    if not d.on:
        sparse_tied_embedding_grads(policy)
    tracker = _make_tracker(cfg, run_dir, state, task) if d.main else None
    sharded = d.on and strategy == "fsdp2"
    model, warm = None, {}
    if state is None and cfg.warm_start.steps > 0:
        if sharded and cfg.inference_backend.name == "hf":
            raise ConfigError("warm_start.steps > 0 under FSDP2 needs the vllm or sglang "
                              "engine (the hf engine copies the policy before it is sharded)"
                              "; or use hardware.strategy=ddp")
        model = dd.wrap(GroupLogprobs(policy, split_backward=not d.on), strategy, d, device)
        warm = warm_start(cfg, task, tokenizer, model, tracker, d)
        if lora:  # RL starts from the warm-started weights, with fresh adapters over them
            policy = lora_mod.add_adapters(policy.merge_and_unload(), lora)
            model = None
    ref = _reference(cfg, algo, policy, run_dir, state, device) if algo.uses_reference else None
    # The engine is built before sharding: an hf engine under FSDP2 keeps its own whole
    # copy (a sharded module cannot sample on one rank alone).
    extra = {"copy_model": True} if (cfg.inference_backend.name == "hf" and d.on
                                     and strategy == "fsdp2") else {}
    # Each engine samples its own stream; the ranks of one tensor-parallel vLLM engine
    # share a seed, as vLLM requires.
    engine_group = d.rank // int(cfg.inference_backend.get("tensor_parallel_size", 1))
    engine = build(cfg.inference_backend, "inference_backend", model=policy, tokenizer=tokenizer,
                   seed=cfg.seed + 1009 * engine_group, _convert_="partial", **extra)
    engine.progress = cfg.trainer.progress and d.main
    if model is None:
        model = dd.wrap(GroupLogprobs(policy, split_backward=not d.on), strategy, d, device)
    correction = resolve_correction(cfg.rollout.correction, engine)
    # Only what trains reaches the optimizer (with LoRA: the adapters).
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=algo.lr,
                      betas=tuple(cfg.trainer.adam_betas),
                      weight_decay=cfg.trainer.weight_decay, seed=cfg.seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    start_step = 0
    if state is not None:
        start_step = state["step"]
        ranks = state.get("ranks") or [{"rng": state["rng"], "engine": state["engine"]}]
        if len(ranks) != d.world:
            raise ConfigError(f"resume={run_dir}: the run used {len(ranks)} process(es); "
                              f"resume it with the same number, not {d.world}")
        dd.load_optimizer_state(model, optimizer, state["optimizer"], d)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(ranks[d.rank]["rng"])
        engine.load_state_dict(ranks[d.rank]["engine"])
        if d.main:
            log.info("resuming %s from step %d", run_dir, start_step)

    pad_id = tokenizer.pad_token_id
    if state is None:  # a new run: the RL start, evaluated and saved as step 0
        start = evaluate(engine, task, tokenizer, cfg, d)
        start["eval/accuracy_rl_start"] = start.get("eval/accuracy", 0.0)
        start.update(warm)
        # With LoRA after a warm start, the RL start is saved whole: its adapters were merged
        # into the base, and the RL adapters that later checkpoints hold apply to it.
        _, model_id = _save_checkpoint(run_dir, 0, cfg, model, policy, tokenizer, optimizer,
                                       scheduler, engine, tracker, d,
                                       whole=bool(lora) and cfg.warm_start.steps > 0)
        if d.main:
            tracker.log_metrics(start, 0, model_id)
            log.info("RL starts at eval accuracy %.3f (%d test problems)",
                     start["eval/accuracy_rl_start"], len(task.test_examples[:cfg.trainer.eval_examples]))
    sampling = Sampling(n=algo.group_size, temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                        stop=task.stop)
    source = RolloutSource(task, tokenizer, engine, sampling)
    last_ckpt = ckpt.latest_checkpoint(run_dir)
    status = "FAILED"
    # Steps done, their ETA, and the latest reward and accuracy; the step lines go above it.
    run_bar = bar(cfg.trainer.progress and d.main, total=cfg.trainer.max_steps,
                  initial=start_step, desc="RL", unit="step")
    shown_bars = not run_bar.disable
    try:
        with logging_redirect_tqdm(loggers=[log]) if shown_bars else contextlib.nullcontext():
            for step in range(start_step + 1, cfg.trainer.max_steps + 1):
                metrics, samples_table = train_step(step, cfg, source, policy, model, ref, algo,
                                                    optimizer, pad_id, d, correction)
                scheduler.step()
                if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 \
                        or step == cfg.trainer.max_steps:
                    t0 = time.perf_counter()
                    metrics.update(evaluate(engine, task, tokenizer, cfg, d))
                    metrics["perf/eval_s"] = time.perf_counter() - t0
                every = cfg.trainer.checkpoint_every
                stop = dd.all_reduce_max([float(_STOP["requested"])], d)[0] > 0  # all ranks agree
                model_id = None
                if (every and step % every == 0) or step == cfg.trainer.max_steps or stop:
                    last_ckpt, model_id = _save_checkpoint(run_dir, step, cfg, model, policy,
                                                           tokenizer, optimizer, scheduler,
                                                           engine, tracker, d)
                if d.main:
                    if tracker.log_metrics(metrics, step, model_id) and cfg.trainer.samples_every \
                            and step % cfg.trainer.samples_every == 0:
                        tracker.log_table(samples_table, f"samples/step_{step:06d}.json")
                    log.info(_step_line(step, cfg.trainer.max_steps, metrics))
                    run_bar.set_postfix_str(_bar_postfix(metrics), refresh=False)
                    run_bar.update()
                if stop and step < cfg.trainer.max_steps:
                    raise KeyboardInterrupt(f"stopped after step {step}")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        run_bar.close()
        engine.close()
        summary = _finish(tracker, cfg, run_dir, last_ckpt, status) if d.main else {
            "status": status, "run_dir": str(run_dir), "rank": d.rank}
    return summary


def _load_policy(cfg, policy_cfg, run_dir: Path, state, device):
    """The policy (with LoRA adapters when ``model.lora`` is set) and its tokenizer: the
    configured model for a new run; the latest checkpoint when resuming (with LoRA: the
    base, i.e. the RL start's whole weights if a warm start saved them, plus the saved
    adapters)."""
    lora = cfg.model.lora
    adapters = None
    if state is not None and lora_mod.has_adapters(policy_cfg.path):
        adapters = policy_cfg.path
        policy_cfg = _lora_base(cfg, run_dir)
    policy, tokenizer = load_model(policy_cfg, dtype=cfg.hardware.param_dtype)
    policy.to(device)
    _set_attention(policy, cfg.hardware.attn_implementation)
    if cfg.hardware.gradient_checkpointing:
        checkpoint_layers(policy, dd.decoder_layers(policy))
    if adapters is not None:
        policy = lora_mod.load_adapters(policy, adapters)
    elif lora:
        policy = lora_mod.add_adapters(policy, lora)
    return policy, tokenizer


def _lora_base(cfg, run_dir: Path):
    """The base a LoRA run's adapters apply to: the RL start's whole weights (saved as
    step_000000 when a warm start merged its adapters in), else the configured model."""
    start = Path(run_dir) / "checkpoints" / "step_000000" / "model"
    if (start / "config.json").is_file():
        return OmegaConf.create({"name": cfg.model.name, "source": "dir", "path": str(start)})
    return cfg.model


def _reference(cfg, algo, policy, run_dir: Path, state, device):
    """The frozen policy RL started from, for the KL term: with LoRA the policy itself with
    its adapters off; else a second model, the RL start (step_000000) when resuming."""
    if lora_mod.is_lora(policy):
        return lora_mod.AdapterOffLogprobs(GroupLogprobs(policy))
    start = Path(run_dir) / "checkpoints" / "step_000000" / "model"
    ref_cfg = cfg.model if state is None or not (start / "config.json").is_file() else \
        OmegaConf.create({"name": cfg.model.name, "source": "dir", "path": str(start)})
    if state is None and cfg.warm_start.steps > 0:
        ref_cfg = None  # the warm-started policy itself, copied below
    if ref_cfg is None:
        import copy
        ref_model = copy.deepcopy(policy)
    else:
        ref_model, _ = load_model(ref_cfg, dtype=cfg.hardware.param_dtype)
        _set_attention(ref_model, cfg.hardware.attn_implementation)
    return GroupLogprobs(ref_model.to(device).eval().requires_grad_(False))


def sync_engine(engine, policy) -> None:
    """Push the policy's weights to the engine (with LoRA: merged into the base's)."""
    if getattr(engine, "shares_policy", False):
        return  # the hf engine samples from the policy's own module
    with lora_mod.engine_weights(policy) as named:
        engine.update_weights(named)


def resolve_correction(node, engine) -> dict | None:
    """The engine/trainer mismatch correction to apply (``rollout.correction``), as keyword
    arguments of ``rollout_correction``; None when off. ``auto`` is off for an engine that
    samples with the trainer's own numerics (``hf``) and ``tis`` for the others."""
    mode = str(node.mode)
    if mode == "auto":
        mode = "off" if getattr(engine, "trainer_numerics", False) else "tis"
    if mode == "off":
        return None
    return {"mode": mode, "level": str(node.level), "cap": float(node.cap),
            "low": float(node.low), "high": float(node.high)}


def _set_attention(model, name: str | None) -> None:
    if not name:
        return
    try:
        model.set_attn_implementation(str(name))
    except (ValueError, ImportError) as e:
        raise ConfigError(f"hardware.attn_implementation={name}: {e}") from None


def _save_checkpoint(run_dir, step, cfg, model, policy, tokenizer, optimizer, scheduler,
                     engine, tracker, d: dd.Dist, whole: bool = False):
    """Every rank contributes (whole FSDP2 tensors are gathered); rank 0 writes it and
    registers it in MLflow as a logged model. Returns (its folder, the model id) on rank 0.
    ``whole``: a LoRA policy is saved with its adapters merged in, as a plain model."""
    model_state, optim_state = dd.full_state_dicts(model, optimizer, d)
    if whole:
        policy, model_state = lora_mod.merged_model(policy), None
    ranks = dd.gather_objects({"rng": ckpt.rng_state(), "engine": engine.state_dict()}, d)
    path = model_id = None
    if d.main:
        if model_state is not None:  # keys of GroupLogprobs(policy): drop its "model."
            model_state = {k.removeprefix("model."): v for k, v in model_state.items()}
        path = ckpt.save_checkpoint(
            run_dir, step, cfg, policy, tokenizer, optim_state, scheduler,
            {"mlflow_run_id": tracker.run_id, "ranks": ranks, "world_size": d.world},
            keep=cfg.trainer.keep_checkpoints, model_state=model_state)
        if cfg.tracking.log_models:
            model_id = tracker.log_checkpoint(step, path, {"algo": cfg.algo.name,
                                                           "model": cfg.model.name})
    dd.barrier(d)
    return path, model_id


def train_step(step, cfg, source: RolloutSource, policy, model, ref, algo, optimizer, pad_id,
               d: dd.Dist = dd.Dist(), correction: dict | None = None):
    """Rollout, reward, experience and update for one step on this rank's share of the
    prompts; returns (metrics of the whole job, this rank's samples table)."""
    task, engine = source.task, source.engine
    t_start = time.perf_counter()
    n_train = len(task.train_examples)
    idx = examples_for_step(n_train, cfg.trainer.prompts_per_step, cfg.seed, step)[d.rank::d.world]
    extra = iter(range(1, 1_000_000))
    source.extra_examples = lambda k: [task.train_examples[i] for i in examples_for_step(
        n_train, k, cfg.seed + 7919 * next(extra) + 104_729 * d.rank, step)]

    t0 = time.perf_counter()
    ro = source.collect([task.train_examples[i] for i in idx])
    release_free_memory()
    rollout_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples, metrics = algo.make_samples(ro, source)
    release_free_memory()
    experience_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    job_wide = {}  # update's metrics, reduced over ranks already
    if dd.all_reduce_sum([float(len(samples))], d)[0] > 0:
        engine.sleep()
        job_wide = update(model, ref, algo, samples, cfg, optimizer, pad_id, step, d, correction)
        engine.wake_up()
        t1 = time.perf_counter()
        sync_engine(engine, policy)
        metrics["perf/weight_sync_s"] = time.perf_counter() - t1
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
        **collapse_metrics(ro, task),
        "train/response_length": float(np.mean(lengths)),
        "train/truncated_frac": float(np.mean(truncated)),
        "train/lr": optimizer.param_groups[0]["lr"],
        "perf/rollout_s": rollout_s, "perf/experience_s": experience_s, "perf/update_s": update_s,
        "perf/step_s": step_s,
        # the share of the step spent building experience (VinePPO: value estimation)
        "perf/experience_frac": experience_s / max(step_s, 1e-9),
        "perf/gen_tokens_per_s": sum(lengths) / max(rollout_s, 1e-9),
    })
    metrics.update({f"train/shaping/{k}_mean": v.mean().item() for k, v in ro.shaping.items()})
    metrics = dd.reduce_metrics(metrics, d)
    metrics.update(job_wide)
    table = {"prompt": [], "completion": [], "reward": [], "correct": [], "finish_reason": []}
    for g, group in enumerate(ro.groups):
        for j, c in enumerate(group):
            table["prompt"].append(task.messages(ro.examples[g])[-1]["content"])
            table["completion"].append(task.prefill + c.text)
            table["reward"].append(ro.rewards[g, j].item())
            table["correct"].append(bool(ro.correct[g, j]))
            table["finish_reason"].append(c.finish_reason)
    return metrics, table


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


def _lr_lambda(cfg):
    warmup, total, kind = cfg.trainer.warmup_steps, cfg.trainer.max_steps, cfg.trainer.lr_schedule
    if kind not in ("constant", "cosine", "linear"):
        raise ConfigError(f"trainer.lr_schedule={kind!r}; use constant, cosine or linear")

    def factor(done: int) -> float:  # ``done`` training steps taken so far
        if warmup and done < warmup:
            return (done + 1) / warmup
        progress = min(1.0, (done - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def _bar_postfix(m: dict) -> str:
    text = f"reward {m['train/reward_mean']:.2f} acc {m['train/accuracy']:.2f}"
    if "eval/accuracy" in m:
        text += f" eval acc {m['eval/accuracy']:.2f}"
    return text


def _step_line(step: int, total: int, m: dict) -> str:
    line = (f"step {step}/{total} | reward {m['train/reward_mean']:.3f} "
            f"acc {m['train/accuracy']:.2f} | distinct {m['train/distinct_completions']:.2f}"
            f" | len {m['train/response_length']:.0f} | rollout {m['perf/rollout_s']:.1f}s "
            + (f"values {m['perf/experience_s']:.1f}s " if m["perf/experience_s"] > 0.5 else "")
            + f"update {m['perf/update_s']:.1f}s | {m['perf/gen_tokens_per_s']:.0f} tok/s")
    if "eval/reward_mean" in m:
        line += f" | eval reward {m['eval/reward_mean']:.3f} acc {m['eval/accuracy']:.2f}"
    return line


# ----------------------------------------------------------------------------------------
# Run folder, resume, tracking, summary
# ----------------------------------------------------------------------------------------

def _prepare_run(cfg: DictConfig, run_dir, d: dd.Dist = dd.Dist()):
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
    # Ranks started a moment apart may name different folders: rank 0's is the run's.
    run_dir = Path(dd.broadcast_object(str(run_dir), d))
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


def _make_tracker(cfg, run_dir: Path, state, task) -> Tracker:
    uri = cfg.tracking.uri or default_tracking_uri(cfg.paths.outputs)
    if state is not None:
        tracker = Tracker(uri, cfg.tracking.experiment, run_id=state["mlflow_run_id"])
        tracker.start_system_metrics(cfg.tracking.system_metrics_interval, resume=True)
        return tracker
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
    tracker.log_datasets(task.datasets())
    tracker.start_system_metrics(cfg.tracking.system_metrics_interval)
    return tracker


def _finish(tracker: Tracker, cfg, run_dir: Path, last_ckpt, status: str) -> dict:
    history = tracker.history("train/reward_mean")
    rewards = [v for _, v in sorted(history)]
    first5 = float(np.mean(rewards[:5])) if rewards else float("nan")
    last5 = float(np.mean(rewards[-5:])) if rewards else float("nan")
    accuracy = sorted(tracker.history("eval/accuracy"))  # (step, value), step 0: the RL start
    if rewards:
        png = _plot_rewards(tracker, run_dir)
        tracker.log_artifact(png)
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


def _plot_rewards(tracker: Tracker, run_dir: Path) -> Path:
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


# Set by the first SIGTERM or Ctrl-C; the loop stops at the end of the step it is in.
_STOP = {"requested": False}


def _request_stop(signum, frame):
    """First signal: finish this step, checkpoint and stop (a signal in the middle of an
    MLflow write would leave its SQLite store locked and the run marked RUNNING).
    Second signal: stop at once."""
    if _STOP["requested"]:
        raise KeyboardInterrupt(f"signal {signum}")
    _STOP["requested"] = True
    log.warning("signal %d: stopping after this step (send it again to stop at once)", signum)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # A scheduler's SIGTERM (SLURM preemption, `kill`) ends the run like Ctrl-C, after the
    # current step and a checkpoint (see _request_stop): the MLflow
    # run is marked KILLED and `resume=` continues it from the last checkpoint.
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    try:
        train(cfg)
    except (NanovppoError, InstantiationException) as e:
        # Bad input (config, model path, dataset): say what is wrong, not where it broke.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
