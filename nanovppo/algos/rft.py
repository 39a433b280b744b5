"""RFT, rejection-sampling fine-tuning (arXiv 2203.14465, STaR-style filtering).

Sample K completions per prompt, keep those whose reward reaches ``threshold``
(optionally only one per distinct final answer, and only from prompts whose success rate
lies in a band), and fine-tune on what is kept with the token NLL, plus an optional k3 KL
to the reference. When nothing is kept the trainer skips the update and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanovppo.algos.grpo import AGGREGATIONS, aggregate, k3_kl
from nanovppo.errors import ConfigError
from nanovppo.rollout import Rollouts, Sample


def keep_mask(rewards: torch.Tensor, threshold: float, band: tuple[float, float] | None) -> torch.Tensor:
    """[G, n] bool: samples at or above ``threshold`` of groups whose success rate is in ``band``.

    >>> keep_mask(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), 1.0, (0.2, 0.8)).tolist()
    [[True, False], [False, False]]
    """
    ok = rewards >= threshold                                      # [G, n]
    if band is not None:
        rate = ok.float().mean(dim=1, keepdim=True)                # [G, 1]
        ok = ok & (rate >= band[0]) & (rate <= band[1])
    return ok


@dataclass
class RFT:
    """``algo=rft``: see conf/algo/rft.yaml for what each field does."""

    name: str = "rft"
    lr: float = 1e-5
    group_size: int = 4
    threshold: float = 1.0
    one_per_answer: bool = False
    success_band: list[float] | None = field(default=None)
    kl_coef: float = 0.0
    loss_agg: str = "token-mean"
    ppo_epochs: int = 1
    num_minibatches: int = 1
    mask_truncated: bool = False

    def __post_init__(self):
        if self.loss_agg not in AGGREGATIONS:
            raise ConfigError(f"algo.loss_agg={self.loss_agg!r}; use one of {AGGREGATIONS}")
        if self.success_band is not None:
            lo, hi = (float(x) for x in self.success_band)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError("algo.success_band must be [low, high] within [0, 1]")
            self.success_band = [lo, hi]

    def make_samples(self, ro: Rollouts, source) -> tuple[list[Sample], dict]:
        band = tuple(self.success_band) if self.success_band else None
        keep = keep_mask(ro.rewards, self.threshold, band)             # [G, n]
        samples = []
        for g, group in enumerate(ro.groups):
            seen = set()
            for j, c in enumerate(group):
                if not keep[g, j]:
                    continue
                if self.one_per_answer:
                    answer = source.task.final_answer(source.task.prefill + c.text)
                    if answer in seen:
                        continue
                    seen.add(answer)
                samples.append(Sample(c.prompt_ids, c.token_ids, 1.0, ro.rewards[g, j].item(),
                                      c.finish_reason == "length", g))
        total = ro.rewards.numel()
        return samples, {"train/kept_frac": len(samples) / max(total, 1)}

    def loss(self, logp, old_logp, ref_logp, advantages, mask, n_tokens, n_seqs, norm_len):
        """Token NLL of the kept samples [B, C] (+ k3 KL), aggregated like the PG losses."""
        per_token = -logp
        stats = {"clip_tokens": 0.0}
        if ref_logp is not None and self.kl_coef > 0:
            kl = k3_kl(logp, ref_logp)
            per_token = per_token + self.kl_coef * kl
            stats["kl_tokens"] = (kl.detach() * mask).sum().item()
        return aggregate(per_token, mask, self.loss_agg, n_tokens, n_seqs, norm_len), stats
