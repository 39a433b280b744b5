"""GRPO (DeepSeekMath, arXiv 2402.03300; DeepSeek-R1, arXiv 2501.12948) and the family
that differs from it in a few knobs, as presets in conf/algo/:

| preset | advantages | loss |
| --- | --- | --- |
| ``grpo`` | (r - group mean) / group std (Bessel) | PPO-clip, seq-mean-token-mean |
| ``drgrpo`` (arXiv 2503.20783) | r - group mean | PPO-clip, seq-mean-token-sum-norm |
| ``dapo`` (arXiv 2503.14476) | as grpo, groups filtered on correctness | clip-higher, token-mean |
| ``rloo`` (arXiv 2402.14740) | r - mean of the group's others | PPO-clip |
| ``reinforce_pp`` (arXiv 2501.03262) | returns of r - beta * k1 per token, whitened over the batch's tokens; one sample per prompt | PPO-clip, token-mean |
| ``reinforce_pp_baseline`` | r - group mean, whitened over the batch's tokens | PPO-clip, token-mean, k3 KL in the loss |
| ``gspo`` (arXiv 2507.18071) | as grpo | GSPO's sequence ratio |
| ``cispo`` (arXiv 2506.13585) | as grpo | CISPO's clipped stop-gradient weight |

Every token of a completion shares its advantage (REINFORCE++'s returns differ per token).
The loss is ``PolicyGradient.loss`` (``algos/pg.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovppo.algos.pg import PolicyGradient
from nanovppo.distributed import global_sums
from nanovppo.errors import ConfigError
from nanovppo.rollout import Rollouts, Sample, with_demonstrations

ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")

# Which groups DAPO's dynamic sampling keeps: "correct" (DAPO's rule: some but not all of
# a group's samples are correct), "reward" (the group's total rewards are not all equal).
FILTERS = (None, "correct", "reward")


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: advantages [G, n] from rewards [G, n] (G groups of n samples of one prompt):
    the reward minus the group mean, over the group's standard deviation with Bessel's
    correction (as TRL and verl compute it) when ``scale``.

    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), scale=False)
    tensor([[ 0.5000, -0.5000, -0.5000,  0.5000]])
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)       # [G, n]
    if not scale:
        return centered
    std = rewards.std(dim=1, keepdim=True)                       # [G, 1], unbiased
    return centered / (std + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: each sample's reward minus the mean of the *other* samples of its group.

    >>> rloo_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    tensor([[ 1.0000, -0.5000, -0.5000]])
    """
    n = rewards.shape[1]
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)  # [G, n]
    return rewards - others


def whiten_over_tokens(per_token: list[torch.Tensor], eps: float = 1e-8) -> list[torch.Tensor]:
    """Whiten token values (one tensor [C_i] per completion) with the mean and unbiased
    variance of all tokens of the batch, on every rank together (verl's ``masked_whiten``
    over the whole batch): a long completion weighs as much as its tokens.

    >>> [t.tolist() for t in whiten_over_tokens([torch.tensor([1.0, 1.0]), torch.tensor([-2.0])])]
    [[0.5773..., 0.5773...], [-1.1547...]]
    """
    flat = torch.cat(per_token) if per_token else torch.zeros(0)
    total, squares, count = global_sums([flat.sum().item(), (flat.double() ** 2).sum().item(),
                                         float(flat.numel())])
    mean = total / max(count, 1.0)
    var = (squares - count * mean ** 2) / max(count - 1.0, 1.0)
    scale = 1.0 / (max(var, 0.0) + eps) ** 0.5
    return [(t - mean) * scale for t in per_token]


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


def informative_groups(ro: Rollouts, rule: str) -> list[int]:
    """Indices of the groups that carry a learning signal under ``rule`` (see FILTERS).

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


@dataclass
class GRPO(PolicyGradient):
    """``algo=grpo`` and its presets: see conf/algo/grpo.yaml for what each field does."""

    estimator: str
    scale_rewards: bool
    kl_in_reward: bool
    dynamic_sampling: str | None
    max_extra_batches: int
    overlong_buffer: int
    overlong_penalty: float
    demonstrations: bool

    def __post_init__(self):
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"algo.estimator={self.estimator!r}; use one of {ESTIMATORS}")
        if self.dynamic_sampling not in FILTERS:
            raise ConfigError(f"algo.dynamic_sampling={self.dynamic_sampling!r}; use one of "
                              f"{FILTERS} (null: off)")
        single = self.estimator == "reinforce_pp"
        if self.group_size < (1 if single else 2):
            raise ConfigError("algo.group_size must be at least 2: this estimator compares "
                              "samples of a prompt (REINFORCE++ alone works with 1)")
        if self.kl_in_reward and self.estimator != "reinforce_pp":
            raise ConfigError("algo.kl_in_reward folds the KL into REINFORCE++'s per-token "
                              "returns; use it with algo.estimator=reinforce_pp")
        if not isinstance(self.demonstrations, bool):
            raise ConfigError(f"algo.demonstrations={self.demonstrations!r}: must be true or "
                              "false")
        if self.dynamic_sampling and single:
            raise ConfigError("algo.dynamic_sampling filters groups, and REINFORCE++ has "
                              "one sample per prompt")

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_coef > 0 and not self.kl_in_reward

    # -- experience -----------------------------------------------------------------------

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Sequence advantages [G, n] from rewards [G, n] (before any whitening over
        tokens, which needs the lengths)."""
        if self.estimator == "rloo":
            return rloo_advantages(rewards)
        if self.estimator == "reinforce_pp":
            return rewards
        if self.estimator == "reinforce_pp_baseline":
            return group_advantages(rewards, scale=False)
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
        if self.demonstrations:  # [G, n] -> [G, n + 1]: the demonstration joins each group
            ro = with_demonstrations(ro, source.task, source.tokenizer)
        rewards = self.shaped_rewards(ro, source.sampling.max_new_tokens)     # [G, n]
        adv = self.advantages(rewards)                                       # [G, n]
        samples = [Sample(c.prompt_ids, c.token_ids, adv[g, j].item(), rewards[g, j].item(),
                          c.finish_reason == "length", g, c.logprobs)
                   for g, group in enumerate(ro.groups) for j, c in enumerate(group)]
        if self.estimator == "reinforce_pp_baseline":
            per_token = [torch.full((len(s.completion_ids),), s.advantage) for s in samples]
            for s, a in zip(samples, whiten_over_tokens(per_token)):
                s.advantage = a.tolist()
        # reinforce_pp: the KL is folded into the returns once the trainer has the
        # policy's and the reference's log-probs (fold_kl), then whitened.
        return samples, metrics

    def fold_kl(self, samples: list[Sample], old: list[torch.Tensor],
                ref: list[torch.Tensor] | None) -> None:
        """REINFORCE++: per-token rewards r_t = -kl_coef * k1_t (+ the sample's reward at
        its last token), returns G_t = sum of r_s for s >= t (gamma = 1), whitened over all
        tokens of the batch. ``old`` and ``ref`` hold each sample's log-probs [C_i] under
        the policy that sampled and the reference."""
        returns = []
        for i, s in enumerate(samples):
            k1 = (old[i] - ref[i]) if ref is not None else torch.zeros(len(s.completion_ids))
            r = -self.kl_coef * k1                                         # [C_i]
            r[-1:] += s.reward
            returns.append(torch.flip(torch.cumsum(torch.flip(r, [0]), 0), [0]))
        for s, a in zip(samples, whiten_over_tokens(returns)):
            s.advantage = a.tolist()

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
