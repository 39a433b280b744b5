"""The ``Algorithm`` contract: everything the trainer asks of an algorithm (``algo=...``).

An algorithm turns a step's scored rollouts into training samples with advantages
(``make_samples``) and gives the loss of a micro-batch of them (``loss``); the knobs below
tell the update how to run (``nanovppo/update.py``). GRPO and its presets and VinePPO build
on ``algos/pg.py: PolicyGradient``; RFT (``algos/rft.py``) implements the contract alone.
``tests/test_config.py`` checks that every ``conf/algo`` option builds an ``Algorithm``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Algorithm(Protocol):
    name: str
    lr: float                # AdamW's learning rate
    group_size: int          # samples per prompt
    ppo_epochs: int          # passes over a step's samples
    num_minibatches: int     # optimizer steps per pass
    mask_truncated: bool     # completions cut at the token limit carry no loss
    # Whether the advantages need the sampling policy's and the reference's log-probs
    # before the update (REINFORCE++ folds its KL into the returns); the algorithm then also
    # has ``fold_kl(samples, old_logprobs, ref_logprobs)``, which the update calls first.
    kl_in_reward: bool

    @property
    def uses_reference(self) -> bool:
        """Whether the trainer must build the frozen reference policy (a KL term)."""

    def make_samples(self, ro, source) -> tuple[list, dict]:
        """Experience: the step's ``Rollouts`` -> training ``Sample``s with advantages, and
        the metrics of that stage. ``source`` (a ``RolloutSource``) samples more from the
        engine where the algorithm needs it (VinePPO's values, DAPO's refills)."""

    def carries_gradient(self, sample) -> bool:
        """False when the sample's loss is exactly 0 whatever the policy (the fast path then
        skips its forward and backward)."""

    def loss_temperature(self, sampling_temperature: float) -> float:
        """The temperature at which the loss takes log-probs."""

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """The scalar loss of a micro-batch (``algos/pg.py: LossBatch``) and its statistics,
        sums over its tokens: ``clip_tokens`` and ``kl_tokens``."""
