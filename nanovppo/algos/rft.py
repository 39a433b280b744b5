"""RFT, rejection-sampling fine-tuning: sample, keep the correct solutions, imitate them.

Two papers define it. STaR (Zelikman et al., arXiv 2203.14465) samples rationales, keeps
those whose final answer is correct and fine-tunes on them. RFT (Yuan et al., arXiv
2308.01825) samples K reasoning paths per problem, keeps the correct ones and removes
duplicates, one per distinct reasoning path (it counts paths by their equations), which is
what makes more samples help. Here:

- a sample is kept only when the task says it is *correct* (never for its shaped reward);
- ``dedup``: ``solution`` keeps one per distinct solution of a prompt (Countdown: the
  equation, spaces aside; MATH and GSM8K: the response text, case and spacing aside),
  ``answer`` one per distinct final answer, null keeps every correct sample;
- ``success_band`` optionally keeps only prompts whose share of correct samples lies in
  [low, high] (neither always nor never solved);
- the loss is the token NLL of the kept samples at temperature 1, whatever temperature they
  were sampled at (it is supervised fine-tuning on them), plus an optional k3 KL to the
  reference. When nothing is kept the trainer skips the update and says so.

Deliberate differences: both papers fine-tune the base model once on the pooled samples
(STaR restarts from the base model at every outer iteration); here every step's kept
samples update the current policy, online, as the other algorithms do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanovppo.algos.grpo import AGGREGATIONS, aggregate, k3_kl
from nanovppo.errors import ConfigError
from nanovppo.rollout import Rollouts, Sample

DEDUP = (None, "solution", "answer")


def keep_mask(correct: torch.Tensor, band: tuple[float, float] | None) -> torch.Tensor:
    """[G, n] bool: the correct samples of groups whose success rate is in ``band``.

    >>> c = torch.tensor([[True, False], [True, True]])
    >>> keep_mask(c, (0.2, 0.8)).tolist()
    [[True, False], [False, False]]
    """
    ok = correct.clone()                                           # [G, n]
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
    dedup: str | None = "solution"
    success_band: list[float] | None = field(default=None)
    kl_coef: float = 0.0
    loss_agg: str = "token-mean"
    ppo_epochs: int = 1
    num_minibatches: int = 1
    mask_truncated: bool = False

    def __post_init__(self):
        if self.loss_agg not in AGGREGATIONS:
            raise ConfigError(f"algo.loss_agg={self.loss_agg!r}; use one of {AGGREGATIONS}")
        if self.dedup not in DEDUP:
            raise ConfigError(f"algo.dedup={self.dedup!r}; use one of {DEDUP} (null: keep all)")
        if self.success_band is not None:
            lo, hi = (float(x) for x in self.success_band)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError("algo.success_band must be [low, high] within [0, 1]")
            self.success_band = [lo, hi]

    def loss_temperature(self, sampling_temperature: float) -> float:
        """Supervised fine-tuning: the policy's own distribution, at temperature 1."""
        return 1.0

    def make_samples(self, ro: Rollouts, source) -> tuple[list[Sample], dict]:
        band = tuple(self.success_band) if self.success_band else None
        keep = keep_mask(ro.correct, band)                             # [G, n]
        task = source.task
        samples = []
        for g, group in enumerate(ro.groups):
            seen = set()
            for j, c in enumerate(group):
                if not keep[g, j]:
                    continue
                if self.dedup:
                    text = task.prefill + c.text
                    key = task.solution_key(text) if self.dedup == "solution" else task.final_answer(text)
                    if key in seen:
                        continue
                    seen.add(key)
                samples.append(Sample(c.prompt_ids, c.token_ids, 1.0, ro.rewards[g, j].item(),
                                      c.finish_reason == "length", g))
        total = ro.rewards.numel()
        return samples, {"train/kept_frac": len(samples) / max(total, 1),
                         "train/correct_kept_frac": len(samples) / max(int(ro.correct.sum()), 1)}

    def loss(self, logp, old_logp, ref_logp, advantages, mask, n_tokens, n_seqs, norm_len):
        """Token NLL of the kept samples [B, C] (+ k3 KL), aggregated like the PG losses."""
        per_token = -logp
        stats = {"clip_tokens": 0.0}
        if ref_logp is not None and self.kl_coef > 0:
            kl = k3_kl(logp, ref_logp)
            per_token = per_token + self.kl_coef * kl
            stats["kl_tokens"] = (kl.detach() * mask).sum().item()
        return aggregate(per_token, mask, self.loss_agg, n_tokens, n_seqs, norm_len), stats
