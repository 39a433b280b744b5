"""GRPO's family of advantage estimators and its experience, against values worked out by hand."""

import math

import pytest
import torch

from nanovppo.algos.grpo import (group_advantages, overlong_penalty, rloo_advantages,
                                 whiten_over_tokens)
from tests.conftest import make_algo
from tests.fakes import ScriptedEngine, batch, rollouts, source


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    # group 1: mean 0.5, std with Bessel's correction sqrt(4 * 0.25 / 3) = 1/sqrt(3)
    adv = group_advantages(rewards, scale=True, eps=0.0)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 * math.sqrt(3))
    # group 2: all equal -> no signal at all (not NaN)
    assert torch.equal(group_advantages(rewards)[1], torch.zeros(4))
    # Dr.GRPO: centred only
    assert torch.allclose(group_advantages(rewards, scale=False)[0],
                          torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_group_advantages_uneven_by_hand():
    rewards = torch.tensor([[3.0, 0.0, 0.0]])  # mean 1, unbiased variance (4 + 1 + 1) / 2 = 3
    adv = group_advantages(rewards, scale=True, eps=0.0)
    s = math.sqrt(3.0)
    assert torch.allclose(adv, torch.tensor([[2 / s, -1 / s, -1 / s]]))


def test_rloo_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # each sample minus the mean of the three others: 1 - 1/3, 0 - 2/3
    assert torch.allclose(rloo_advantages(r), torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))
    assert make_algo("rloo").advantages(torch.tensor([[1.0, 0.0]])).tolist() == [[1.0, -1.0]]


def test_whitening_over_tokens_weighs_each_token():
    # tokens: 1, 1 (a 2-token completion) and -2: mean 0, unbiased variance (1 + 1 + 4) / 2 = 3
    out = whiten_over_tokens([torch.tensor([1.0, 1.0]), torch.tensor([-2.0])], eps=0.0)
    s = math.sqrt(3.0)
    assert torch.allclose(torch.cat(out), torch.tensor([1 / s, 1 / s, -2 / s]))


def test_reinforce_pp_baseline_by_hand():
    """Two prompts: "A:" rewards 1.5 ("ad") and 0 ("zz"), "B:" rewards 1.0 ("bd") and 1.0
    ("cd"). Minus the group means: +0.75, -0.75, 0, 0, on 2 tokens each. Over the 8
    tokens: mean 0, unbiased variance 4 * 0.5625 / 7, so +-0.75 / sqrt(2.25 / 7)."""
    ro = batch({"A:": ["ad", "zz"], "B:": ["bd", "cd"]})
    samples, _ = make_algo("reinforce_pp_baseline").make_samples(ro, source(ScriptedEngine({})))
    a = 0.75 / math.sqrt(2.25 / 7)
    want = [[a, a], [-a, -a], [0.0, 0.0], [0.0, 0.0]]
    for s, w in zip(samples, want):
        assert s.advantage == pytest.approx(w, rel=1e-5)


def test_reinforce_pp_folds_the_kl_into_per_token_returns_by_hand():
    """One sample per prompt. Sample 1 ("ad", reward 1.5): k1 = old - ref = [0.5, 1.0], so
    with kl_coef 0.1 the token rewards are [-0.05, -0.1 + 1.5] and the returns [1.35, 1.4].
    Sample 2 ("zz", reward 0): k1 = [0, 0] -> returns [0, 0]. Whitened over the 4 tokens:
    mean 0.6875, unbiased variance sum((x - 0.6875)^2) / 3."""
    ro = batch({"A:": ["ad"], "B:": ["zz"]})
    algo = make_algo("reinforce_pp", kl_coef=0.1)
    assert algo.group_size == 1 and algo.kl_in_reward and not algo.kl_in_loss
    samples, _ = algo.make_samples(ro, source(ScriptedEngine({})))
    old = [torch.tensor([0.0, 0.0]), torch.tensor([-1.0, -1.0])]
    ref = [torch.tensor([-0.5, -1.0]), torch.tensor([-1.0, -1.0])]
    algo.fold_kl(samples, old, ref)
    x = torch.tensor([1.35, 1.4, 0.0, 0.0])
    want = (x - x.mean()) / x.std()
    assert samples[0].advantage + samples[1].advantage == pytest.approx(want.tolist(), rel=1e-5)


