"""Every recipe in conf/experiment/ composes, passes the run-level rules, builds its
algorithm, and holds the values that define the paper it claims."""

from pathlib import Path

import pytest

from nanovppo.config import CONF_DIR, build, check_node
from nanovppo.schema import check_config
from tests.conftest import compose_cfg

RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_composes_and_passes_the_rules(name):
    cfg = compose_cfg([f"experiment={name}"])
    check_config(cfg)
    build(cfg.algo, "algo")
    check_node(cfg.task, "task")
    if cfg.task.name == "countdown":  # generated offline: its test set can be counted
        task = build(cfg.task, "task")
        assert cfg.trainer.eval_examples <= len(task.test_examples)


# The VinePPO paper (arXiv 2410.01679, its appendix and the official configs): K = 9 MC
# continuations, 8 samples x 64 prompts, PPO-clip 0.2 both ways, 2 epochs, k3 KL 1e-4
# summed over each sequence, lr 1e-6, T 0.6 and top-p 0.9, 1024 new tokens; MATH's
# splitter joins fragments under 20 characters.
VINEPPO = {"algo.mc_rollouts": 9, "algo.group_size": 8, "trainer.prompts_per_step": 64,
           "algo.clip_low": 0.2, "algo.clip_high": 0.2, "algo.ppo_epochs": 2,
           "algo.kl_coef": 1e-4, "algo.kl_estimator": "k3", "algo.kl_agg": "seq-mean-token-sum",
           "algo.lr": 1e-6, "rollout.temperature": 0.6, "rollout.top_p": 0.9,
           "rollout.max_new_tokens": 1024, "algo.policy_loss": "ppo"}
PAPER = {
    "vppo_math_rho1b": {**VINEPPO, "algo.splitter": "math", "algo.min_step_chars": 20,
                        "task.name": "math"},
    "vppo_gsm8k_rho1b": {**VINEPPO, "algo.splitter": "newlines", "algo.max_steps": 25,
                         "task.name": "gsm8k"},
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_hold_the_papers_values(name):
    from omegaconf import OmegaConf

    cfg = compose_cfg([f"experiment={name}"])
    got = {k: OmegaConf.select(cfg, k) for k in PAPER[name]}
    assert got == PAPER[name]


def test_presets_hold_their_papers_aggregation_and_kl():
    """RLOO sums a completion's tokens (one action); REINFORCE++-baseline has its k3 KL."""
    from tests.conftest import make_algo

    assert make_algo("rloo").loss_agg == "seq-mean-token-sum"
    b = make_algo("reinforce_pp_baseline")
    assert (b.kl_coef, b.kl_estimator, b.kl_in_loss) == (1e-3, "k3", True)


def test_the_default_run_is_countdown_cpu_and_its_control_changes_only_the_phases():
    """`make train` with no arguments runs conf/experiment/countdown_cpu.yaml; its control
    is the same config but for a longer warm start, no RL and the kind tag."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nanovppo.tracking import flatten

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        default = compose(config_name="config")
    assert default == compose_cfg(["experiment=countdown_cpu"])
    assert default.inference_backend.name == "vllm" and default.warm_start.steps > 0
    assert default.trainer.eval_examples >= 256 and default.trainer.eval_pass_k == 8

    def flat(cfg):
        return flatten(OmegaConf.to_container(cfg, resolve=False))

    a, b = flat(default), flat(compose_cfg(["experiment=control"]))
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {
        "warm_start.steps", "trainer.max_steps", "tracking.kind"}
    assert b["warm_start.steps"] > a["warm_start.steps"] and b["trainer.max_steps"] == 0
    assert b["tracking.kind"] == "control"
