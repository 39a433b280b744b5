"""GRPO's advantages and loss against values worked out by hand."""

import math

import pytest
import torch

from nanovppo.algos.grpo import GRPO, aggregate, clipped_policy_loss, group_advantages, k3_kl


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    # group 1: mean 0.5, population std 0.5 -> (r - 0.5) / 0.5 = +-1
    adv = group_advantages(rewards, scale=True, eps=0.0 + 1e-12)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    # group 2: all equal -> no signal at all (not NaN)
    assert torch.equal(adv[1], torch.zeros(4))
    # Dr.GRPO: centred only
    assert torch.allclose(group_advantages(rewards, scale=False)[0],
                          torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_group_advantages_uneven_by_hand():
    rewards = torch.tensor([[3.0, 0.0, 0.0]])  # mean 1, std sqrt(2)
    adv = group_advantages(rewards, scale=True, eps=0.0)
    s = math.sqrt(2.0)
    assert torch.allclose(adv, torch.tensor([[2 / s, -1 / s, -1 / s]]))


def test_clipped_loss_by_hand():
    # log-ratios 0, log 1.5, log 0.5: ratios 1, 1.5, 0.5
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
    mask = torch.ones(1, 3)
    # positive advantage 2: ratio 1.5 is clipped at 1.2 -> -2 * 1.2; ratio 0.5 is not
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([[2.0]]), mask, 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[-2.0, -2.4, -1.0]]))
    assert clipped.tolist() == [[0.0, 1.0, 0.0]]
    # negative advantage -1: ratio 0.5 is clipped at 0.8 -> +0.8; ratio 1.5 is not (1.5)
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([[-1.0]]), mask, 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[1.0, 1.5, 0.8]]))
    assert clipped.tolist() == [[0.0, 0.0, 1.0]]
    # clip-higher: high epsilon 0.28 lets ratio 1.5 reach 1.28
    loss, _ = clipped_policy_loss(logp, old, torch.tensor([[1.0]]), mask, 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([[-1.0, -1.28, -0.5]]))


def test_gradient_of_ratio_at_one_is_gradient_of_logp():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, logp.detach(), torch.tensor([[3.0]]), torch.ones(1, 2), 0.2, 0.2)
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-3.0, -3.0]]))


def test_k3_kl_by_hand():
    logp = torch.tensor([0.0, math.log(2.0)])
    ref = torch.tensor([0.0, 0.0])
    # r = ref - logp = [0, -log 2]; exp(r) - r - 1 = [0, 0.5 + log 2 - 1]
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([0.0, 0.5 + math.log(2.0) - 1]))


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token-mean", 4, 2, 10).item() == pytest.approx(10 / 4)
    # per-sequence means 2 and 4, averaged
    assert aggregate(per_token, mask, "seq-mean-token-mean", 4, 2, 10).item() == pytest.approx(3.0)
    # sum 10 over 2 sequences x constant length 10
    assert aggregate(per_token, mask, "seq-mean-token-sum-norm", 4, 2, 10).item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "sum", 4, 2, 10)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_losses_add_up_to_the_minibatch_loss(agg):
    torch.manual_seed(0)
    logp = torch.randn(4, 5)
    old = logp + 0.1 * torch.randn(4, 5)
    adv = torch.randn(4, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).float()
    algo = GRPO(loss_agg=agg)
    n_tok, n_seq = mask.sum().item(), 4
    whole, _ = algo.loss(logp, old, None, adv, mask, n_tok, n_seq, 5)
    parts = sum(algo.loss(logp[i:i + 2], old[i:i + 2], None, adv[i:i + 2], mask[i:i + 2],
                          n_tok, n_seq, 5)[0] for i in (0, 2))
    assert whole.item() == pytest.approx(parts.item(), rel=1e-6)


