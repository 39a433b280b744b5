"""The loss pieces the policy-gradient algorithms share, as functions of tensors.

Every function takes per-token tensors of one micro-batch, [B, C] (B completions, C their
padded length), with ``mask`` [B, C] 1.0 on the tokens that carry loss:

- ``ppo_clip``: PPO's clipped surrogate (GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++, VinePPO),
  with separate low/high clip ranges and optional dual-clip;
- ``gspo``: GSPO's sequence-level ratio (arXiv 2507.18071);
- ``cispo``: CISPO's clipped, stop-gradient importance weight on log pi (MiniMax-M1,
  arXiv 2506.13585);
- ``kl_penalty``: k1 / k2 / k3 estimates of KL(pi || pi_ref) per token;
- ``aggregate``: the reduction of a per-token loss to a scalar;
- ``rollout_correction``: importance weights for the gap between the engine that sampled
  and the trainer (truncated or masked, per token or per sequence).

Log-ratios are clamped to +-20 before ``exp`` and k3 to at most 10, as verl does, so an
extreme token under ``ppo_epochs > 1`` cannot give inf (and inf times a zero mask NaN).
"""

from __future__ import annotations

import torch

from nanovppo.errors import ConfigError

LOG_RATIO_CLAMP = 20.0   # exp(20) ~ 4.9e8: any ratio beyond it is clipped by PPO anyway
K3_CLAMP = 10.0          # k3 >= 0 always; its upper tail is clamped

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm",
                "seq-mean-token-sum")
POLICY_LOSSES = ("ppo", "gspo", "cispo")
KL_ESTIMATORS = ("k1", "k2", "k3")


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """log(pi / pi_old) per token [B, C], clamped to +-20."""
    return (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def ppo_clip(logp, old_logp, advantages, clip_low: float, clip_high: float,
             dual_clip: float | None = None):
    """PPO's per-token loss [B, C] and the clipped indicator [B, C].

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = pi / pi_old; with
    dual-clip (Ye et al., 2020; verl's clip_ratio_c), a token with A < 0 loses at most
    -A * dual_clip, so a huge ratio on a bad token cannot dominate the batch.

    >>> old = torch.zeros(1, 3); logp = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
    >>> ppo_clip(logp, old, torch.tensor([[2.0]]), 0.2, 0.2)[0]
    tensor([[-2.0000, -2.4000, -1.0000]])
    """
    ratio = torch.exp(log_ratio(logp, old_logp))                          # [B, C]
    unclipped = -advantages * ratio                                        # [B, C]
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)       # [B, C]
    loss = torch.maximum(unclipped, clipped)                               # [B, C]
    was_clipped = clipped > unclipped                                      # [B, C]
    if dual_clip is not None:
        bound = -advantages * dual_clip                                    # [B, C]
        capped = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        was_clipped = was_clipped | capped
    return loss, was_clipped.float()


