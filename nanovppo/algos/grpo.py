"""GRPO (arXiv 2501.12948) and the knobs that turn it into its well-known variants:
Dr.GRPO (no std scaling, ``seq-mean-token-sum-norm``), DAPO (clip-higher, token-mean,
dynamic sampling, overlong filtering and soft penalty), RLOO (leave-one-out baseline) and
REINFORCE++ (batch-normalised advantages); presets in conf/algo/.

Experience: each prompt gets a group of ``n`` completions; a completion's advantage is its
reward minus the group mean, divided by the group standard deviation (``scale_rewards``;
off gives Dr.GRPO's unscaled advantage). Every token of a completion shares its advantage.

Loss: PPO's clipped surrogate with separate low/high clip ranges, plus an optional k3 KL
estimate to a frozen reference, aggregated over tokens in one of three ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovppo.distributed import global_mean_std

from nanovppo.errors import ConfigError
from nanovppo.rollout import Rollouts, Sample

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


ESTIMATORS = ("grpo", "rloo", "reinforce_pp")

# Which groups DAPO's dynamic sampling keeps: "correct" (DAPO's rule: some but not all of
# a group's samples are correct), "reward" (the group's total rewards are not all equal).
FILTERS = (None, "correct", "reward")


def informative_groups(ro: Rollouts, rule: str) -> list[int]:
    """Indices of the groups that carry a learning signal under ``rule`` (see FILTERS).

    >>> import torch
    >>> ro = Rollouts([{}] * 3, [[]] * 3, [[]] * 3, torch.tensor([[1.1, 0.1], [1.1, 1.2], [0.0, 0.2]]),
    ...               torch.tensor([[True, False], [True, True], [False, False]]))
    >>> informative_groups(ro, "correct"), informative_groups(ro, "reward")
    ([0], [0, 1, 2])
    """
    if rule == "correct":
        n = ro.correct.shape[1]
        solved = ro.correct.sum(dim=1)                                    # [G]
        return [g for g in range(len(solved)) if 0 < solved[g] < n]
    return [g for g in range(ro.rewards.shape[0]) if ro.rewards[g].std() > 0]


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: advantages [G, n] from rewards [G, n] (G groups of n samples of one prompt).

    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), scale=False)
    tensor([[ 0.5000, -0.5000, -0.5000,  0.5000]])
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)       # [G, n]
    if not scale:
        return centered
    std = rewards.std(dim=1, keepdim=True, unbiased=False)       # [G, 1]
    return centered / (std + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: each sample's reward minus the mean of the *other* samples of its group.

    >>> rloo_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    tensor([[ 1.0000, -0.5000, -0.5000]])
    """
    n = rewards.shape[1]
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)  # [G, n]
    return rewards - others


