"""RFT's filtering and loss."""

import pytest
import torch

from nanovppo.algos.rft import RFT, keep_mask
from tests.fakes import ScriptedEngine, rollouts, source


def test_keep_mask_by_hand():
    r = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert keep_mask(r, 1.0, None).sum().item() == 8
    # success rates 0.75, 0.25, 1.0: the band [0.2, 0.8] drops the all-solved prompt
    kept = keep_mask(r, 1.0, (0.2, 0.8))
    assert kept.tolist()[2] == [False] * 4
    assert kept.sum().item() == 4


def test_threshold_and_one_per_answer():
    ro = rollouts("P:", ["ad", "bd", "ad", "zz"])  # rewards 1.5, 1.0, 1.5, 0
    samples, m = RFT(threshold=1.0).make_samples(ro, source(ScriptedEngine({})))
    assert len(samples) == 3 and m["train/kept_frac"] == pytest.approx(0.75)
    # "ad", "bd" and "ad" all end in "d": one final answer, one sample
    samples, _ = RFT(threshold=1.0, one_per_answer=True).make_samples(ro, source(ScriptedEngine({})))
    assert [s.completion_ids for s in samples] == [[ord("a"), ord("d")]]


def test_nothing_kept_is_an_empty_list_not_an_error():
    samples, m = RFT(threshold=5.0).make_samples(rollouts("P:", ["ad", "zz"]),
                                                 source(ScriptedEngine({})))
    assert samples == [] and m["train/kept_frac"] == 0.0


def test_loss_is_token_nll_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.125, 1.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = RFT().loss(logp, logp, None, None, mask, 3, 2, 2)
    # -(log .5 + log .25 + log .125) / 3 = (1 + 2 + 3) log 2 / 3
    assert loss.item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())


def test_bad_band_is_refused():
    with pytest.raises(ValueError, match="success_band"):
        RFT(success_band=[0.9, 0.1])
