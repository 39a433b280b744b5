"""An exponential moving average (EMA) of the policy's trained weights (``trainer.ema``).

After every optimizer step each trained parameter's average moves towards it:

    ema <- decay * ema + (1 - decay) * param

starting from the weights RL starts from, so after k steps with parameters p_1..p_k the
average is decay^k * p_0 + (1 - decay) * sum_i decay^(k-i) * p_i. Evaluations then also
score the average (``eval/accuracy_ema``), which smooths the noise of single RL steps; the
live policy is what keeps training. Each process averages the parameters it holds: the
whole model under one process or DDP (the copies agree, as the parameters do), its shard
under FSDP2. With LoRA only the adapters train, so only they are averaged.
"""

from __future__ import annotations

import contextlib

import torch

from nanovppo.distributed import is_sharded, local_shard


class EMA:
    """The average of ``model``'s trained parameters, kept in fp32 on their device."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), not {decay}")
        self.decay = float(decay)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.average = {n: local_shard(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            # ema + (1 - decay) * (param - ema) == decay * ema + (1 - decay) * param
            self.average[name].lerp_(local_shard(p).detach().float(), 1.0 - self.decay)

    def hook(self, optimizer: torch.optim.Optimizer):
        """Update after each of ``optimizer``'s steps; returns the hook's handle."""
        return optimizer.register_step_post_hook(lambda *_: self.update())

    @property
    def sharded(self) -> bool:
        """Whether each process holds only its shard (FSDP2): then each saves its own."""
        return any(is_sharded(p) for p in self.params.values())

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the average inside the block and its own weights again after."""
        with torch.no_grad():
            saved = {n: local_shard(p).detach().clone() for n, p in self.params.items()}
            for name, p in self.params.items():
                local_shard(p).copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    local_shard(p).copy_(saved[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay,
                "average": {n: t.detach().cpu() for n, t in self.average.items()}}

    def load_state_dict(self, state: dict) -> None:
        names = set(state["average"])
        if names != set(self.average):
            missing, extra = sorted(set(self.average) - names), sorted(names - set(self.average))
            raise ValueError(f"the saved EMA does not match the model's trained parameters "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for name, t in state["average"].items():
            self.average[name].copy_(t)