def test_kl_only_with_coefficient():
    logp = torch.zeros(1, 2)
    ref = torch.full((1, 2), -1.0)
    mask = torch.ones(1, 2)
    base, _ = GRPO(kl_coef=0.0).loss(logp, logp, ref, torch.zeros(1, 1), mask, 2, 1, 2)
    with_kl, stats = GRPO(kl_coef=0.5).loss(logp, logp, ref, torch.zeros(1, 1), mask, 2, 1, 2)
    kl = math.exp(-1) + 1 - 1  # exp(r) - r - 1 with r = -1
    assert base.item() == pytest.approx(0.0)
    assert with_kl.item() == pytest.approx(0.5 * kl)
    assert stats["kl_tokens"] == pytest.approx(2 * kl)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="loss_agg"):
        GRPO(loss_agg="mean")
    with pytest.raises(ValueError, match="group_size"):
        GRPO(group_size=1)


def test_rloo_and_reinforce_pp_by_hand():
    from nanovppo.algos.grpo import batch_normalized_advantages, rloo_advantages

    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # each sample minus the mean of the three others: 1 - 1/3, 0 - 2/3
    assert torch.allclose(rloo_advantages(r), torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))
    r = torch.tensor([[2.0, 2.0], [0.0, 0.0]])  # batch mean 1, std 1
    adv = batch_normalized_advantages(r, eps=0.0)
    # the better prompt's samples are pushed up, even though each group has no spread
    assert torch.allclose(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    assert GRPO(estimator="rloo").advantages(torch.tensor([[1.0, 0.0]])).tolist() == [[1.0, -1.0]]


def test_soft_overlong_penalty_by_hand():
    from nanovppo.algos.grpo import overlong_penalty

    lengths = torch.tensor([4, 6, 7, 8])
    # budget 8, buffer 4: no penalty up to 4 tokens, then -0.5 per token of the buffer... x2
    assert overlong_penalty(lengths, 8, 4, 2.0).tolist() == [0.0, -1.0, -1.5, -2.0]
    assert overlong_penalty(lengths, 8, 0, 2.0).tolist() == [0.0] * 4


def test_dynamic_sampling_keeps_groups_with_some_but_not_all_correct():
    """DAPO's rule reads correctness: of an all-correct group ("ad", "bd": totals 1.5, 1.0),
    a mixed one and an all-wrong one whose shaping still varies ("ax", "zz": 0.5, 0.0),
    only the mixed group is kept; the old total-reward rule keeps all three."""
    from tests.fakes import ScriptedEngine, batch, source

    ro = batch({"A:": ["ad", "bd"], "B:": ["ad", "zz"], "C:": ["ax", "zz"]})
    src = source(ScriptedEngine({}))
    src.more = lambda k: None  # no refill
    samples, m = GRPO(dynamic_sampling="correct").make_samples(ro, src)
    assert {s.prompt_ids[0] for s in samples} == {ord("B")} and m["train/kept_groups"] == 1
    samples, m = GRPO(dynamic_sampling="reward").make_samples(ro, src)
    assert m["train/kept_groups"] == 3
    with pytest.raises(ValueError, match="dynamic_sampling"):
        GRPO(dynamic_sampling="yes")


def test_dynamic_sampling_refills_with_informative_groups():
    from tests.fakes import ScriptedEngine, rollouts, source

    ro = rollouts("P:", ["ad", "ad"])  # one group, all correct: dropped
    src = source(ScriptedEngine({}))
    more_calls = []

    def more(k):
        more_calls.append(k)
        return rollouts("Q:", ["ad", "zz"]) if len(more_calls) == 2 else rollouts("R:", ["zz", "zz"])

    src.more = more
    algo = GRPO(dynamic_sampling="correct", max_extra_batches=3)
    samples, m = algo.make_samples(ro, src)
    assert more_calls == [1, 1]  # the first refill had no correct sample either
    assert m["train/extra_rollout_batches"] == 2 and m["train/kept_groups"] == 1
    assert [s.prompt_ids[0] for s in samples] == [ord("Q")] * 2
    assert samples[0].advantage > 0 > samples[1].advantage
    # bounded: with nothing informative anywhere it stops and keeps the original batch
    src.more = lambda k: rollouts("R:", ["zz", "zz"])
    samples, m = algo.make_samples(ro, src)
    assert m["train/extra_rollout_batches"] == 3 and all(s.advantage == 0 for s in samples)
