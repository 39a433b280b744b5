"""From a step's samples to the tensors of the update: minibatches, micro-batches, padding.

Which prompts a step trains on is ``examples_for_step``. Then three levels, as in every
PPO-style trainer:

- ``split_groups``: a step's samples dealt into ``algo.num_minibatches`` minibatches (one
  optimizer step each), whole groups at a time, the same on every rank;
- ``micro_batches``: a minibatch packed into forward/backward passes of at most
  ``trainer.micro_batch_size`` sequences, whole groups again (a prompt runs once for its
  group), similar lengths together;
- ``collate``: one micro-batch as a ``MicroBatch`` of [b, C] tensors (advantages, loss mask,
  old/reference/engine log-probs) for ``algo.loss``.

Under torchrun, ``pad_to_busiest`` adds empty micro-batches so every rank makes the same
forward, backward and collective calls.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

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


def pad_to_busiest(lists: list[list[list[Sample]]], d: dd.Dist) -> list[list[list[Sample]]]:
    """Each list of micro-batches lengthened with empty ones to the longest any rank has,
    so that every rank makes the same forward/backward (and collective) calls."""
    most = dd.all_reduce_max([float(len(b)) for b in lists], d)
    return [b + [[]] * (int(m) - len(b)) for b, m in zip(lists, most)]


def normalisers(minibatch: list[Sample], mask_truncated: bool, d: dd.Dist) -> tuple[float, float]:
    """The loss tokens and sequences of a minibatch, summed over all ranks: every loss
    divides by them (the loss is then scaled by the world size, because the ranks average
    their gradients; module doc of nanovppo/distributed.py)."""
    kept = [s for s in minibatch if not (mask_truncated and s.truncated)]
    tokens, seqs = dd.all_reduce_sum([float(sum(len(s.completion_ids) for s in kept)),
                                      float(sum(1 for s in kept if s.completion_ids))], d)
    return max(1.0, tokens), max(1.0, seqs)


class MicroBatch(NamedTuple):
    """What the loss needs of one micro-batch besides the current log-probs; [b, C] each,
    C the widest completion, zero past a completion's end."""

    advantages: torch.Tensor
    mask: torch.Tensor                  # 1 on tokens that carry loss
    old_logp: torch.Tensor | None       # the sampling policy's (None: the current, detached)
    ref_logp: torch.Tensor | None       # the KL reference's (None: no KL term)
    engine_logp: torch.Tensor | None    # the engine's (None if any sample lacks them)


def collate(mb: list[Sample], mask_truncated: bool) -> MicroBatch:
    """A micro-batch's samples as tensors (see ``MicroBatch``)."""
    width = max([1] + [len(s.completion_ids) for s in mb])
    adv, mask = torch.zeros(len(mb), width), torch.zeros(len(mb), width)
    for r, s in enumerate(mb):
        n = len(s.completion_ids)
        if isinstance(s.advantage, (int, float)):
            adv[r, :n] = float(s.advantage)
        else:  # one advantage per token
            adv[r, :len(s.advantage)] = torch.tensor(s.advantage, dtype=torch.float32)
        if not (mask_truncated and s.truncated):
            mask[r, :n] = 1.0
    engine = None
    if mb and all(s.engine_logprobs is not None and len(s.engine_logprobs) == len(s.completion_ids)
                  for s in mb):
        engine = _rows([torch.tensor(s.engine_logprobs, dtype=torch.float32) for s in mb], width)
    old = _rows([s.old_logprobs for s in mb], width) if mb and mb[0].old_logprobs is not None else None
    ref = _rows([s.ref_logprobs for s in mb], width) if mb and mb[0].ref_logprobs is not None else None
    return MicroBatch(adv, mask, old, ref, engine)


def _rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """[len(rows), width] of right-padded 1-d tensors."""
    out = torch.zeros(len(rows), width)
    for r, row in enumerate(rows):
        out[r, :len(row)] = row
    return out
