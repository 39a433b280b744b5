"""From a step's samples to the tensors of the update: the batch, minibatches, micro-batches.

Which prompts a step trains on is ``examples_for_step``. The update turns the algorithm's
samples into one ``TrainBatch`` of [N, C] tensors (a row per sample), once per step; then
three levels of row indices, as in every PPO-style trainer:

- ``split_groups``: the rows dealt into ``algo.num_minibatches`` minibatches (one optimizer
  step each), whole groups at a time, the same on every rank;
- ``micro_batches``: a minibatch packed into forward/backward passes of at most
  ``trainer.micro_batch_size`` sequences, whole groups where they fit (a prompt runs once
  for the rows of its group in a pass), a larger group split into pieces, similar lengths
  together;
- ``TrainBatch.micro``: one micro-batch's rows sliced out as a ``MicroBatch`` of [b, C]
  tensors (advantages, loss mask, old/reference/engine log-probs) for ``algo.loss``.

Under torchrun, ``pad_to_busiest`` adds empty micro-batches so every rank makes the same
forward, backward and collective calls.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
import torch

from nanovppo import distributed as dd
from nanovppo.rollout import Sample


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


def refill_stream(examples: list[dict], seed: int, rank: int):
    """DAPO's source of fresh prompts: for a step's ``call``-th refill, ``k`` examples from
    a stream of their own (a pure function of seed, rank, step and call, like the step's)."""

    def more_examples(step: int, k: int, call: int) -> list[dict]:
        stream = seed + 7919 * call + 104_729 * rank
        return [examples[i] for i in examples_for_step(len(examples), k, stream, step)]

    return more_examples


class MicroBatch(NamedTuple):
    """What the loss needs of one micro-batch besides the current log-probs; [b, C] each,
    C the widest completion, zero past a completion's end."""

    advantages: torch.Tensor
    mask: torch.Tensor                  # 1 on tokens that carry loss
    old_logp: torch.Tensor | None       # the sampling policy's (None: the current, detached)
    ref_logp: torch.Tensor | None       # the KL reference's (None: no KL term)
    engine_logp: torch.Tensor | None    # the engine's (None if no sample has them)
    engine_rows: torch.Tensor | None    # [b, 1] 1 on rows the engine sampled (a task's
    #                                     demonstration was not: algo.demonstrations)


@dataclass
class TrainBatch:
    """A step's samples as the update sees them, built once (``from_samples``): row i is
    sample i; tensors are [N, C], C the longest completion, zero past each one's end.
    Minibatches and micro-batches are lists of rows."""

    prompt_ids: list[list[int]]         # per row
    completion_ids: list[list[int]]     # per row
    group: list[int]                    # per row: the prompt it answers
    loss_tokens: list[int]              # per row: tokens that carry loss (0: masked out)
    trains: list[bool]                  # per row: carries a gradient (else skippable)
    advantages: torch.Tensor            # [N, C] (GRPO's one per sequence, repeated)
    mask: torch.Tensor                  # [N, C] 1 on tokens that carry loss
    engine_logp: torch.Tensor           # [N, C] the engine's log-probs (0 where absent)
    has_engine: list[bool]              # per row: the engine reported every token's
    old_logp: torch.Tensor | None = None  # [N, C] the sampling policy's (set by the update)
    ref_logp: torch.Tensor | None = None  # [N, C] the KL reference's (set by the update)

    @classmethod
    def from_samples(cls, samples: list[Sample], mask_truncated: bool,
                     carries_gradient: Callable[[Sample], bool]) -> "TrainBatch":
        width = max([1] + [len(s.completion_ids) for s in samples])
        adv, mask = torch.zeros(len(samples), width), torch.zeros(len(samples), width)
        engine, has_engine = torch.zeros(len(samples), width), []
        for r, s in enumerate(samples):
            n = len(s.completion_ids)
            if isinstance(s.advantage, (int, float)):
                adv[r, :n] = float(s.advantage)
            else:  # one advantage per token
                adv[r, :len(s.advantage)] = torch.tensor(s.advantage, dtype=torch.float32)
            if not (mask_truncated and s.truncated):
                mask[r, :n] = 1.0
            has_engine.append(s.engine_logprobs is not None and len(s.engine_logprobs) == n)
            if has_engine[-1]:
                engine[r, :n] = torch.tensor(s.engine_logprobs, dtype=torch.float32)
        return cls([s.prompt_ids for s in samples], [s.completion_ids for s in samples],
                   [s.group for s in samples], [int(m.sum()) for m in mask],
                   [carries_gradient(s) for s in samples], adv, mask, engine, has_engine)

    def with_advantages_of(self, samples: list[Sample], mask_truncated: bool,
                           carries_gradient: Callable[[Sample], bool]) -> "TrainBatch":
        """The same batch (log-probs kept) with the samples' advantages as they are now."""
        new = TrainBatch.from_samples(samples, mask_truncated, carries_gradient)
        return replace(new, old_logp=self.old_logp, ref_logp=self.ref_logp)

    def per_row(self, values: torch.Tensor | None) -> list[torch.Tensor] | None:
        """[N, C] -> each row's [C_i] (its completion's length)."""
        if values is None:
            return None
        return [values[i, :len(c)] for i, c in enumerate(self.completion_ids)]

    def micro(self, rows: list[int]) -> MicroBatch:
        """The rows' tensors, cut to their longest completion (see ``MicroBatch``)."""
        width = max([1] + [len(self.completion_ids[i]) for i in rows])
        cut = lambda t: None if t is None else t[rows, :width]  # noqa: E731
        has = torch.tensor([[float(self.has_engine[i])] for i in rows])       # [b, 1]
        engine = cut(self.engine_logp) if rows and has.any() else None
        return MicroBatch(cut(self.advantages), cut(self.mask), cut(self.old_logp),
                          cut(self.ref_logp), engine, has if engine is not None else None)


def split_groups(groups: list[int], parts: int, rng: random.Random,
                 d: dd.Dist = dd.Dist()) -> list[list[int]]:
    """Shuffle the groups and deal the rows (``groups[i]``: row i's group) into ``parts``
    minibatches (a group is never split; with fewer groups than parts some minibatches are
    empty).

    Under torchrun rank r's group g is the job's group g * world + r (the prompts of a step
    are dealt round-robin), and all ranks shuffle the job's groups with the same ``rng``:
    a minibatch holds the same groups as it would in one process.
    """
    local = sorted(set(groups))
    glob = {g: g * d.world + d.rank for g in local}
    n = int(dd.all_reduce_max([float(max(glob.values(), default=-1) + 1)], d)[0])
    order = list(range(n))
    rng.shuffle(order)
    position = {g: i for i, g in enumerate(order)}
    per = max(1, math.ceil(n / parts))
    part_of = {g: min(position[glob[g]] // per, parts - 1) for g in local}
    return [[i for i, g in enumerate(groups) if part_of[g] == p] for p in range(parts)]


def micro_batches(batch: TrainBatch, rows: list[int], size: int) -> list[list[int]]:
    """Pack the rows into micro-batches of at most ``size`` sequences: whole groups where
    they fit, groups of similar length together so little padding is computed. A group of
    more than ``size`` rows is cut into pieces of ``size`` (its rows by length, so each
    piece pads little), each piece a micro-batch with its own pass over the prompt: the
    size bounds a pass's activations whatever the group size (the bench's groups of 16
    in passes of 8: peak 3.45 -> 3.16 GB, update 19% longer; docs/results.md)."""
    groups: dict[int, list[int]] = {}
    for i in rows:
        groups.setdefault(batch.group[i], []).append(i)
    completion = lambda i: len(batch.completion_ids[i])  # noqa: E731
    length = lambda g: len(batch.prompt_ids[g[0]]) + max(map(completion, g))  # noqa: E731
    out: list[list[int]] = []
    for g in sorted(groups.values(), key=length):
        if len(g) > size:  # pieces of one group (a later group may join the last, shorter one)
            g = sorted(g, key=completion)
            out.extend(g[k:k + size] for k in range(0, len(g), size))
        elif out and len(out[-1]) + len(g) <= size:
            out[-1].extend(g)
        else:
            out.append(list(g))
    return out


def pad_to_busiest(lists: list[list[list[int]]], d: dd.Dist) -> list[list[list[int]]]:
    """Each list of micro-batches lengthened with empty ones to the longest any rank has,
    so that every rank makes the same forward/backward (and collective) calls."""
    most = dd.all_reduce_max([float(len(b)) for b in lists], d)
    return [b + [[]] * (int(m) - len(b)) for b, m in zip(lists, most)]


def normalisers(batch: TrainBatch, rows: list[int], d: dd.Dist) -> tuple[float, float]:
    """The loss tokens and sequences of a minibatch, summed over all ranks: every loss
    divides by them (the loss is then scaled by the world size, because the ranks average
    their gradients; module doc of nanovppo/distributed.py)."""
    tokens, seqs = dd.all_reduce_sum([float(sum(batch.loss_tokens[i] for i in rows)),
                                      float(sum(1 for i in rows if batch.loss_tokens[i]))], d)
    return max(1.0, tokens), max(1.0, seqs)
