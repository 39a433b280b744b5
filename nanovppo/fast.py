"""Every speed, memory and distributed switch of the step, in one place.

``trainer.fast`` (conf/config.yaml) turns the speed work on; ``trainer.fast=false`` is the
plain path, the one to read first (tests/test_update_reference.py checks that both give the
same update as a naive loop). ``step.py`` and ``update.py`` ask this module what to do and
never read the switch themselves:

=========================  =========================================  ======================
question                   fast                                       plain
=========================  =========================================  ======================
``logprob_module``         one pass over the real tokens of prompts   full-vocabulary
                           and completions (``packed``; not under     log-softmax over each
                           FSDP2), in one process with a sparse       sequence on its own
                           tied-embedding gradient and the weights'
                           gradients added in place; else a prompt
                           run once for its group; only completion
                           tokens scored, in chunks
``needs_old_logprobs``     no forward when the policy has not moved   a forward of its own
                           since sampling (one epoch, one minibatch)
``trains``                 only rows that carry a gradient            every row
``minibatch``              one autocast region a minibatch: the       one a micro-batch
                           weights' bf16 casts made once
``phase``                  freed pages reused within the phase and    glibc's default
                           handed back at its end (low_memory: after
                           each micro-batch)
=========================  =========================================  ======================

``grad_sync`` is the distributed switch: only a minibatch's last backward pass reduces
gradients across ranks (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``).
"""

from __future__ import annotations

import contextlib

import torch

from nanovppo import memory
from nanovppo.head import reuse_head_cast, sparse_tied_embedding_grads
from nanovppo.logprobs import GroupLogprobs, PlainLogprobs
from nanovppo.packed import PackedLogprobs, supports
from nanovppo.models import autocast_ctx


def logprob_module(policy, fast: bool, strategy: str | None = None,
                   fused: bool = False) -> torch.nn.Module:
    """The module whose forward gives a micro-batch's completion log-probs (the trainer
    wraps it, not the policy, in DDP or FSDP2). ``strategy``: None in one process, else the
    torchrun job's ``hardware.strategy`` (``ddp`` | ``fsdp2``) that trains the module.
    ``fused``: on the fast path, its elementwise work compiled (``trainer.fused_kernels``,
    ``nanovppo/kernels.py``)."""
    if not fast:
        return PlainLogprobs(policy)
    if strategy == "fsdp2":  # FSDP2 gathers a layer's weights in that layer's own forward
        return GroupLogprobs(policy, fused=fused)
    if strategy is None:  # a sparse gradient: one process only (DDP reduces dense ones)
        sparse_tied_embedding_grads(policy)
    if supports(policy):  # in one process each weight's gradient is accumulated in place
        return PackedLogprobs(policy, grads_in_place=strategy is None, fused=fused)
    # Its backward in two parts: one process only (DDP reduces a micro-batch's gradients in
    # one backward pass)
    return GroupLogprobs(policy, split_backward=strategy is None, fused=fused)


def needs_old_logprobs(algo, cfg) -> bool:
    """Whether the update computes PPO's "old" log-probs (the sampling policy's) with a
    forward pass of their own. With one pass and one minibatch the policy has not moved
    since sampling, so on the fast path they are the current ones, detached; not when the
    advantages need them before the update (REINFORCE++ folds the KL into its returns)."""
    moved = algo.ppo_epochs > 1 or algo.num_minibatches > 1
    return not cfg.trainer.fast or moved or algo.kl_in_reward


def trains(batch, cfg):
    """Which rows of ``batch`` the update forwards: on the fast path only those that carry
    a gradient (without a KL term a completion whose advantage is 0 on every token, in a
    group whose samples all scored the same, has a loss and gradient of exactly 0)."""
    if cfg.trainer.fast:
        return lambda i: batch.trains[i]
    return lambda i: True


def minibatch(model, cfg):
    """The region around a minibatch's micro-batches. On the fast path one autocast region:
    autocast keeps the casts of leaf weights until its outermost region ends, so the fp32
    weights are cast to bf16 once per minibatch instead of once per micro-batch (and again
    in checkpointed recomputes); the output head's cast is kept the same way. Not under
    FSDP2, whose gathered weights are freed and refilled between forwards."""
    stack = contextlib.ExitStack()
    if cfg.trainer.fast and not hasattr(model, "set_requires_gradient_sync"):  # not FSDP2
        stack.enter_context(autocast_ctx(cfg))
        stack.enter_context(reuse_head_cast())
    return stack


def phase(cfg, low_memory: bool = False):
    """Memory handling around a phase of the step (``memory.phase``): on the fast path
    freed memory is kept for reuse; ``low_memory`` (the update under hardware.low_memory)
    hands it back after each micro-batch instead (``.trim()``)."""
    return memory.phase(bool(cfg.trainer.fast), low=low_memory)


def grad_sync(model, on: bool):
    """Whether this backward pass reduces gradients across ranks (only a minibatch's last
    micro-batch does; the others accumulate locally)."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if on else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(on)
    return contextlib.nullcontext()
