"""Every option of every config group composes, and builds what it names."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from nanovppo.config import CONF_DIR
from tests.conftest import compose_cfg

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml"))
          for g in Path(CONF_DIR).iterdir() if g.is_dir()}
OPTIONS = [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_each_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    if group != "experiment":  # a recipe is global: it sets other groups (tested below)
        assert cfg[group].name == option
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group == "algo":
        from nanovppo.algos.base import Algorithm

        algo = instantiate(cfg.algo)
        assert algo.name == option and isinstance(algo, Algorithm)
    if group == "task":
        local = {}  # the offline fixtures, for tasks whose data lives on the hub
        if option in ("math", "gsm8k"):
            fixtures = Path(__file__).parent / "fixtures"
            local = {"data_files": str(fixtures / f"{option}_train.jsonl"),
                     "test_files": str(fixtures / f"{option}_test.jsonl")}
        task = instantiate(cfg.task, n_train=10, n_test=2, **local)
        assert task.train_examples and task.test_examples


def test_a_malformed_override_is_a_clear_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="algo"):
        compose_cfg(["algo=no-such-algo"], tmp_path)
    cfg = compose_cfg(["algo.loss_agg=sum"], tmp_path)
    with pytest.raises(Exception, match="loss_agg"):
        instantiate(cfg.algo)


HARDWARE = sorted(p.stem for p in (Path(CONF_DIR) / "hardware").glob("*.yaml")
                  if p.stem != "base")


@pytest.mark.parametrize("hardware", HARDWARE)
def test_every_hardware_option_passes_the_run_level_rules(hardware):
    """Each hardware option, composed with the default recipe, holds values the trainer
    accepts (nanovppo/schema.py), and the command line still chooses the engine over the
    one the hardware option picks."""
    from nanovppo.schema import check_config

    check_config(compose_cfg([f"hardware={hardware}"]))
    assert compose_cfg([f"hardware={hardware}", "inference_backend=hf"]).inference_backend.name == "hf"


def test_slurm_selects_the_submitit_launcher():
    from hydra import compose, initialize_config_dir

    from nanovppo.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hardware=slurm"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()


RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def recipe_choices(name: str) -> dict:
    """The group choices a recipe's defaults list makes (``- override /group: option``),
    following a recipe that builds on another (``- other_recipe``)."""
    from omegaconf import OmegaConf

    choices = {}
    for entry in OmegaConf.load(Path(CONF_DIR) / "experiment" / f"{name}.yaml").get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            choices = {**recipe_choices(entry), **choices}
        elif not isinstance(entry, str):
            (key, option), = entry.items()
            choices[key.removeprefix("override /")] = option
    return choices


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_makes_its_group_choices(name):
    """A recipe's ``override /group: option`` entries take effect (a defaults list in the
    wrong order loses them), and a command-line key still wins over the recipe."""
    choices = recipe_choices(name)
    cfg = compose_cfg([f"experiment={name}"])
    assert {group: cfg[group].name for group in choices} == choices
    assert compose_cfg([f"experiment={name}", "algo.lr=3e-6"]).algo.lr == 3e-6


@pytest.mark.parametrize("task,splitter", [("math", "math"), ("gsm8k", "newlines")])
def test_vineppo_recipes_hold_the_papers_settings(task, splitter):
    """arXiv 2410.01679 and the official configs: K = 9, T = 0.6, top-p 0.9, lr 1e-6, 2 PPO
    epochs, 64 prompts x 8 samples in minibatches of 64, 1024 tokens, k3 KL 1e-4 summed
    per sequence, the SFT model's plain-text prompt."""
    cfg = compose_cfg([f"experiment=vppo_{task}_rho1b"])
    a = cfg.algo
    assert (cfg.model.path, cfg.task.name, a.name) == (f"realtreetune/rho-1b-sft-{task.upper()}", task, "vppo")
    assert (a.mc_rollouts, a.splitter, a.lr, a.ppo_epochs, a.group_size) == (9, splitter, 1e-6, 2, 8)
    assert cfg.trainer.prompts_per_step * a.group_size // a.num_minibatches == 64
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens) == (0.6, 0.9, 1024)
    assert (a.kl_coef, a.kl_estimator, a.kl_agg) == (1e-4, "k3", "seq-mean-token-sum")
    assert a.whiten_advantages and a.unfinished_penalty == 0.0
    assert cfg.task.template == "vineppo"
    fixtures = Path(__file__).parent / "fixtures"
    built = instantiate(cfg.task, data_files=str(fixtures / f"{task}_train.jsonl"),
                        test_files=str(fixtures / f"{task}_test.jsonl"))
    assert built.prompt_text({"question": "Q?"}) == "[MATH_TASK] Problem:\nQ?\n\nSolution:"
    assert built.stop == ("\n\n\nProblem:",)


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] in ("algo", "task", "inference_backend")],
                         ids=[f"{g}={o}" for g, o in OPTIONS if g in ("algo", "task", "inference_backend")])
def test_each_targets_parameters_and_its_yaml_keys_agree(group, option):
    """Every key of the YAML is a parameter of its _target_, and every parameter is in the
    YAML, so no default in code is ever used (the engines' model, tokenizer and seed, and
    the hf engine's copy_model, come from the trainer)."""
    from nanovppo.config import check_node, target_parameters

    node = compose_cfg([f"{group}={option}"])[group]
    extra = ["model", "tokenizer", "seed"] if group == "inference_backend" else []
    check_node(node, group, extra=extra)
    names, required, _ = target_parameters(node._target_)
    given = {k for k in node.keys() if not str(k).startswith("_")}
    assert names - given - set(extra) - {"copy_model"} == set()
    if group == "algo":  # algorithms take every knob from the YAML: no defaults in code
        assert required == names


def test_a_key_the_target_does_not_take_is_an_error_naming_it_and_the_closest():
    from nanovppo.config import build
    from nanovppo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"algo.mc_rolouts \(did you mean mc_rollouts\?\)"):
        build(compose_cfg(["algo=vppo", "+algo.mc_rolouts=4"]).algo, "algo")
    # a GRPO knob under algo=vppo is no silent no-op either
    with pytest.raises(ConfigError, match=r"VinePPO does not take algo.estimator"):
        build(compose_cfg(["algo=vppo", "+algo.estimator=rloo"]).algo, "algo")
    with pytest.raises(ConfigError, match="algo lacks group_size"):
        build(compose_cfg(["algo=grpo", "~algo.group_size"]).algo, "algo")
