"""Every option of every config group composes, and builds what it names."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from nanovppo.train import CONF_DIR
from tests.conftest import compose_cfg

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml"))
          for g in Path(CONF_DIR).iterdir() if g.is_dir()}
OPTIONS = [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts]


def test_the_documented_groups_exist():
    assert {"algo", "model", "task", "hardware", "inference_backend"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_each_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    if group != "experiment":  # a recipe is global: it sets other groups (tested below)
        assert cfg[group].name == option
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group == "algo":
        algo = instantiate(cfg.algo)
        assert algo.name == option
    if group == "task":
        local = {}  # the offline fixtures, for tasks whose data lives on the hub
        if option in ("math", "gsm8k"):
            fixtures = Path(__file__).parent / "fixtures"
            local = {"data_files": str(fixtures / f"{option}_train.jsonl"),
                     "test_files": str(fixtures / f"{option}_test.jsonl")}
        task = instantiate(cfg.task, n_train=10, n_test=2, **local)
        assert task.train_examples and task.test_examples
    if group == "model":
        assert cfg.model.source in ("hub", "dir", "gguf", "tiny_random")


def test_a_malformed_override_is_a_clear_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="algo"):
        compose_cfg(["algo=no-such-algo"], tmp_path)
    cfg = compose_cfg(["algo.loss_agg=sum"], tmp_path)
    with pytest.raises(Exception, match="loss_agg"):
        instantiate(cfg.algo)


HARDWARE = ["cpu", "1gpu", "2gpu-sglang", "node", "multinode", "slurm"]


@pytest.mark.parametrize("hardware", HARDWARE)
def test_every_hardware_option_says_device_dtype_strategy_and_engine(hardware):
    cfg = compose_cfg([f"hardware={hardware}"])
    hw = cfg.hardware
    assert hw.name == hardware
    assert hw.device in ("cpu", "cuda")
    assert hw.strategy in ("ddp", "fsdp2")
    assert isinstance(hw.gradient_checkpointing, bool)
    assert hw.attn_implementation in (None, "eager", "sdpa")
    assert {hw.param_dtype, hw.compute_dtype} <= {"float32", "bfloat16"}
    want = {"cpu": "hf", "2gpu-sglang": "sglang"}.get(hardware, "vllm")
    assert cfg.inference_backend.name == want
    # the command line still chooses the engine over the hardware's default
    assert compose_cfg([f"hardware={hardware}", "inference_backend=hf"]).inference_backend.name == "hf"


def test_two_gpu_sglang_puts_the_server_on_the_second_gpu():
    cfg = compose_cfg(["hardware=2gpu-sglang"])
    assert cfg.inference_backend.base_gpu_id == 1
    assert compose_cfg(["hardware=1gpu", "inference_backend=sglang"]).inference_backend.base_gpu_id == 0


def test_slurm_selects_the_submitit_launcher():
    from hydra import compose, initialize_config_dir

    from nanovppo.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hardware=slurm"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()


@pytest.mark.parametrize("name,model,algo,task", [
    ("grpo_countdown_qwen3b", "qwen2.5-3b-instruct", "grpo", "countdown"),
    ("vppo_countdown_qwen1.5b", "qwen2.5-1.5b-instruct", "vppo", "countdown"),
    ("grpo_math_qwen1.5b", "qwen2.5-1.5b-instruct", "grpo", "math")])
def test_experiment_recipes(name, model, algo, task):
    cfg = compose_cfg([f"experiment={name}"])
    assert (cfg.model.name, cfg.algo.name, cfg.task.name) == (model, algo, task)
    assert cfg.hardware.name == "1gpu" and cfg.rollout.max_new_tokens == 1024
    assert cfg.algo.kl_coef == 0.001 and cfg.trainer.prompts_per_step == 16
    if name == "grpo_countdown_qwen3b":
        assert cfg.algo.group_size == 4 and cfg.algo.lr == 5e-6
    # a command-line override still wins over the recipe
    assert compose_cfg([f"experiment={name}", "algo.lr=3e-6"]).algo.lr == 3e-6
