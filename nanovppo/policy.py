"""The policy the trainer trains, the frozen reference its KL term compares with, and how
the rollout engine receives the policy's weights."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from nanovppo import distributed as dd
from nanovppo import lora as lora_mod
from nanovppo.errors import ConfigError
from nanovppo.logprobs import checkpoint_layers
from nanovppo.models import frozen_copy, load_model


def load_policy(cfg, policy_cfg, run_dir: Path, resuming: bool, device):
    """The policy (with LoRA adapters when ``model.lora`` is set) and its tokenizer: the
    configured model for a new run; the latest checkpoint (``policy_cfg``) when resuming
    (with LoRA: the base, i.e. the RL start's whole weights if a warm start saved them,
    plus the saved adapters)."""
    adapters = None
    if resuming and lora_mod.has_adapters(policy_cfg.path):
        adapters = policy_cfg.path
        policy_cfg = _rl_start(cfg, run_dir) or cfg.model
    policy, tokenizer = load_model(policy_cfg, dtype=cfg.hardware.param_dtype)
    policy.to(device)
    set_attention(policy, cfg.hardware.attn_implementation)
    if cfg.hardware.gradient_checkpointing:
        checkpoint_layers(policy, dd.decoder_layers(policy))
    if adapters is not None:
        policy = lora_mod.load_adapters(policy, adapters)
    elif cfg.model.lora:
        policy = lora_mod.add_adapters(policy, cfg.model.lora)
    return policy, tokenizer


def reference_model(cfg, policy, run_dir: Path, resuming: bool, device):
    """The frozen policy RL started from, for the KL term (a plain module; the caller wraps
    it for log-probs), or None with LoRA, where the reference is the policy itself with its
    adapters off (``lora.AdapterOffLogprobs``). A new run copies the policy (after any warm
    start, that is the RL start); a resumed one loads the RL start, checkpoint step_000000,
    or the configured model if the run saved none."""
    if lora_mod.is_lora(policy):
        return None
    if not resuming:
        ref = frozen_copy(policy)
    else:
        ref, _ = load_model(_rl_start(cfg, run_dir) or cfg.model, dtype=cfg.hardware.param_dtype)
        set_attention(ref, cfg.hardware.attn_implementation)
    return ref.to(device).eval().requires_grad_(False)


def _rl_start(cfg, run_dir: Path):
    """The model config of a run's RL start (checkpoint step_000000), if it was saved whole."""
    start = Path(run_dir) / "checkpoints" / "step_000000" / "model"
    if (start / "config.json").is_file():
        return OmegaConf.create({"name": cfg.model.name, "source": "dir", "path": str(start)})
    return None


def set_attention(model, name: str | None) -> None:
    if not name:
        return
    try:
        model.set_attn_implementation(str(name))
    except (ValueError, ImportError) as e:
        raise ConfigError(f"hardware.attn_implementation={name}: {e}") from None


def sync_engine(engine, policy) -> None:
    """Push the policy's weights to the engine (with LoRA: merged into the base's)."""
    if engine.shares_policy:
        return  # the hf engine samples from the policy's own module
    with lora_mod.engine_weights(policy) as named:
        engine.update_weights(named)
