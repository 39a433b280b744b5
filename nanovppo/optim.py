"""AdamW for the trainer, including for weights kept in bfloat16.

With ``hardware.param_dtype: bfloat16`` the weights, their gradients and AdamW's two
moments are all bf16: half the memory of fp32 master weights, and no autocast copies of
the weights. Plain bf16 AdamW would not learn at RL learning rates: an update of 1e-5 on a
weight of 0.05 is far below bf16's resolution there (8 bits of mantissa, steps of ~2e-4),
so round-to-nearest returns the old weight and the update is lost. Here each update is
computed in fp32 and the weight written back with *stochastic rounding*: rounded up with
probability equal to the remainder's share of the gap, so it equals its fp32 value in
expectation and small updates accumulate instead of vanishing. The moments are stored
rounded to nearest: each step moves them by a sizeable fraction of themselves (10% and 1%
of the distance to the new gradient), and an Adam step only needs their rough size.

fp32 parameters get ``torch.optim.AdamW`` itself (its fused kernel where possible).
``trainer.optimizer=adamw8bit`` gives bitsandbytes' 8-bit AdamW instead (Dettmers et al.,
arXiv 2110.02861): both moments stored in 8 bits with one scale per block of 256 values,
a quarter of fp32 AdamW's optimizer memory.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from nanovppo.distributed import is_sharded, local_shard
from nanovppo.errors import ConfigError

CHUNK = 1 << 21  # elements computed in fp32 at a time (bounds the temporaries to ~40 MB)


def adamw(params: Iterable[torch.nn.Parameter], lr: float, betas=(0.9, 0.99),
          weight_decay: float = 0.0, eps: float = 1e-8, seed: int = 0,
          kind: str = "adamw") -> torch.optim.Optimizer:
    """``kind`` adamw: ``torch.optim.AdamW`` when every parameter is fp32, else
    ``StochasticAdamW``; adamw8bit: bitsandbytes' ``AdamW8bit``."""
    params = list(params)
    if kind == "adamw8bit":
        return adamw_8bit(params, lr, betas, weight_decay, eps)
    if kind != "adamw":
        raise ConfigError(f"trainer.optimizer={kind!r}; use adamw or adamw8bit")
    if all(p.dtype == torch.float32 for p in params):
        # The fused kernel: one pass over memory (0.05 s instead of 0.27 s for SmolLM2's
        # 135M parameters on 2 cores); FSDP2's sharded parameters take the default path.
        fused = not any(is_sharded(p) for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps,
                                 weight_decay=weight_decay, fused=fused or None)
    return StochasticAdamW(params, lr=lr, betas=tuple(betas), eps=eps,
                           weight_decay=weight_decay, seed=seed)


