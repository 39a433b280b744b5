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

from dataclasses import dataclass

import torch

from nanovppo.algos.losses import AGGREGATIONS, KL_ESTIMATORS, aggregate, kl_penalty
from nanovppo.algos.pg import LossBatch
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

    name: str
    lr: float
    group_size: int
    dedup: str | None
    success_band: list[float] | None
    kl_coef: float
    kl_estimator: str
    kl_agg: str
    loss_agg: str
    ppo_epochs: int
    num_minibatches: int
    mask_truncated: bool

    def __post_init__(self):
        for key, allowed in [("loss_agg", AGGREGATIONS), ("kl_agg", AGGREGATIONS),
                             ("kl_estimator", KL_ESTIMATORS)]:
            if getattr(self, key) not in allowed:
                raise ConfigError(f"algo.{key}={getattr(self, key)!r}; use one of {allowed}")
        if self.dedup not in DEDUP:
            raise ConfigError(f"algo.dedup={self.dedup!r}; use one of {DEDUP} (null: keep all)")
        if self.success_band is not None:
            lo, hi = (float(x) for x in self.success_band)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError("algo.success_band must be [low, high] within [0, 1]")
            self.success_band = [lo, hi]

    kl_in_reward = False  # the KL, if any, is a loss term

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0

    kl_in_loss = uses_reference

    def carries_gradient(self, sample) -> bool:
        """Every kept sample is imitated."""
        return True

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
                                      c.finish_reason == "length", g, c.logprobs))
        total = ro.rewards.numel()
        return samples, {"train/kept_frac": len(samples) / max(total, 1),
                         "train/correct_kept_frac": len(samples) / max(int(ro.correct.sum()), 1)}

    def loss(self, b: LossBatch) -> tuple[torch.Tensor, dict]:
        """Token NLL of the kept samples [B, C] (+ a KL term), aggregated like the policy
        gradient losses; the mismatch weights do not apply (imitation, not a ratio)."""
        loss = aggregate(-b.logp, b.mask, self.loss_agg, b.n_tokens, b.n_seqs, b.norm_len)
        stats = {"clip_tokens": 0.0, "kl_tokens": 0.0}
        if self.kl_in_loss:
            kl = kl_penalty(b.logp, b.ref_logp, self.kl_estimator)
            loss = loss + self.kl_coef * aggregate(kl, b.mask, self.kl_agg, b.n_tokens,
                                                   b.n_seqs, b.norm_len)
            stats["kl_tokens"] = (kl.detach() * b.mask).sum().item()
        return loss, stats
