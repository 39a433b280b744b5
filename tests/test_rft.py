"""RFT's filtering and loss, on scripted samples whose correctness is known."""

import math

import pytest
import torch

from tests.conftest import make_algo

from nanovppo.algos.pg import LossBatch
from nanovppo.algos.rft import keep_mask
from tests.fakes import ScriptedEngine, batch, rollouts, source


def test_keep_mask_by_hand():
    c = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]).bool()
    assert keep_mask(c, None).sum().item() == 8
    # success rates 0.75, 0.25, 1.0: the band [0.2, 0.8] drops the all-solved prompt
    kept = keep_mask(c, (0.2, 0.8))
    assert kept.tolist()[2] == [False] * 4
    assert kept.sum().item() == 4


def test_keeps_exactly_the_correct_samples_whatever_their_shaped_reward():
    """Correct: ends with "d". "ax" has shaping 0.5 and is wrong; "bd" has no shaping and is
    correct. RFT keeps "ad", "bd", "cd" and never "ax" or "zz", whose totals (0.5 and 0)
    the old reward threshold of 0.5 would have let "ax" through."""
    ro = batch({"P:": ["ad", "ax", "bd", "zz"], "Q:": ["cd", "ax", "zz", "zz"]})
    samples, m = make_algo("rft", dedup=None).make_samples(ro, source(ScriptedEngine({})))
    kept = ["".join(map(chr, s.completion_ids)) for s in samples]
    assert kept == ["ad", "bd", "cd"]
    assert m["train/kept_frac"] == pytest.approx(3 / 8)
    assert all(s.advantage == 1.0 for s in samples)


def test_dedup_by_solution_and_by_answer():
    ro = rollouts("P:", ["ad", "bd", "ad", "zz"])
    # solutions: "ad" twice -> one of them; "bd" is another solution
    samples, m = make_algo("rft", dedup="solution").make_samples(ro, source(ScriptedEngine({})))
    assert ["".join(map(chr, s.completion_ids)) for s in samples] == ["ad", "bd"]
    assert m["train/correct_kept_frac"] == pytest.approx(2 / 3)
    # final answers: all three end in "d": one answer, one sample
    samples, _ = make_algo("rft", dedup="answer").make_samples(ro, source(ScriptedEngine({})))
    assert [s.completion_ids for s in samples] == [[ord("a"), ord("d")]]
    with pytest.raises(ValueError, match="dedup"):
        make_algo("rft", dedup="equation")


def test_nothing_kept_is_an_empty_list_not_an_error():
    samples, m = make_algo("rft").make_samples(rollouts("P:", ["ax", "zz"]), source(ScriptedEngine({})))
    assert samples == [] and m["train/kept_frac"] == 0.0


def test_loss_is_token_nll_at_temperature_one_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.125, 1.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = make_algo("rft").loss(LossBatch(logp, logp, None, None, mask, torch.ones(2, 2), 3, 2, 2))
    # -(log .5 + log .25 + log .125) / 3 = (1 + 2 + 3) log 2 / 3
    assert loss.item() == pytest.approx(2 * math.log(2.0))
    # supervised fine-tuning on the kept samples: temperature 1 whatever the sampling one
    assert make_algo("rft").loss_temperature(0.6) == 1.0


def test_bad_band_is_refused():
    with pytest.raises(ValueError, match="success_band"):
        make_algo("rft", success_band=[0.9, 0.1])
