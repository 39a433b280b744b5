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
    assert cfg[group].name == option or group == "inference_backend" and cfg[group].name == option
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
