"""The shared loss pieces (nanovppo/algos/losses.py, pg.py) against values worked out by hand."""

import math

import pytest
import torch

from nanovppo.algos.losses import (aggregate, cispo, gspo, kl_penalty, mismatch_stats,
                                   ppo_clip, rollout_correction)
from nanovppo.algos.pg import LossBatch
from tests.conftest import make_algo

ONES = torch.ones(1, 3)


def test_ppo_clip_by_hand():
    # log-ratios 0, log 1.5, log 0.5: ratios 1, 1.5, 0.5
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
    # positive advantage 2: ratio 1.5 is clipped at 1.2 -> -2 * 1.2; ratio 0.5 is not
    loss, clipped = ppo_clip(logp, old, torch.tensor([[2.0]]), 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[-2.0, -2.4, -1.0]]))
    assert clipped.tolist() == [[0.0, 1.0, 0.0]]
    # negative advantage -1: ratio 0.5 is clipped at 0.8 -> +0.8; ratio 1.5 is not (1.5)
    loss, clipped = ppo_clip(logp, old, torch.tensor([[-1.0]]), 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[1.0, 1.5, 0.8]]))
    assert clipped.tolist() == [[0.0, 0.0, 1.0]]
    # clip-higher: high epsilon 0.28 lets ratio 1.5 reach 1.28
    loss, _ = ppo_clip(logp, old, torch.tensor([[1.0]]), 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([[-1.0, -1.28, -0.5]]))


def test_dual_clip_bounds_the_loss_of_a_huge_ratio_on_a_bad_token():
    # ratio 5 with A = -1: PPO's loss is max(5, 1.2) = 5; dual-clip c = 3 caps it at 3.
    # ratio 2 (loss 2 < 3) and positive advantages are left alone.
    logp = torch.log(torch.tensor([[5.0, 2.0, 5.0]]))
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, clipped = ppo_clip(logp, torch.zeros(1, 3), adv, 0.2, 0.2, dual_clip=3.0)
    assert torch.allclose(loss, torch.tensor([[3.0, 2.0, -1.2]]))
    assert clipped.tolist() == [[1.0, 0.0, 1.0]]


def test_gradient_of_ratio_at_one_is_gradient_of_logp():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = ppo_clip(logp, logp.detach(), torch.tensor([[3.0]]), 0.2, 0.2)
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-3.0, -3.0]]))


def test_an_extreme_log_ratio_stays_finite():
    """exp(1000) is inf, and inf * 0 (a masked token) is NaN; the clamp at 20 prevents both."""
    logp = torch.tensor([[1000.0, 0.0]], requires_grad=True)
    loss, _ = ppo_clip(logp, torch.zeros(1, 2), torch.tensor([[-1.0]]), 0.2, 0.2)
    total = aggregate(loss, torch.tensor([[0.0, 1.0]]), "token-mean", 1, 1, 2)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logp.grad).all()
    assert loss[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-5)
    assert kl_penalty(torch.tensor([-1000.0]), torch.tensor([0.0]), "k3").item() == 10.0


def test_gspo_uses_one_ratio_per_sequence_by_hand():
    # sequence 1: token log-ratios log 2 and log 0.5 -> geometric mean 1 (no clipping);
    # sequence 2: log-ratios log 4, log 4, padding -> ratio 4, clipped at 1 + 4e-4.
    logp = torch.log(torch.tensor([[2.0, 0.5, 1.0], [4.0, 4.0, 1.0]])).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0], [1.0]])
    loss, clipped = gspo(logp, torch.zeros(2, 3), adv, mask, 3e-4, 4e-4)
    assert torch.allclose(loss * mask, torch.tensor([[-1.0, -1.0, 0.0], [-1.0004, -1.0004, 0.0]]))
    assert (clipped * mask).tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    # GSPO-token's gradient: s_i * d log pi_t for the unclipped sequence, 0 for the clipped
    (loss * mask).sum().backward()
    assert torch.allclose(logp.grad * mask, torch.tensor([[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_cispo_weights_by_hand():
    # ratios 1.5, 0.5, 1.0 with clip_high 0.28 and no lower bound (clip_low 1): weights
    # 1.28, 0.5, 1.0, and the gradient of -w * A * log pi is -w * A on every token.
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_()
    loss, clipped = cispo(logp, torch.zeros(1, 3), torch.tensor([[2.0]]), 1.0, 0.28)
    assert clipped.tolist() == [[1.0, 0.0, 0.0]]
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-2.56, -1.0, -2.0]]))


def test_kl_estimators_by_hand():
    logp = torch.tensor([0.0, math.log(2.0)])
    ref = torch.tensor([0.0, 0.0])
    # k1 = log 2; k2 = (log 2)^2 / 2; k3 = exp(-k1) + k1 - 1 = 0.5 + log 2 - 1
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([0.0, math.log(2.0)]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.0, math.log(2.0) ** 2 / 2]))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([0.0, 0.5 + math.log(2.0) - 1]))


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token-mean", 4, 2, 10).item() == pytest.approx(10 / 4)
    # per-sequence means 2 and 4, averaged
    assert aggregate(per_token, mask, "seq-mean-token-mean", 4, 2, 10).item() == pytest.approx(3.0)
    # sum 10 over 2 sequences x constant length 10
    assert aggregate(per_token, mask, "seq-mean-token-sum-norm", 4, 2, 10).item() == pytest.approx(0.5)
    # per-sequence sums 6 and 4, averaged
    assert aggregate(per_token, mask, "seq-mean-token-sum", 4, 2, 10).item() == pytest.approx(5.0)
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "sum", 4, 2, 10)


