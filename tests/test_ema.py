"""trainer.ema: the average of the policy's weights, by hand and in a real run."""

import pytest
import torch

from nanovppo.ema import EMA
from nanovppo.optim import adamw
from tests.test_cli import ROOT, client, run_cli


def one_weight(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def test_average_by_hand():
    """decay 0.5 from w0 = 0 through weights 1, 2, 3: 0.5, then 0.5 * 0.5 + 0.5 * 2 = 1.25,
    then 0.5 * 1.25 + 0.5 * 3 = 2.125."""
    layer = one_weight(0.0)
    ema = EMA(layer, 0.5)
    seen = []
    for w in (1.0, 2.0, 3.0):
        with torch.no_grad():
            layer.weight.fill_(w)
        ema.update()
        seen.append(ema.average["weight"].item())
    assert seen == [0.5, 1.25, 2.125]


def test_the_hook_averages_after_each_optimizer_step():
    """SGD at lr 1 on loss = w (gradient 1) moves w from 0 to -1, -2, -3; with decay 0.75
    the average is 0.25 * -1 = -0.25, then 0.75 * -0.25 + 0.25 * -2 = -0.6875, then
    0.75 * -0.6875 + 0.25 * -3 = -1.265625. The trainer's own AdamW fires the hook too."""
    layer = one_weight(0.0)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    ema = EMA(layer, 0.75)
    ema.hook(opt)
    seen = []
    for _ in range(3):
        opt.zero_grad()
        layer(torch.ones(1, 1)).sum().backward()
        opt.step()
        seen.append(ema.average["weight"].item())
    assert seen == [-0.25, -0.6875, -1.265625]

    layer = one_weight(0.0)
    opt = adamw(layer.parameters(), lr=0.1)
    ema = EMA(layer, 0.5)
    ema.hook(opt)
    layer(torch.ones(1, 1)).sum().backward()
    opt.step()  # Adam's first step moves w by -lr exactly: w = -0.1, average -0.05
    assert layer.weight.item() == pytest.approx(-0.1)
    assert ema.average["weight"].item() == pytest.approx(-0.05)


def test_swapped_in_holds_the_average_and_gives_the_weights_back():
    layer = one_weight(4.0)
    ema = EMA(layer, 0.5)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    ema.update()  # 3.0
    with ema.swapped_in():
        assert layer.weight.item() == 3.0
    assert layer.weight.item() == 2.0


def test_only_trained_parameters_are_averaged_and_a_foreign_state_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    ema = EMA(model, 0.9)
    assert sorted(ema.average) == ["1.bias", "1.weight"]
    other = EMA(torch.nn.Linear(2, 1), 0.9)
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


@pytest.fixture
def importable_tests(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def _weights(checkpoint) -> dict:
    from safetensors.torch import load_file
    return load_file(checkpoint / "model" / "model.safetensors")


def test_a_run_averages_checkpoints_evaluates_and_resumes_the_ema(tmp_path, importable_tests):
    """decay 0.5, one optimizer step per RL step: after step 2 the average is
    0.5 * (0.5 * w0 + 0.5 * w1) + 0.5 * w2 = 0.25 w0 + 0.25 w1 + 0.5 w2, with w_k the
    weights of checkpoint step_k. A resume from step 2 restores it, so step 3's average is
    0.5 * ema_2 + 0.5 * w3 (a fresh one would be 0.5 * w2 + 0.5 * w3)."""
    common = ["task._target_=tests.scripted_tasks.EvenLengthCountdown", "algo.lr=1e-2",
              "algo.group_size=4", "trainer.prompts_per_step=2", "trainer.ema=0.5",
              "trainer.eval_every=1", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0"]
    run_cli(tmp_path, *common, "trainer.max_steps=2")
    [run_dir] = (tmp_path / "runs").glob("*/*")
    ck = run_dir / "checkpoints"
    w = [_weights(ck / f"step_00000{k}") for k in range(3)]
    ema2 = torch.load(ck / "step_000002" / "state.pt", weights_only=False)["ema"]["average"]
    name = "model.layers.0.mlp.down_proj.weight"
    want = 0.25 * w[0][name] + 0.25 * w[1][name] + 0.5 * w[2][name]
    assert not torch.equal(w[0][name], w[2][name]), "the policy must move for this to test anything"
    torch.testing.assert_close(ema2[name], want, rtol=0, atol=1e-6)

    run_cli(tmp_path, *common, f"resume={run_dir}", "trainer.max_steps=3")
    w3 = _weights(ck / "step_000003")
    ema3 = torch.load(ck / "step_000003" / "state.pt", weights_only=False)["ema"]["average"]
    torch.testing.assert_close(ema3[name], 0.5 * ema2[name] + 0.5 * w3[name], rtol=0, atol=1e-6)

    c = client(tmp_path)
    [run] = c.search_runs([c.get_experiment_by_name("nanovppo").experiment_id])
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "eval/accuracy_ema")]
    assert steps == [1, 2, 3]


def test_resuming_with_an_ema_from_a_run_without_one_is_a_clear_error(tmp_path):
    run_cli(tmp_path, "trainer.max_steps=1")
    [run_dir] = (tmp_path / "runs").glob("*/*")
    proc = run_cli(tmp_path, f"resume={run_dir}", "trainer.max_steps=2", "trainer.ema=0.9",
                   check=False)
    assert proc.returncode == 2 and "holds no EMA" in proc.stderr
