"""The update: one step's optimisation of the policy over its scored samples.

    batch = TrainBatch of the samples ([N, C] advantages, loss mask, engine log-probs)
    old (and reference) log-probs of every row, unless the policy has not moved
    for each PPO epoch (algo.ppo_epochs):
        for each minibatch (algo.num_minibatches; one optimizer step each):
            for each micro-batch (trainer.micro_batch_size sequences):
                log-probs of the completions under the current policy
                loss = algo.loss(log-probs, old log-probs, reference log-probs, advantages)
                loss.backward()            # gradients accumulate over the minibatch
            clip the gradient norm; optimizer.step()

The speed work (``trainer.fast``: a prompt run once for its group, no separate forward for
the old log-probs when the policy has not moved, rows without a gradient skipped, one
autocast region a minibatch, memory kept for reuse) and the distributed switch are
``nanovppo.fast``'s answers; this module asks them and reads the same either way.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from nanovppo import distributed as dd
from nanovppo import fast
from nanovppo.algos.losses import mismatch_stats, rollout_correction
from nanovppo.algos.pg import LossBatch
from nanovppo.batching import TrainBatch, micro_batches, normalisers, pad_to_busiest, split_groups
from nanovppo.logprobs import pad_groups
from nanovppo.models import autocast_ctx, no_autocast
from nanovppo.progress import bar
from nanovppo.rollout import Sample


def micro_logprobs(model, batch: TrainBatch, rows: list[int], pad_id: int, cfg,
                   temperature: float, with_entropy=False):
    """Log-probs [b, C] of a micro-batch's rows (entropy too if asked) and its padded batch.

    An empty micro-batch stands for a rank that has less work than the others: it runs a
    one-token forward so that every rank makes the same collective calls.
    """
    prompts, completions, seen = [], [], {}
    for i in rows:  # rows of a group are adjacent (see micro_batches)
        if batch.group[i] not in seen:
            seen[batch.group[i]] = len(prompts)
            prompts.append(batch.prompt_ids[i])
            completions.append([])
        completions[seen[batch.group[i]]].append(batch.completion_ids[i])
    if rows:
        padded = pad_groups(prompts, completions, pad_id)
    else:  # one pad token as prompt and completion, masked out
        padded = pad_groups([[pad_id]], [[[pad_id]]], pad_id)
        padded = padded._replace(completion_mask=torch.zeros_like(padded.completion_mask))
    with autocast_ctx(cfg):
        out = model(padded, temperature, cfg.trainer.logprob_chunk_tokens, with_entropy)
    return out, padded


@torch.no_grad()
def probe_logprobs(model, ids: list[int], cfg, pad_id: int) -> torch.Tensor:
    """[T - 1] log-probs of ``ids[1:]`` at temperature 1 under ``model`` (a log-prob
    module), each given the tokens before it: the trainer's side of the weight-sync check."""
    batch = pad_groups([ids[:1]], [[ids[1:]]], pad_id)
    with autocast_ctx(cfg):
        logp = model(batch, 1.0, cfg.trainer.logprob_chunk_tokens, False)        # [1, T - 1]
    return logp[0, :len(ids) - 1]


@torch.no_grad()
def batch_logprobs(model, batch: TrainBatch, pad_id, cfg, d: dd.Dist, temperature) -> torch.Tensor:
    """[N, C] log-probs of every row's completion under ``model`` (the sampling policy's
    or the KL reference's), zero past each completion's end."""
    out = torch.zeros_like(batch.mask)
    [micro] = pad_to_busiest([micro_batches(batch, list(range(len(batch.group))),
                                            cfg.trainer.micro_batch_size)], d)
    for rows in micro:
        logp, _ = micro_logprobs(model, batch, rows, pad_id, cfg, temperature)
        for r, i in enumerate(rows):
            n = len(batch.completion_ids[i])
            out[i, :n] = logp[r, :n]
    return out


def plan(batch: TrainBatch, algo, cfg, step: int, d: dd.Dist):
    """The micro-batches (lists of rows) of each minibatch of each epoch, each minibatch's
    loss normalisers (its loss tokens and sequences over all ranks), and the loss tokens of
    all epochs. Only the rows ``fast.trains`` picks are forwarded."""
    rng = random.Random(cfg.seed * 1_000_003 + step)  # the same on every rank
    epochs = [split_groups(batch.group, algo.num_minibatches, rng, d)
              for _ in range(algo.ppo_epochs)]
    norms = [[normalisers(batch, mb, d) for mb in epoch] for epoch in epochs]
    loss_tokens = float(sum(batch.loss_tokens[i] for epoch in epochs for mb in epoch for i in mb))
    keep = fast.trains(batch, cfg)
    batches = [[micro_batches(batch, [i for i in mb if keep(i)], cfg.trainer.micro_batch_size)
                for mb in epoch] for epoch in epochs]
    if d.on:  # every rank runs as many micro-batches as the busiest one (empty ones pad)
        flat = pad_to_busiest([b for epoch in batches for b in epoch], d)
        batches = [flat[e * algo.num_minibatches:(e + 1) * algo.num_minibatches]
                   for e in range(algo.ppo_epochs)]
    return batches, norms, loss_tokens


