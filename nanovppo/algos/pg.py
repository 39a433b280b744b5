"""What every policy-gradient algorithm here shares: the inputs of its loss, and the loss
(the whole contract an algorithm meets is ``algos/base.py: Algorithm``).

``PolicyGradient`` holds the loss's knobs (which surrogate, its clip ranges, the KL term
and how both are aggregated, epochs and minibatches); GRPO and its presets and VinePPO
build on it and differ only in how they turn rollouts into advantages. The loss of a
micro-batch is

    policy term:  aggregate(w * surrogate(logp, old_logp, A), loss_agg)
    KL term:      kl_coef * aggregate(kl_penalty(logp, ref_logp), kl_agg)

where ``w`` is the engine/trainer mismatch weight (1 unless ``rollout.correction`` is on)
and the surrogate is PPO-clip, GSPO or CISPO (``algos/losses.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from nanovppo.algos.losses import (AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, aggregate,
                                   cispo, gspo, kl_penalty, ppo_clip)
from nanovppo.errors import ConfigError


class LossBatch(NamedTuple):
    """One micro-batch's inputs to an algorithm's loss."""

    logp: torch.Tensor                 # [B, C] sampled tokens' log-probs, current policy
    old_logp: torch.Tensor             # [B, C] the same under the policy that sampled
    ref_logp: torch.Tensor | None      # [B, C] under the frozen reference (None: no KL)
    advantages: torch.Tensor           # [B, C]
    mask: torch.Tensor                 # [B, C] 1.0 on tokens that carry loss
    is_weight: torch.Tensor            # [B, C] engine/trainer mismatch weights (detached)
    n_tokens: float                    # loss tokens in the whole minibatch, all ranks
    n_seqs: float                      # sequences with loss tokens in the minibatch
    norm_len: float                    # Dr.GRPO's constant length (rollout.max_new_tokens)


@dataclass
class PolicyGradient:
    """The loss knobs of ``algo=grpo`` and its presets and of ``algo=vppo``; each is
    documented in conf/algo/grpo.yaml."""

    name: str
    lr: float
    group_size: int
    policy_loss: str
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    kl_estimator: str
    kl_agg: str
    loss_agg: str
    ppo_epochs: int
    num_minibatches: int
    mask_truncated: bool

    def __post_init__(self):
        checks = [("policy_loss", POLICY_LOSSES), ("loss_agg", AGGREGATIONS),
                  ("kl_agg", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS)]
        for key, allowed in checks:
            if getattr(self, key) not in allowed:
                raise ConfigError(f"algo.{key}={getattr(self, key)!r}; use one of {allowed}")
        if min(self.clip_low, self.clip_high) <= 0:
            raise ConfigError("algo.clip_low and algo.clip_high must be positive")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"algo.dual_clip={self.dual_clip} must be above 1 (verl uses 3)")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ConfigError("algo.ppo_epochs and algo.num_minibatches must be at least 1")

    @property
    def uses_reference(self) -> bool:
        """Whether the trainer must build the frozen reference policy."""
        return self.kl_coef > 0

    @property
    def kl_in_loss(self) -> bool:
        """Whether the loss has a KL term (REINFORCE++ puts its KL in the reward instead)."""
        return self.kl_coef > 0

    def carries_gradient(self, sample) -> bool:
        """False when the sample's loss is exactly 0 whatever the policy: no KL term and an
        advantage of 0 on every token (every surrogate here is proportional to A). The
        trainer then skips its forward and backward."""
        if self.kl_in_loss:
            return True
        adv = sample.advantage
        return any(a != 0 for a in adv) if isinstance(adv, list) else adv != 0

    def loss_temperature(self, sampling_temperature: float) -> float:
        """The ratio compares the policy with the distribution that sampled: log-probs are
        taken at the sampling temperature."""
        return sampling_temperature

    def loss(self, b: LossBatch) -> tuple[torch.Tensor, dict]:
        """Scalar loss of a micro-batch and its statistics (sums over its tokens)."""
        if self.policy_loss == "ppo":
            per_token, clipped = ppo_clip(b.logp, b.old_logp, b.advantages, self.clip_low,
                                          self.clip_high, self.dual_clip)
        elif self.policy_loss == "gspo":
            per_token, clipped = gspo(b.logp, b.old_logp, b.advantages, b.mask,
                                      self.clip_low, self.clip_high)
        else:
            per_token, clipped = cispo(b.logp, b.old_logp, b.advantages, self.clip_low,
                                       self.clip_high)
        loss = aggregate(per_token * b.is_weight, b.mask, self.loss_agg, b.n_tokens, b.n_seqs,
                         b.norm_len)
        stats = {"clip_tokens": (clipped * b.mask).sum().item(), "kl_tokens": 0.0}
        if self.kl_in_loss:
            kl = kl_penalty(b.logp, b.ref_logp, self.kl_estimator)       # [B, C]
            loss = loss + self.kl_coef * aggregate(kl, b.mask, self.kl_agg, b.n_tokens,
                                                   b.n_seqs, b.norm_len)
            stats["kl_tokens"] = (kl.detach() * b.mask).sum().item()
        return loss, stats
