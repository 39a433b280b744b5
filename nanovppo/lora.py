"""LoRA adapters through peft: only the adapters train; the frozen base is the KL reference.

With ``model.lora`` set (``r``, ``alpha``, ``dropout``, ``target_modules``), the policy is
wrapped by ``peft.get_peft_model``: the base weights are frozen, the optimizer and the
checkpoints hold only the adapters' tensors, and

- the KL reference is the same module with its adapters disabled (``AdapterOffLogprobs``),
  so there is no second copy of the model;
- engines that keep their own weights (vLLM, SGLang, or the hf engine's copy in another
  dtype) receive the *merged* weights W + (alpha / r) B A under the base model's names
  (``engine_weights``: merge, stream, unmerge). vLLM's own LoRA loading is not used: it
  would apply the adapter in a separate kernel at every decoding step, and a pushed merged
  weight costs one copy per update;
- ``merged_model`` folds the adapters in for evaluation and export (a plain HF model folder
  that vLLM loads).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from nanovppo.errors import ConfigError
from nanovppo.models import frozen_copy

ADAPTER_CONFIG = "adapter_config.json"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ConfigError("model.lora needs peft: `pip install -e .[lora]` "
                          f"(or `make setup`, whose extras include it) ({e})") from None
    return peft


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def add_adapters(model, lora) -> torch.nn.Module:
    """``model`` wrapped with fresh LoRA adapters described by the ``model.lora`` node."""
    peft = _peft()
    config = peft.LoraConfig(r=int(lora.r), lora_alpha=float(lora.alpha),
                             lora_dropout=float(lora.dropout),
                             target_modules=list(lora.target_modules), bias="none",
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def load_adapters(model, adapter_dir: str | Path) -> torch.nn.Module:
    """``model`` with the trained adapters saved in ``adapter_dir`` (a checkpoint's model/)."""
    peft = _peft()
    return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def has_adapters(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_name(name: str) -> str:
    """A peft parameter name as the base model calls it:
    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@contextlib.contextmanager
def engine_weights(policy):
    """The weights an engine should hold, as (name, tensor) pairs under the base model's
    names: the policy's own parameters, or with LoRA the merged ones (merged for the
    duration of the block, then unmerged)."""
    if not is_lora(policy):
        yield policy.named_parameters()
        return
    policy.merge_adapter()
    try:
        yield [(base_name(n), p) for n, p in policy.named_parameters() if "lora_" not in n]
    finally:
        policy.unmerge_adapter()


def merged_model(policy) -> torch.nn.Module:
    """A plain transformers model with the adapters folded in (the policy is unchanged)."""
    return frozen_copy(policy).merge_and_unload() if is_lora(policy) else policy


class AdapterOffLogprobs(torch.nn.Module):
    """The KL reference of a LoRA policy: its log-probs with the adapters turned off, i.e.
    the frozen base model (the log-prob module of the same policy, under no gradient)."""

    def __init__(self, logprobs: torch.nn.Module):
        super().__init__()
        self.logprobs = logprobs  # e.g. PackedLogprobs(policy)

    def forward(self, *args, **kwargs):
        policy = self.logprobs.model
        with torch.no_grad(), policy.disable_adapter():
            return self.logprobs(*args, **kwargs)
