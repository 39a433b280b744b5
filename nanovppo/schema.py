"""The rules every run-level value of the config must meet, checked before any model loads.

``RULES`` maps each key of ``conf/config.yaml`` and of the hardware group to what it
allows; ``check_config(cfg)`` raises a one-line ``ConfigError`` for the first value that
breaks its rule, naming the key, the value and what is allowed:

    rollout.temperature=-1: must be a number > 0

The algorithm, task and engine nodes are checked by their own targets (``nanovppo.config
.build`` matches their keys to the constructor's parameters, and the constructor refuses
a bad value), so their rules live beside the code that uses them. The run-level keys are
read by the trainer directly, so their rules live here, in one table. A table of rules was
chosen over Hydra structured configs: a dataclass schema checks types when Hydra composes
the config but not ranges, and a range check in ``__post_init__`` does not run when a
command-line override is merged into the node; one table also reads as the list of what
each knob allows. A test (tests/test_schema.py) feeds each rule a bad value, and checks
that every key the YAML holds has a rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from nanovppo.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """A test of one value, and the words that say what it allows."""

    ok: Callable[[Any], bool]
    allowed: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}")


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Rule:
    def ok(v) -> bool:
        if not _is_num(v) or v != v:  # NaN is not a number here
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return not (high is not None and (v >= high if high_open else v > high))

    if low is not None and high is not None:
        text = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        text = f"a number {'>' if low_open else '>='} {low}"
    else:
        text = "a number"
    return Rule(ok, text)


def choice(*options: str) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join(options))


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"null or {rule.allowed}")


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
BETAS = Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == 2
             and all(_is_num(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)")
DTYPE = choice("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")

# Every run-level key, with what it allows (the comments in the YAML say what it does).
RULES: dict[str, Rule] = {
    "seed": integer(0),
    "resume": optional(TEXT),
    "paths.outputs": TEXT,
    "rollout.max_new_tokens": integer(1),
    "rollout.temperature": number(0, low_open=True),
    "rollout.top_p": number(0, 1, low_open=True),
    "rollout.correction.mode": choice("auto", "off", "tis", "mis"),
    "rollout.correction.level": choice("token", "sequence"),
    "rollout.correction.cap": number(1),
    "rollout.correction.low": number(0, 1, low_open=True),
    "rollout.correction.high": number(1),
    "rollout.sync_check.enabled": BOOL,
    "rollout.sync_check.max_gap": number(0, low_open=True),
    "warm_start.steps": integer(0),
    "warm_start.batch_size": integer(1),
    "warm_start.demonstrations": optional(integer(1)),
    "warm_start.lr": number(0, low_open=True),
    "warm_start.schedule": choice("constant", "linear"),
    "trainer.max_steps": integer(0),
    "trainer.prompts_per_step": integer(1),
    "trainer.micro_batch_size": integer(1),
    "trainer.warmup_steps": integer(0),
    "trainer.lr_schedule": choice("constant", "cosine", "linear"),
    "trainer.weight_decay": number(0),
    "trainer.adam_betas": BETAS,
    "trainer.optimizer": choice("adamw", "adamw8bit"),
    "trainer.ema": optional(number(0, 1, low_open=True, high_open=True)),
    "trainer.max_grad_norm": optional(number(0, low_open=True)),
    "trainer.eval_every": integer(0),
    "trainer.eval_examples": integer(0),
    "trainer.eval_pass_k": integer(0),
    "trainer.checkpoint_every": integer(0),
    "trainer.keep_checkpoints": integer(0),
    "trainer.samples_every": integer(0),
    "trainer.logprob_chunk_tokens": integer(1),
    "trainer.progress": BOOL,
    "trainer.fast": BOOL,
    "trainer.fused_kernels": BOOL,
    "tracking.uri": optional(TEXT),
    "tracking.experiment": TEXT,
    "tracking.run_name": optional(TEXT),
    "tracking.kind": choice("train", "control"),
    "tracking.system_metrics_interval": optional(number(0, low_open=True)),
    "tracking.log_models": BOOL,
    "hardware.name": TEXT,
    "hardware.device": choice("cpu", "cuda"),
    "hardware.param_dtype": choice("float32", "bfloat16", "fp32", "bf16"),
    "hardware.bf16_rounding": choice("kahan", "stochastic"),
    "hardware.compute_dtype": DTYPE,
    "hardware.threads": optional(integer(1)),
    "hardware.strategy": choice("ddp", "fsdp2"),
    "hardware.attn_implementation": optional(choice("eager", "sdpa", "flash_attention_2",
                                                    "flex_attention")),
    "hardware.gradient_checkpointing": BOOL,
    "hardware.low_memory": BOOL,
    "hardware.onednn_cache": optional(integer(1)),
    "hardware.engine_memory_fraction": number(0, 1, low_open=True),
    "hardware.engine_gpu": integer(0),
}


_ABSENT = object()  # what OmegaConf.select gives for a key the config does not hold


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def check_keys(cfg: DictConfig, keys) -> None:
    """Raise a ``ConfigError`` for the first of ``keys`` whose value breaks its rule."""
    for key in keys:
        rule = RULES[key]
        node = OmegaConf.select(cfg, key, throw_on_missing=False, default=_ABSENT)
        if node is _ABSENT:
            raise ConfigError(f"{key} is missing: it must be {rule.allowed}")
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if not rule.ok(value):
            raise ConfigError(f"{key}={_show(value)}: must be {rule.allowed}")


def check_config(cfg: DictConfig) -> None:
    """Raise a ``ConfigError`` for the first run-level value that breaks its rule (or a
    rule that spans two keys)."""
    check_keys(cfg, RULES)
    c = cfg.rollout.correction
    if c.low >= c.high:
        raise ConfigError(f"rollout.correction.low={_show(c.low)} must be below "
                          f"rollout.correction.high={_show(c.high)}")


def check_against_task(cfg: DictConfig, task) -> None:
    """The rules that need the task: an evaluation asks for no more held-out problems
    than the test set holds."""
    n_test = len(task.test_examples)
    if cfg.trainer.eval_examples > n_test:
        raise ConfigError(f"trainer.eval_examples={cfg.trainer.eval_examples}: must be at most "
                          f"{n_test}, the size of {cfg.task.name}'s test set")