def adamw_8bit(params: list[torch.nn.Parameter], lr: float, betas, weight_decay: float,
               eps: float) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW, or a clear error where it cannot run."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError("trainer.optimizer=adamw8bit needs bitsandbytes: pip install -e "
                          "'.[bnb]' (or use trainer.optimizer=adamw)") from e
    if any(is_sharded(p) for p in params):
        raise ConfigError("trainer.optimizer=adamw8bit does not take FSDP2's sharded "
                          "parameters; use hardware.strategy=ddp or trainer.optimizer=adamw")
    try:
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps,
                                   weight_decay=weight_decay)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        devices = sorted({str(p.device) for p in params})
        raise ConfigError(f"bitsandbytes {bnb.__version__} cannot run AdamW8bit on {devices} "
                          f"({e}); use trainer.optimizer=adamw") from e


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator,
                      noise: torch.Tensor | None = None) -> None:
    """Write fp32 ``src`` into bf16 ``dst``, rounding each value up or down at random so
    that the result equals ``src`` in expectation. ``noise`` is an optional int32 buffer
    of at least ``src.numel()`` elements to work in.

    A bf16 value is the top 16 bits of an fp32 one. Adding a uniform random integer in
    [0, 2^16) to the fp32 bit pattern and clearing the low 16 bits rounds the magnitude up
    exactly when the noise exceeds the dropped bits' complement, i.e. with probability
    (dropped bits) / 2^16. Infinities and NaNs keep their class.
    """
    n = src.numel()
    bits = src.contiguous().view(-1).view(torch.int32)
    if noise is None:
        noise = torch.empty(n, dtype=torch.int32, device=src.device)
    noise = noise.view(-1)[:n]
    # Four 16-bit draws per 64-bit random number (drawing int64s over their whole range
    # is ~3x cheaper per bit than drawing int32s).
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=src.device)
    draws.random_(-2 ** 63, None, generator=generator)
    noise.copy_(draws.view(torch.int16)[:n]).bitwise_and_(0xFFFF)
    rounded = noise.add_(bits).bitwise_and_(-65536)  # -65536 == 0xFFFF0000
    # Exact: each value now has a bf16 representation.
    dst.copy_(rounded.view(torch.float32).view(src.shape))


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with fp32 arithmetic, stochastically rounded bf16
    weights and bf16 moments; see the module doc. fp32 parameters in the same optimizer
    are updated exactly. State keys match ``torch.optim.AdamW``'s."""

    def __init__(self, params, lr: float, betas=(0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.seed = seed
        self.generator = None
        self._work = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = (group["lr"], group["betas"], group["eps"],
                                     group["weight_decay"])
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = int(state["step"].item())
                # The rounding noise is a function of (seed, step, parameter): a resumed run
                # draws what the uninterrupted one would have, with no generator to save.
                gen = self._generator(p, t, index)
                self._update(local_shard(p), local_shard(p.grad), local_shard(state["exp_avg"]),
                             local_shard(state["exp_avg_sq"]), t, lr, b1, b2, eps, wd, gen)
        return loss

    def _generator(self, p: torch.Tensor, step: int, index: int) -> torch.Generator:
        device = local_shard(p).device
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        self.generator.manual_seed((self.seed * 1_000_003 + step) * 65_537 + index)
        return self.generator

    def _buffers(self, device) -> dict[str, torch.Tensor]:
        """fp32 work space for one chunk, kept between steps (fresh allocations of this size
        cost more here than the arithmetic: each is new pages from the OS)."""
        if self._work is None or self._work["g"].device != device:
            self._work = {k: torch.empty(CHUNK, dtype=torch.float32, device=device)
                          for k in ("g", "m", "v", "w", "d")}
            self._work["noise"] = torch.empty(CHUNK, dtype=torch.int32, device=device)
        return self._work

    def _update(self, p, grad, m, v, t, lr, b1, b2, eps, wd, gen) -> None:
        bc1, root_bc2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
        # p -= lr/bc1 * m / (sqrt(v)/root_bc2 + eps), with root_bc2 folded into the step.
        step_size, eps_hat = lr / bc1 * root_bc2, eps * root_bc2
        work = self._buffers(p.device)
        flat = [x.view(-1) for x in (p, grad, m, v)]
        for i in range(0, p.numel(), CHUNK):
            pc, gc, mc, vc = (x[i:i + CHUNK] for x in flat)
            n = pc.numel()
            g, m32, v32, w, d = (work[k][:n] for k in ("g", "m", "v", "w", "d"))
            g.copy_(gc)
            m32.copy_(mc).lerp_(g, 1 - b1)
            v32.copy_(vc).mul_(b2).addcmul_(g, g, value=1 - b2)
            mc.copy_(m32)  # the moments round to nearest (see the module doc)
            vc.copy_(v32)
            w.copy_(pc)
            if wd:
                w.mul_(1 - lr * wd)
            w.addcdiv_(m32, torch.sqrt(v32, out=d).add_(eps_hat), value=-step_size)
            if pc.dtype == torch.bfloat16:
                stochastic_round_(pc, w, gen, work["noise"])
            else:  # fp32: exact (fp16 would round to nearest)
                pc.copy_(w)


def lr_factor(warmup: int, total: int, kind: str):
    """The learning rate's multiplier after ``done`` optimizer steps (for ``LambdaLR``):
    ``warmup`` steps rising linearly from 0, then constant, cosine (down to 10% at
    ``total``) or linear (down to 0 at ``total``)."""
    if kind not in ("constant", "cosine", "linear"):
        raise ConfigError(f"trainer.lr_schedule={kind!r}; use constant, cosine or linear")

    def factor(done: int) -> float:
        if warmup and done < warmup:
            return (done + 1) / warmup
        progress = min(1.0, (done - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return factor