def batch(logp, old, ref, adv, mask, weight=None, n_tokens=None, n_seqs=None, norm_len=5):
    return LossBatch(logp, old, ref, adv, mask, torch.ones_like(mask) if weight is None else weight,
                     mask.sum().item() if n_tokens is None else n_tokens,
                     float(mask.shape[0]) if n_seqs is None else n_seqs, norm_len)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("name", ["grpo", "gspo", "cispo", "vppo"])
def test_micro_batch_losses_add_up_to_the_minibatch_loss(agg, name):
    torch.manual_seed(0)
    logp = torch.randn(4, 5)
    old = logp + 0.1 * torch.randn(4, 5)
    ref = logp + 0.2 * torch.randn(4, 5)
    adv = torch.randn(4, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).float()
    algo = make_algo(name, loss_agg=agg, kl_coef=0.1)
    n_tok = mask.sum().item()
    whole, _ = algo.loss(batch(logp, old, ref, adv, mask, n_tokens=n_tok, n_seqs=4))
    parts = sum(algo.loss(batch(logp[i:i + 2], old[i:i + 2], ref[i:i + 2], adv[i:i + 2],
                                mask[i:i + 2], n_tokens=n_tok, n_seqs=4))[0] for i in (0, 2))
    assert whole.item() == pytest.approx(parts.item(), rel=1e-6)


def test_kl_term_by_hand_and_its_aggregation():
    logp = torch.zeros(2, 2)
    ref = torch.full((2, 2), -1.0)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    kl = math.exp(-1) + 1 - 1  # k3 = exp(-k1) + k1 - 1 with k1 = logp - ref = 1
    zero = torch.zeros(2, 1)
    base, _ = make_algo("grpo", kl_coef=0.0).loss(batch(logp, logp, ref, zero, mask))
    assert base.item() == pytest.approx(0.0)
    # grpo: the KL is aggregated like the policy term (per-sequence means 1, 1 -> kl)
    with_kl, stats = make_algo("grpo", kl_coef=0.5).loss(batch(logp, logp, ref, zero, mask))
    assert with_kl.item() == pytest.approx(0.5 * kl)
    assert stats["kl_tokens"] == pytest.approx(3 * kl)
    # vppo: summed over each sequence's tokens (2 kl and 1 kl), averaged over sequences
    vppo, _ = make_algo("vppo", kl_coef=0.5).loss(batch(logp, logp, ref, zero, mask))
    assert vppo.item() == pytest.approx(0.5 * 1.5 * kl)


def test_mismatch_weights_scale_the_policy_term_only():
    logp = torch.zeros(1, 2, requires_grad=True)
    mask = torch.ones(1, 2)
    algo = make_algo("grpo", loss_agg="token-mean")
    b = batch(logp, logp.detach(), None, torch.tensor([[1.0]]), mask,
              weight=torch.tensor([[2.0, 0.0]]))
    loss, _ = algo.loss(b)
    loss.backward()
    # d/d logp of -(w * A * ratio) / 2 tokens: -2/2 on the first token, 0 on the dropped one
    assert logp.grad.tolist() == [[-1.0, 0.0]]


def test_rollout_correction_with_known_shifts():
    """The engine's log-probs are the trainer's shifted by known amounts: rho = exp(shift)."""
    old = torch.zeros(2, 3)
    shifts = torch.tensor([[0.0, math.log(4.0), -math.log(4.0)], [math.log(1.5), 0.0, 0.0]])
    engine = old - shifts                                # rho = exp(old - engine) = exp(shift)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w, touched = rollout_correction(old, engine, mask, "tis", "token", 2.0, 0.5, 2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 0.25], [1.5, 1.0, 0.0]]))
    assert touched == 1.0  # one token's ratio (4) was truncated
    w, touched = rollout_correction(old, engine, mask, "mis", "token", 2.0, 0.5, 2.0)
    assert w.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]] and touched == 2.0
    # sequence level: geometric means exp((0 + log 4 - log 4) / 3) = 1 and
    # exp((log 1.5 + 0) / 2) = sqrt(1.5), the same weight on all of a sequence's tokens
    w, _ = rollout_correction(old, engine, mask, "tis", "sequence", 2.0, 0.5, 2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 1.0, 1.0], [1.5 ** 0.5, 1.5 ** 0.5, 0.0]]))
    w, touched = rollout_correction(old, engine, mask, "mis", "sequence", 2.0, 0.5, 1.2)
    assert w.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]] and touched == 2.0
    m = mismatch_stats(old, engine, mask)
    assert m["mismatch_max_abs"] == pytest.approx(math.log(4.0))
    # k3 with k1 = engine - old = -shift: exp(shift) - shift - 1, summed over real tokens
    k3 = lambda x: math.exp(x) - x - 1
    want = k3(math.log(4.0)) + k3(-math.log(4.0)) + k3(math.log(1.5))
    assert m["mismatch_k3_tokens"] == pytest.approx(want)


def test_bad_settings_are_refused():
    for key, value in [("loss_agg", "mean"), ("policy_loss", "trpo"), ("kl_estimator", "k4"),
                       ("group_size", 1), ("dual_clip", 0.5)]:
        with pytest.raises(ValueError, match=key):
            make_algo("grpo", **{key: value})