def update(model, ref, algo, samples: list[Sample], cfg, optimizer, pad_id: int, step: int,
           d: dd.Dist = dd.Dist(), correction: dict | None = None) -> dict:
    """One training step's optimisation over this rank's scored samples; returns metrics
    for the whole job (already reduced over ranks). ``model`` and ``ref`` are
    ``logprob_module``s; ``correction`` the engine/trainer mismatch correction
    (``resolve_correction``; None: off)."""
    temperature = algo.loss_temperature(cfg.rollout.temperature)
    acc = _Accumulators()
    with fast.phase(cfg, low_memory=bool(cfg.hardware.low_memory)) as mem:  # memory peaks here
        t0 = time.perf_counter()
        batch = TrainBatch.from_samples(samples, algo.mask_truncated, algo.carries_gradient)
        # PPO's "old" log-probs: the sampling policy's (if not computed here, the current
        # ones, detached: the policy has not moved since it sampled)
        if fast.needs_old_logprobs(algo, cfg):
            batch.old_logp = batch_logprobs(model, batch, pad_id, cfg, d, temperature)
        if ref is not None:
            batch.ref_logp = batch_logprobs(ref, batch, pad_id, cfg, d, temperature)
        acc.perf["forward_s"] += time.perf_counter() - t0
        if algo.kl_in_reward:  # REINFORCE++ folds the KL into its returns
            algo.fold_kl(samples, batch.per_row(batch.old_logp), batch.per_row(batch.ref_logp))
            batch = batch.with_advantages_of(samples, algo.mask_truncated, algo.carries_gradient)

        epochs, norms, acc.totals["tokens"] = plan(batch, algo, cfg, step, d)
        trained = sum(len(micro) for minibatch in epochs[0] for micro in minibatch)
        acc.totals["samples"] = float(len(samples))
        acc.totals["skipped_samples"] = float(len(samples) - trained)
        progress = bar(cfg.trainer.progress and d.main, desc="update", unit="micro-batch",
                       total=sum(len(b) for epoch in epochs for b in epoch), leave=False)
        model.train()
        for epoch, minibatches in enumerate(epochs):
            for batches, (n_tokens, n_seqs) in zip(minibatches, norms[epoch]):
                optimizer.zero_grad(set_to_none=True)
                with fast.minibatch(model, cfg):
                    for i, rows in enumerate(batches):
                        with fast.grad_sync(model, on=i == len(batches) - 1):
                            _micro_step(model, batch, rows, algo, cfg, pad_id, temperature,
                                        epoch, n_tokens, n_seqs, correction, d, acc)
                        mem.trim()  # low_memory: the micro-batch's activations, now freed
                        progress.update()
                _optimizer_step(model, optimizer, cfg, acc)
        progress.close()
        optimizer.zero_grad(set_to_none=True)
    return acc.metrics(algo, d)


def _micro_step(model, batch: TrainBatch, rows: list[int], algo, cfg, pad_id, temperature,
                epoch, n_tokens, n_seqs, correction, d: dd.Dist, acc: "_Accumulators") -> None:
    """Forward, loss and backward of one micro-batch (``rows`` of ``batch``); its figures
    go to ``acc``."""
    t0 = time.perf_counter()
    # Entropy is reported for the first pass over the samples only.
    out, padded = micro_logprobs(model, batch, rows, pad_id, cfg, temperature,
                                 with_entropy=epoch == 0)
    logp, ent = out if epoch == 0 else (out, None)
    if not rows:  # a padding micro-batch: the same collectives, no gradient
        with no_autocast(cfg):
            (logp.sum() * 0.0).backward()
        return
    t = batch.micro(rows)                                                 # [b, C] each
    old_logp = logp.detach() if t.old_logp is None else t.old_logp
    weight = torch.ones_like(t.mask)
    # The engine's log-probs are at the sampling temperature; RFT's loss takes them at 1:
    # then the two are not comparable, and neither the mismatch nor a correction is made.
    comparable = temperature == float(cfg.rollout.temperature)
    if t.engine_logp is not None and comparable:
        # A row the engine did not sample (a demonstration) counts as sampled by the
        # current policy: no mismatch measured, a correction weight of 1.
        engine_logp = torch.where(t.engine_rows.bool(), t.engine_logp, old_logp)
        if epoch == 0:  # how far the sampler is from the trainer
            sampled = t.mask * t.engine_rows
            m = mismatch_stats(old_logp, engine_logp, sampled)
            acc.totals["mismatch_k3_tokens"] += m["mismatch_k3_tokens"]
            acc.totals["engine_tokens"] += sampled.sum().item()
            acc.mismatch_max = max(acc.mismatch_max, m["mismatch_max_abs"])
        if correction:
            weight, touched = rollout_correction(old_logp, engine_logp, t.mask, **correction)
            acc.totals["corrected_tokens"] += touched if epoch == 0 else 0.0
    with no_autocast(cfg):  # the loss and its backward in fp32
        loss, stats = algo.loss(LossBatch(logp, old_logp, t.ref_logp, t.advantages, t.mask,
                                          weight, n_tokens, n_seqs, cfg.rollout.max_new_tokens))
        t1 = time.perf_counter()
        (loss * d.world).backward()  # the ranks average gradients; the loss is a sum's share
    acc.perf["forward_s"] += t1 - t0
    acc.perf["backward_s"] += time.perf_counter() - t1
    acc.perf["tokens"] += padded.prompt_ids.numel() + padded.completion_ids.numel()
    acc.perf["head_tokens"] += padded.completion_mask.sum().item()
    acc.totals["loss"] += loss.item()
    acc.totals["clip_tokens"] += stats["clip_tokens"]
    acc.totals["kl_tokens"] += stats["kl_tokens"]
    if epoch == 0:  # over the loss's tokens (truncated ones out where masked) of samples
        # that carry a gradient: the same set on the plain and the fast path, which skips
        # the others
        trained = torch.tensor([float(batch.trains[i]) for i in rows])[:, None]       # [b, 1]
        mask = t.mask * trained                                                       # [b, C]
        acc.totals["entropy_tokens"] += (ent.float() * mask).sum().item()
        acc.totals["entropy_count"] += mask.sum().item()


