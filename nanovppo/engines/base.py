"""The rollout-engine protocol that every inference backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


@dataclass
class Sampling:
    """How to sample: ``n`` completions per prompt, at most ``max_new_tokens`` each."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    # Return each sampled token's log-prob. Off where only the text counts (evaluations,
    # VinePPO's continuations): the vllm engine then skips computing them.
    logprobs: bool = True


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the sampling
    distribution at the engine's temperature (before top-p), or None where an engine does
    not return them (vllm with top_p < 1, whose log-probs come after top-p). ``finish_reason`` is "stop" (EOS or a stop string) or "length".
    """

    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    prompt_ids: list[int] = field(default_factory=list)


class Engine(Protocol):
    """What the trainer asks of an inference backend (tests/test_engine_contract.py checks
    the three engines against it)."""

    name: str
    # The trainer sets this: show a decoding bar (generated tokens per second) or not.
    progress: bool
    # True where the engine samples with the trainer's own numerics (the hf engine): the
    # engine/trainer mismatch correction is then off under rollout.correction.mode=auto.
    trainer_numerics: bool
    # True where the engine samples from the policy's own module: nothing to push.
    shares_policy: bool

    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 max_new_tokens: list[int] | None = None) -> list[list[Completion]]:
        """``sampling.n`` completions for each prompt (given as token ids), grouped by
        prompt; ``max_new_tokens`` optionally sets each prompt's own budget."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load trained weights into the engine's model."""

    def sleep(self) -> None:
        """Free what the engine holds while the trainer works (no-op where not supported)."""

    def wake_up(self) -> None:
        """Undo ``sleep``."""

    def score(self, token_ids: list[int]) -> list[float]:
        """Log-probs at temperature 1 of ``token_ids[1:]``, each given the tokens before it,
        under the engine's current weights (``nanovppo/sync.py`` compares them with the
        trainer's after every weight push)."""

    def close(self) -> None:
        """Release the engine."""

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the engine's sampling stream."""

    def load_state_dict(self, state: dict) -> None:
        """Undo ``state_dict``: continue the saved stream."""


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, detached; a sharded FSDP2 parameter (a DTensor) is
    gathered from all ranks, so every rank must call this for the same parameters."""
    gather = getattr(tensor, "full_tensor", None)
    return (gather() if gather is not None else tensor).detach()
