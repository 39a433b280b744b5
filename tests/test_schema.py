"""The run-level rules of nanovppo/schema.py: each refuses a bad value with one line that
names the key, and every key the YAML holds has a rule."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from nanovppo.errors import ConfigError
from nanovppo.schema import RULES, check_against_task, check_config
from tests.conftest import compose_cfg

# For each rule, a value it must refuse (wrong range or wrong type).
BAD = {
    "seed": -1,
    "resume": "",
    "paths.outputs": "",
    "rollout.max_new_tokens": 0,
    "rollout.temperature": -1,
    "rollout.top_p": 0,
    "rollout.correction.mode": "sometimes",
    "rollout.correction.level": "batch",
    "rollout.correction.cap": 0.5,
    "rollout.correction.low": 1.5,
    "rollout.correction.high": 0.9,
    "rollout.sync_check.enabled": "on",
    "rollout.sync_check.max_gap": -0.1,
    "warm_start.steps": -3,
    "warm_start.batch_size": 0,
    "warm_start.demonstrations": 0,
    "warm_start.lr": 0,
    "warm_start.schedule": "cosine",
    "trainer.max_steps": -1,
    "trainer.prompts_per_step": 0,
    "trainer.micro_batch_size": 0,
    "trainer.warmup_steps": -1,
    "trainer.lr_schedule": "step",
    "trainer.weight_decay": -0.1,
    "trainer.adam_betas": [0.9, 1.0],
    "trainer.optimizer": "adam8bit",
    "trainer.ema": 1.0,
    "trainer.max_grad_norm": 0,
    "trainer.eval_every": -1,
    "trainer.eval_examples": -1,
    "trainer.eval_pass_k": 2.5,
    "trainer.checkpoint_every": -10,
    "trainer.keep_checkpoints": -1,
    "trainer.samples_every": 1.5,
    "trainer.logprob_chunk_tokens": 0,
    "trainer.progress": "yes",
    "trainer.fast": 1,
    "trainer.fused_kernels": "yes",
    "tracking.uri": "",
    "tracking.experiment": " ",
    "tracking.run_name": 3,
    "tracking.kind": "baseline",
    "tracking.system_metrics_interval": 0,
    "tracking.log_models": "no",
    "hardware.name": None,
    "hardware.device": "tpu",
    "hardware.param_dtype": "float16",
    "hardware.bf16_rounding": "nearest",
    "hardware.compute_dtype": "int8",
    "hardware.threads": 0,
    "hardware.strategy": "zero3",
    "hardware.attn_implementation": "fast",
    "hardware.gradient_checkpointing": "true",
    "hardware.low_memory": None,
    "hardware.onednn_cache": 0,
    "hardware.engine_memory_fraction": 1.5,
    "hardware.engine_gpu": -1,
}


def test_every_rule_has_a_bad_value_and_every_run_level_key_a_rule():
    assert set(BAD) == set(RULES)
    cfg = OmegaConf.to_container(compose_cfg(), resolve=False)

    def leaves(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and key not in RULES:
                yield from leaves(v, key + ".")
            else:
                yield key

    run_level = {k: cfg[k] for k in ("seed", "resume", "paths", "rollout", "warm_start",
                                     "trainer", "tracking", "hardware")}
    assert set(leaves(run_level, "")) == set(RULES)


def test_the_defaults_and_every_hardware_option_pass():
    for hw in ("cpu", "1gpu", "2gpu-sglang", "node", "multinode"):
        check_config(compose_cfg([f"hardware={hw}"]))


@pytest.mark.parametrize("key", sorted(BAD))
def test_each_rule_refuses_its_bad_value_in_one_line(key):
    cfg = compose_cfg()
    OmegaConf.update(cfg, key, BAD[key], force_add=True)
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}=") and "must be" in msg, msg


def test_ranges_by_hand():
    """The edges: top_p 1 and temperature 1e-6 are allowed, top_p 1.0001 is not; an
    integer given as a float is refused for a count; a number may be written as an int."""
    for key, value, ok in [("rollout.top_p", 1.0, True), ("rollout.top_p", 1.0001, False),
                           ("rollout.temperature", 1e-6, True), ("rollout.temperature", 0, False),
                           ("trainer.max_steps", 2.0, False), ("warm_start.lr", 1, True),
                           ("trainer.max_grad_norm", None, True), ("hardware.threads", None, True),
                           ("rollout.temperature", float("nan"), False),
                           ("trainer.progress", 0, False)]:
        cfg = compose_cfg()
        OmegaConf.update(cfg, key, value)
        if ok:
            check_config(cfg)
        else:
            with pytest.raises(ConfigError):
                check_config(cfg)


def test_correction_range_must_be_ordered():
    cfg = compose_cfg(["rollout.correction.low=0.9", "rollout.correction.high=1.0"])
    check_config(cfg)
    cfg.rollout.correction.low = 1.0
    with pytest.raises(ConfigError, match="rollout.correction.low=1.0 must be below"):
        check_config(cfg)


def test_eval_examples_no_more_than_the_test_set():
    from nanovppo.config import build

    cfg = compose_cfg(["task.n_test=8", "trainer.eval_examples=8"])
    task = build(cfg.task, "task")
    assert len(task.test_examples) == 8
    check_against_task(cfg, task)
    cfg.trainer.eval_examples = 9
    with pytest.raises(ConfigError, match=r"trainer.eval_examples=9: must be at most 8"):
        check_against_task(cfg, task)


@pytest.mark.parametrize("override,key", [("rollout.temperature=-1", "rollout.temperature"),
                                          ("trainer.prompts_per_step=0",
                                           "trainer.prompts_per_step"),
                                          ("trainer.eval_examples=5", "trainer.eval_examples")])
def test_the_cli_refuses_a_bad_value_with_one_line_before_loading_a_model(tmp_path, override,
                                                                          key):
    """4 test problems, so eval_examples=5 is one too many. The model folder does not
    exist: the check must come before the model loads, or that error would show."""
    cmd = [sys.executable, "-m", "nanovppo.train", "experiment=bare", "task.n_test=4",
           "trainer.eval_examples=2",
           f"paths.outputs={tmp_path}", "model.source=dir", f"model.path={tmp_path}/none",
           override]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {key}="), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