def sequence_log_ratio(logp, old_logp, mask) -> torch.Tensor:
    """GSPO's sequence log-ratio [B, 1]: the mean over a sequence's tokens of
    log(pi / pi_old), i.e. the log of the geometric mean of its token ratios."""
    lr = (logp - old_logp) * mask                                          # [B, C]
    return (lr.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).clamp(
        -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def gspo(logp, old_logp, advantages, mask, clip_low: float, clip_high: float):
    """GSPO's per-token loss [B, C] and clipped indicator [B, C].

    s_i = exp(mean_t log(pi / pi_old)) is the sequence's ratio, clipped to
    [1 - clip_low, 1 + clip_high] as PPO clips token ratios. Written as GSPO-token: token t
    carries s_i,t = sg(s_i) * pi_t / sg(pi_t), whose value is s_i and whose gradient is
    s_i * grad log pi_t, so with one advantage per sequence it equals GSPO's gradient
    and token-level advantages (VinePPO's) would also fit.
    """
    s = sequence_log_ratio(logp, old_logp, mask).detach()                 # [B, 1]
    ratio = torch.exp(s + logp - logp.detach())                           # [B, C], value s_i
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def cispo(logp, old_logp, advantages, clip_low: float, clip_high: float):
    """CISPO's per-token loss [B, C] and clipped indicator [B, C].

    loss = -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * log pi: the importance weight
    is clipped and stops the gradient, so every token keeps a gradient (PPO's clipped
    tokens get none), only bounded in size.

    >>> logp = torch.log(torch.tensor([[1.5]])); old = torch.zeros(1, 1)
    >>> cispo(logp, old, torch.tensor([[1.0]]), 1.0, 0.2)[0]   # weight 1.5 -> 1.2
    tensor([[-0.4866]])
    """
    ratio = torch.exp(log_ratio(logp, old_logp)).detach()                 # [B, C]
    weight = ratio.clamp(1 - clip_low, 1 + clip_high)                     # [B, C]
    return -weight * advantages * logp, (weight != ratio).float()


def kl_penalty(logp, ref_logp, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate [B, C] of KL(pi || pi_ref) from tokens sampled from pi (Schulman,
    "Approximating KL divergence"): k1 = log(pi / pi_ref); k2 = k1^2 / 2; k3 = exp(-k1) +
    k1 - 1 (>= 0, unbiased, low variance; clamped to at most 10)."""
    k1 = logp - ref_logp                                                  # [B, C]
    if estimator == "k1":
        return k1
    if estimator == "k2":
        return 0.5 * k1 ** 2
    if estimator == "k3":
        return (torch.exp(-k1.clamp(min=-LOG_RATIO_CLAMP)) + k1 - 1).clamp(max=K3_CLAMP)
    raise ConfigError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, n_tokens: float,
              n_seqs: float, norm_len: float) -> torch.Tensor:
    """Reduce a [B, C] per-token loss to a scalar.

    ``n_tokens`` and ``n_seqs`` count the whole minibatch (over all ranks), so that the
    losses of its micro-batches, each backpropagated on its own, add up to the
    minibatch's loss:

    - token-mean: sum over all tokens / n_tokens (DAPO, verl's default);
    - seq-mean-token-mean: each sequence's token mean, averaged over sequences
      (DeepSeekMath's GRPO objective);
    - seq-mean-token-sum-norm: sum / (n_seqs * norm_len), a constant length (Dr.GRPO);
    - seq-mean-token-sum: each sequence's token sum, averaged over sequences (VinePPO's
      KL term).
    """
    masked = per_token * mask                                    # [B, C]
    if how == "token-mean":
        return masked.sum() / n_tokens
    if how == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if how == "seq-mean-token-sum-norm":
        return masked.sum() / (n_seqs * norm_len)
    if how == "seq-mean-token-sum":
        return masked.sum() / n_seqs
    raise ConfigError(f"unknown loss aggregation {how!r}; use one of {AGGREGATIONS}")


# ----------------------------------------------------------------------------------------
# Engine/trainer mismatch
# ----------------------------------------------------------------------------------------

CORRECTIONS = ("off", "tis", "mis")
LEVELS = ("token", "sequence")


def rollout_correction(old_logp, engine_logp, mask, mode: str, level: str, cap: float,
                       low: float, high: float):
    """Importance weights [B, C] (detached) for samples drawn by an engine whose numerics
    differ from the trainer's, and the share of tokens they touch.

    rho = pi_trainer(old) / pi_engine per token; at the sequence level, the geometric mean
    of a sequence's token ratios, exp(mean_t log rho_t) (a product over hundreds of tokens
    would be 0 or huge for almost every sequence; the mean keeps a length-free scale, as
    GSPO's ratio does). ``tis`` (truncated IS): weight min(rho, cap). ``mis`` (masked IS):
    weight 1 where low <= rho <= high, else 0 (the token, or the whole sequence, is dropped).

    >>> old = torch.zeros(1, 3); eng = torch.log(torch.tensor([[1.0, 0.25, 2.0]]))
    >>> rollout_correction(old, eng, torch.ones(1, 3), "tis", "token", 2.0, 0.5, 2.0)[0]
    tensor([[1.0000, 2.0000, 0.5000]])
    >>> rollout_correction(old, eng, torch.ones(1, 3), "mis", "token", 2.0, 0.5, 2.0)[0]
    tensor([[1., 0., 1.]])
    """
    lr = (old_logp - engine_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * mask   # [B, C]
    if level == "sequence":
        lr = (lr.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(lr)
    elif level != "token":
        raise ConfigError(f"rollout.correction.level={level!r}; use one of {LEVELS}")
    rho = torch.exp(lr)                                                   # [B, C]
    if mode == "tis":
        weight = rho.clamp(max=cap)
        touched = (rho > cap).float() * mask
    elif mode == "mis":
        weight = ((rho >= low) & (rho <= high)).float()
        touched = (1 - weight) * mask
    else:
        raise ConfigError(f"rollout.correction.mode={mode!r}; use one of {CORRECTIONS}")
    return weight.detach() * mask, touched.sum().item()


def mismatch_stats(old_logp, engine_logp, mask) -> dict[str, float]:
    """Sums over a micro-batch's tokens of k3(engine || trainer) and the largest
    |log pi_trainer - log pi_engine|: how far the sampler's distribution is from the one
    the trainer computes (tokens drawn from the engine, so k3 estimates KL(engine ||
    trainer))."""
    k1 = (engine_logp - old_logp) * mask
    k3 = (torch.exp(-k1.clamp(min=-LOG_RATIO_CLAMP)) + k1 - 1) * mask
    return {"mismatch_k3_tokens": k3.sum().item(),
            "mismatch_max_abs": (k1.abs() * mask).max().item() if mask.any() else 0.0}