def _optimizer_step(model, optimizer, cfg, acc: "_Accumulators") -> None:
    t0 = time.perf_counter()
    clip = cfg.trainer.max_grad_norm
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    acc.grad_norms.append(norm.item())
    optimizer.step()
    acc.perf["optimizer_s"] += time.perf_counter() - t0


class _Accumulators:
    """Sums over an update's micro-batches, reduced over ranks at the end."""

    def __init__(self):
        self.totals = {"loss": 0.0, "clip_tokens": 0.0, "kl_tokens": 0.0, "entropy_tokens": 0.0,
                       "tokens": 0.0, "entropy_count": 0.0, "mismatch_k3_tokens": 0.0,
                       "engine_tokens": 0.0, "corrected_tokens": 0.0, "samples": 0.0,
                       "skipped_samples": 0.0}
        # Where the update's time goes, and the work of its forward passes (for FLOP/s):
        # the tokens the decoder ran and the positions the output head scored.
        self.perf = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0, "tokens": 0.0,
                     "head_tokens": 0.0}
        self.grad_norms: list[float] = []
        self.mismatch_max = 0.0

    def metrics(self, algo, d: dd.Dist) -> dict:
        keys = sorted(self.totals)
        totals = dict(zip(keys, dd.all_reduce_sum([self.totals[k] for k in keys], d)))
        perf = dict(zip(self.perf, dd.all_reduce_max(list(self.perf.values()), d)))  # slowest rank
        tokens = max(totals["tokens"], 1.0)  # clip and KL fractions count every loss token
        updates = max(1, algo.ppo_epochs * algo.num_minibatches)
        out = {"train/loss": totals["loss"] / updates,
               "train/clip_frac": totals["clip_tokens"] / tokens,
               "train/kl": totals["kl_tokens"] / tokens,
               "train/entropy": totals["entropy_tokens"] / max(totals["entropy_count"], 1.0),
               "train/grad_norm": float(np.mean(self.grad_norms)),
               # samples not forwarded: their loss is exactly 0 (zero advantage, no KL)
               "train/skipped_samples_frac": totals["skipped_samples"] / max(totals["samples"], 1.0),
               **{f"perf/update_{k}": v for k, v in perf.items()}}
        if totals["engine_tokens"]:  # the engine reported log-probs
            engine_tokens = totals["engine_tokens"]
            out["train/mismatch_k3"] = totals["mismatch_k3_tokens"] / engine_tokens
            out["train/mismatch_max_abs"] = dd.all_reduce_max([self.mismatch_max], d)[0]
            out["train/mismatch_corrected_frac"] = totals["corrected_tokens"] / engine_tokens
        return out


def resolve_correction(node, engine) -> dict | None:
    """The engine/trainer mismatch correction to apply (``rollout.correction``), as keyword
    arguments of ``rollout_correction``; None when off. ``auto`` is off for an engine that
    samples with the trainer's own numerics (``hf``) and ``tis`` for the others."""
    mode = str(node.mode)
    if mode == "auto":
        mode = "off" if engine.trainer_numerics else "tis"
    if mode == "off":
        return None
    return {"mode": mode, "level": str(node.level), "cap": float(node.cap),
            "low": float(node.low), "high": float(node.high)}