def test_soft_overlong_penalty_by_hand():
    lengths = torch.tensor([4, 6, 7, 8])
    # budget 8, buffer 4: no penalty up to 4 tokens, then -0.5 per token of the buffer... x2
    assert overlong_penalty(lengths, 8, 4, 2.0).tolist() == [0.0, -1.0, -1.5, -2.0]
    assert overlong_penalty(lengths, 8, 0, 2.0).tolist() == [0.0] * 4


def test_presets_behave_as_their_papers_say_on_one_batch():
    """One batch through GRPO and each preset: rewards [1, 0, 0, 1] and two tokens whose
    ratio to the sampling policy is 1.25, advantage +1, one per sequence (2 sequences).

    - Advantages: GRPO scales by the group's std (1/sqrt(3), Bessel): +-0.5 sqrt(3);
      Dr.GRPO (arXiv 2503.20783) only centres: +-0.5.
    - Clipping at ratio 1.25 and A > 0: GRPO's 1 + 0.2 clips both tokens (loss -1.2 each,
      mean over tokens of each sequence, then over sequences: -1.2); DAPO's clip-higher
      1 + 0.28 (arXiv 2503.14476) clips neither (-1.25).
    - GSPO (arXiv 2507.18071) clips the sequence ratio 1.25 to 1 + 4e-4: -1.0004.
    - CISPO (MiniMax-M1) weights A log pi by the detached ratio, clipped to at most
      1 + 4 = 5: the loss value is -1.25 log pi = -1.25 log 1.25 per token, and nothing is
      clipped at 1.25.
    And REINFORCE++'s KL-in-reward is refused with GRPO's estimator."""
    from nanovppo.algos.pg import LossBatch

    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(make_algo("grpo").advantages(rewards),
                          torch.tensor([[1.0, -1.0, -1.0, 1.0]]) * 0.5 * math.sqrt(3))
    assert torch.allclose(make_algo("drgrpo").advantages(rewards),
                          torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    logp = torch.full((2, 1), math.log(1.25))                                  # [B, C]
    ones = torch.ones(2, 1)
    b = LossBatch(logp, torch.zeros(2, 1), None, ones, ones, ones, 2.0, 2.0, 1.0)
    want = {"grpo": (-1.2, 2.0), "dapo": (-1.25, 0.0), "gspo": (-1.0004, 2.0),
            "cispo": (-1.25 * math.log(1.25), 0.0)}
    for name, (loss, clipped) in want.items():
        got, stats = make_algo(name).loss(b)
        assert got.item() == pytest.approx(loss, rel=1e-5), name
        assert stats["clip_tokens"] == clipped, name
    with pytest.raises(ValueError, match="kl_in_reward"):
        make_algo("grpo", kl_in_reward=True)


def test_dynamic_sampling_keeps_groups_with_some_but_not_all_correct():
    """DAPO's rule reads correctness: of an all-correct group ("ad", "bd": totals 1.5, 1.0),
    a mixed one and an all-wrong one whose shaping still varies ("ax", "zz": 0.5, 0.0),
    only the mixed group is kept; the old total-reward rule keeps all three."""
    ro = batch({"A:": ["ad", "bd"], "B:": ["ad", "zz"], "C:": ["ax", "zz"]})
    src = source(ScriptedEngine({}))
    src.more = lambda k: None  # no refill
    samples, m = make_algo("grpo", dynamic_sampling="correct").make_samples(ro, src)
    assert {s.prompt_ids[0] for s in samples} == {ord("B")} and m["train/kept_groups"] == 1
    samples, m = make_algo("grpo", dynamic_sampling="reward").make_samples(ro, src)
    assert m["train/kept_groups"] == 3
    with pytest.raises(ValueError, match="dynamic_sampling"):
        make_algo("grpo", dynamic_sampling="yes")


def test_dynamic_sampling_refills_with_informative_groups():
    ro = rollouts("P:", ["ad", "ad"])  # one group, all correct: dropped
    src = source(ScriptedEngine({}))
    more_calls = []

    def more(k):
        more_calls.append(k)
        return rollouts("Q:", ["ad", "zz"]) if len(more_calls) == 2 else rollouts("R:", ["zz", "zz"])

    src.more = more
    algo = make_algo("grpo", dynamic_sampling="correct", max_extra_batches=3)
    samples, m = algo.make_samples(ro, src)
    assert more_calls == [1, 1]  # the first refill had no correct sample either
    assert m["train/extra_rollout_batches"] == 2 and m["train/kept_groups"] == 1
    assert [s.prompt_ids[0] for s in samples] == [ord("Q")] * 2
    assert samples[0].advantage > 0 > samples[1].advantage
    # bounded: with nothing informative anywhere it stops and keeps the original batch
    src.more = lambda k: rollouts("R:", ["zz", "zz"])
    samples, m = algo.make_samples(ro, src)
    assert m["train/extra_rollout_batches"] == 3 and all(s.advantage == 0 for s in samples)


def test_demonstrations_join_each_group_with_a_group_relative_advantage(tiny):
    """``algo.demonstrations``: the default task's demonstration of each prompt becomes one
    more member of its group, scored by the task (correct: reward 1; the default pays
    correctness only) and tokenised as the warm start does. A group of two wrong samples
    (reward 0) and its demonstration has rewards [0, 0, 1]: mean 1/3, std sqrt(1/3)
    (Bessel: ((1/9 + 1/9 + 4/9) / 2) ** 0.5), so the samples get -(1/3) / sqrt(1/3) =
    -0.5774 and the demonstration (2/3) / sqrt(1/3) = 1.1547. Without the option, every
    advantage is 0 and nothing else joins."""
    from nanovppo.config import build
    from nanovppo.engines.base import Completion, Sampling
    from nanovppo.rollout import RolloutSource, render_prompt, score
    from tests.conftest import compose_cfg

    _, tok = tiny
    task = build(compose_cfg(["experiment=countdown_cpu", "task.n_train=2",
                              "task.n_test=1"]).task, "task")
    examples = task.train_examples[:2]
    prompts = [render_prompt(task, tok, ex) for ex in examples]
    wrong = [[Completion([5, 6], "no idea", "stop", [-1.0, -1.0], p)] * 2 for p in prompts]
    ro = score(task, examples, prompts, wrong)
    src = RolloutSource(task, tok, None, Sampling(n=2, temperature=1.0, max_new_tokens=48))

    plain, _ = make_algo("grpo").make_samples(ro, src)
    assert len(plain) == 4 and all(s.advantage == 0 for s in plain)

    samples, _ = make_algo("grpo", demonstrations=True).make_samples(ro, src)
    assert [s.group for s in samples] == [0, 0, 0, 1, 1, 1]
    for g, ex in enumerate(examples):
        *sampled, demo = samples[3 * g:3 * g + 3]
        assert demo.completion_ids == tok(task.demonstration(ex), add_special_tokens=False).input_ids
        assert demo.prompt_ids == prompts[g] and demo.reward == 1.0
        assert demo.engine_logprobs is None and not demo.truncated
        assert demo.advantage == pytest.approx(1.1547, abs=1e-4)
        assert [s.advantage for s in sampled] == pytest.approx([-0.5774] * 2, abs=1e-4)
    with pytest.raises(ValueError, match="demonstrations"):
        make_algo("grpo", demonstrations="yes")