def batch_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """REINFORCE++: rewards whitened over the whole batch, so that above-average samples
    get a positive advantage (the sign of the mean is removed, not flipped). Under
    torchrun the batch is every rank's samples together."""
    mean, std = global_mean_std(rewards)
    return (rewards - mean) / (std + eps)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong penalty: 0 up to ``max_len - buffer`` tokens, then falling
    linearly to ``-penalty`` at ``max_len``.

    >>> overlong_penalty(torch.tensor([10, 15, 20]), max_len=20, buffer=10, penalty=1.0)
    tensor([ 0.0000, -0.5000, -1.0000])
    """
    if buffer <= 0 or penalty == 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)) / buffer
    return 0.0 - penalty * over.clamp(0.0, 1.0)  # 0.0, not -0.0, below the buffer


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(r) - r - 1 with r = ref - logp."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, n_tokens: float,
              n_seqs: float, norm_len: float) -> torch.Tensor:
    """Reduce a [B, C] per-token loss to a scalar.

    ``n_tokens`` and ``n_seqs`` count the whole minibatch, so that the losses of its
    micro-batches, each backpropagated on its own, add up to the minibatch's loss.
    """
    masked = per_token * mask                                    # [B, C]
    if how == "token-mean":
        return masked.sum() / n_tokens
    if how == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if how == "seq-mean-token-sum-norm":
        return masked.sum() / (n_seqs * norm_len)
    raise ConfigError(f"unknown loss aggregation {how!r}; use one of {AGGREGATIONS}")


def clipped_policy_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float):
    """Per-token PPO-clip loss [B, C] and the clipped indicator [B, C].

    logp, old_logp: [B, C] log-probs of the sampled tokens now and at sampling time;
    advantages: [B, C] (or [B, 1], broadcast over tokens); mask: [B, C].
    """
    ratio = torch.exp(logp - old_logp)                                     # [B, C]
    unclipped = -advantages * ratio                                        # [B, C]
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)       # [B, C]
    loss = torch.maximum(unclipped, clipped)                               # [B, C]
    was_clipped = (clipped > unclipped).float() * mask                     # [B, C]
    return loss, was_clipped


@dataclass
class GRPO:
    """``algo=grpo`` and its variants: see conf/algo/grpo.yaml for what each field does."""

    name: str = "grpo"
    lr: float = 1e-5
    group_size: int = 4
    estimator: str = "grpo"
    scale_rewards: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    loss_agg: str = "token-mean"
    ppo_epochs: int = 1
    num_minibatches: int = 1
    mask_truncated: bool = False
    dynamic_sampling: str | None = None
    max_extra_batches: int = 2
    overlong_buffer: int = 0
    overlong_penalty: float = 0.0

    def __post_init__(self):
        if self.loss_agg not in AGGREGATIONS:
            raise ConfigError(f"algo.loss_agg={self.loss_agg!r}; use one of {AGGREGATIONS}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"algo.estimator={self.estimator!r}; use one of {ESTIMATORS}")
        if self.dynamic_sampling not in FILTERS:
            raise ConfigError(f"algo.dynamic_sampling={self.dynamic_sampling!r}; use one of "
                              f"{FILTERS} (null: off)")
        if self.group_size < 2:
            raise ConfigError("algo.group_size must be at least 2: GRPO compares samples of a prompt")
        if min(self.clip_low, self.clip_high) <= 0:
            raise ConfigError("algo.clip_low and algo.clip_high must be positive")

    def loss_temperature(self, sampling_temperature: float) -> float:
        """PPO's ratio compares the policy with the distribution that sampled: the log-probs
        are taken at the sampling temperature."""
        return sampling_temperature

    # -- experience -----------------------------------------------------------------------

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages [G, n] from rewards [G, n]."""
        if self.estimator == "rloo":
            return rloo_advantages(rewards)
        if self.estimator == "reinforce_pp":
            return batch_normalized_advantages(rewards)
        return group_advantages(rewards, scale=self.scale_rewards)

    def shaped_rewards(self, ro: Rollouts, max_len: int) -> torch.Tensor:
        """Rewards [G, n] with the soft overlong penalty added (when configured)."""
        lengths = torch.tensor([[len(c.token_ids) for c in g] for g in ro.groups])
        return ro.rewards + overlong_penalty(lengths, max_len, self.overlong_buffer,
                                             self.overlong_penalty)

    def make_samples(self, ro: Rollouts, source) -> tuple[list[Sample], dict]:
        """Training samples from a step's rollouts (may sample more: dynamic sampling)."""
        metrics = {}
        if self.dynamic_sampling:
            ro, metrics = self._dynamic_sampling(ro, source)
        rewards = self.shaped_rewards(ro, source.sampling.max_new_tokens)     # [G, n]
        adv = self.advantages(rewards)                                       # [G, n]
        samples = [Sample(c.prompt_ids, c.token_ids, adv[g, j].item(), rewards[g, j].item(),
                          c.finish_reason == "length", g)
                   for g, group in enumerate(ro.groups) for j, c in enumerate(group)]
        return samples, metrics

    def _dynamic_sampling(self, ro: Rollouts, source) -> tuple[Rollouts, dict]:
        """DAPO: drop the groups without signal (all correct or all wrong; or, with the
        ``reward`` rule, all rewards equal) and refill the batch with fresh prompts, at
        most ``max_extra_batches`` extra batches per step."""
        wanted = len(ro.groups)
        useful = lambda r: informative_groups(r, self.dynamic_sampling)
        kept = ro.select(useful(ro))
        extra = 0
        while len(kept.groups) < wanted and extra < self.max_extra_batches:
            more = source.more(wanted)
            if more is None:
                break
            extra += 1
            kept.extend(more.select(useful(more)))
        if not kept.groups:  # nothing useful at all: train on what we have (zero advantages)
            kept = ro
        kept = kept.select(list(range(min(wanted, len(kept.groups)))))
        return kept, {"train/extra_rollout_batches": float(extra),
                      "train/kept_groups": float(len(kept.groups))}

    # -- loss -----------------------------------------------------------------------------

    def loss(self, logp, old_logp, ref_logp, advantages, mask, n_tokens, n_seqs, norm_len):
        """Scalar loss of a micro-batch and its statistics (sums over its tokens)."""
        pg, was_clipped = clipped_policy_loss(logp, old_logp, advantages, mask,
                                              self.clip_low, self.clip_high)
        per_token = pg
        stats = {"clip_tokens": was_clipped.sum().item()}
        if ref_logp is not None and self.kl_coef > 0:
            kl = k3_kl(logp, ref_logp)                                     # [B, C]
            per_token = per_token + self.kl_coef * kl
            stats["kl_tokens"] = (kl.detach() * mask).sum().item()
        return aggregate(per_token, mask, self.loss_agg, n_tokens, n_seqs, norm_len), stats
