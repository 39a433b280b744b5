"""AdamW for the trainer, including for weights kept in bfloat16.

With ``hardware.param_dtype: bfloat16`` the weights, their gradients and AdamW's two
moments are all bf16: half the memory of fp32 master weights, and no autocast copies of
the weights. Plain bf16 AdamW would not learn at RL learning rates: an update of 1e-5 on a
weight of 0.1 is far below bf16's resolution there (8 bits of mantissa, steps of ~5e-4),
so round-to-nearest returns the old weight and the update is lost. Each update is computed
in fp32 and written back in one of two ways (``hardware.bf16_rounding``):

- ``kahan``: compensated summation (Kahan; for bf16 training, Zamirai et al., arXiv
  2010.06192). The weight is rounded to nearest and what the rounding dropped is kept in a
  bf16 buffer of the same shape and added back at the next step, so the weight plus its
  buffer carries ~16 bits of mantissa and small updates add up exactly, as with fp32
  master weights; one more bf16 tensor per weight.
- ``stochastic``: *stochastic rounding*, up with probability equal to the remainder's
  share of the gap, so the weight equals its fp32 value in expectation; no extra memory.
  At lr 1e-5 a typical weight then moves a whole bf16 step (~50x the update) on ~2% of
  steps: the expected update is right, but the noise around it is ~7x the update at each
  step, and after 10 RL steps the weights had moved ~11x as far from the RL start as
  fp32 AdamW or Kahan's compensation moved them (docs/results.md, "bf16 weights: rounding
  noise").

The moments are stored rounded to nearest: each step moves them by a sizeable fraction of
themselves (10% and 1% of the distance to the new gradient), and an Adam step only needs
their rough size.

fp32 parameters get ``torch.optim.AdamW`` itself (its fused kernel where possible).
``trainer.optimizer=adamw8bit`` gives bitsandbytes' 8-bit AdamW instead (Dettmers et al.,
arXiv 2110.02861): both moments stored in 8 bits with one scale per block of 256 values,
a quarter of fp32 AdamW's optimizer memory.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch

from nanovppo.distributed import is_sharded, local_shard
from nanovppo.errors import ConfigError

log = logging.getLogger("nanovppo")

CHUNK = 1 << 21  # elements per eager step (see Bf16AdamW._update)


def adamw(params: Iterable[torch.nn.Parameter], lr: float, betas=(0.9, 0.99),
          weight_decay: float = 0.0, eps: float = 1e-8, seed: int = 0,
          kind: str = "adamw", bf16_rounding: str | None = None) -> torch.optim.Optimizer:
    """``kind`` adamw: ``torch.optim.AdamW`` when every parameter is fp32, else
    ``Bf16AdamW`` rounding bf16 weights by ``bf16_rounding`` (``hardware.bf16_rounding``;
    needed only then); adamw8bit: bitsandbytes' ``AdamW8bit``."""
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
    return Bf16AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                     seed=seed, rounding=bf16_rounding)


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


_MASK32 = 0xFFFFFFFF


def _noise16(n: int, offset, key, device) -> torch.Tensor:
    """16 uniform random bits for each of elements ``offset .. offset + n - 1`` of a tensor,
    as int64: a hash of (element index XOR ``key``), two rounds of multiply and xor-shift
    (Thomas Mueller's 32-bit integer hash). A pure function, so a compiled kernel computes
    it in registers with no random state to keep, and a resumed run redraws what the
    uninterrupted one drew. Every product stays below 2^59: no int64 overflow."""
    x = (torch.arange(n, dtype=torch.int64, device=device) + offset).bitwise_xor(key)
    x = (x.bitwise_right_shift(16).bitwise_xor(x) * 0x45D9F3B).bitwise_and(_MASK32)
    x = (x.bitwise_right_shift(16).bitwise_xor(x) * 0x45D9F3B).bitwise_and(_MASK32)
    return x.bitwise_right_shift(16).bitwise_xor(x).bitwise_and(0xFFFF)


def _round_stochastic(src: torch.Tensor, key, offset=0) -> torch.Tensor:
    """fp32 ``src`` (1-D) rounded to bf16 at random, equal to ``src`` in expectation.

    A bf16 value is the top 16 bits of an fp32 one. Adding a uniform integer in [0, 2^16)
    to the fp32 bit pattern and clearing the low 16 bits rounds the magnitude up exactly
    when the noise exceeds the dropped bits' complement, i.e. with probability (dropped
    bits) / 2^16. The sum is taken in int64 (no overflow); infinities and NaNs keep their
    class."""
    bits = src.view(torch.int32).to(torch.int64)
    noisy = bits + _noise16(src.numel(), offset, key, src.device)
    # Exact: the low 16 bits are zero, so the value has a bf16 representation.
    return noisy.bitwise_and(-65536).to(torch.int32).view(torch.float32).to(torch.bfloat16)


def _round_nearest(src: torch.Tensor) -> torch.Tensor:
    """fp32 ``src`` rounded to the nearest bf16 value (ties to even), still as fp32: half
    the gap (less one where the kept last bit is 0) added to the bit pattern, then the low
    16 bits cleared. Integer arithmetic, as in ``_round_stochastic``, because a compiler
    may drop a cast to bf16 and back as a no-op (inductor does), which would make Kahan's
    buffer always zero."""
    bits = src.view(torch.int32).to(torch.int64)
    bits = bits + 0x7FFF + bits.bitwise_right_shift(16).bitwise_and(1)
    return bits.bitwise_and(-65536).to(torch.int32).view(torch.float32)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, key: int) -> None:
    """Write fp32 ``src`` into bf16 ``dst``, rounding each value up or down at random (the
    draws a function of the integer ``key`` and the element's position) so that the result
    equals ``src`` in expectation."""
    dst.view(-1).copy_(_round_stochastic(src.contiguous().view(-1), torch.tensor(key)))


def _adamw_flat(p, grad, m, v, comp, hyper, key, offset):
    """One AdamW step, in place, on 1-D ``p``, its ``grad`` and moments ``m``, ``v`` (bf16
    or fp32), computed in fp32. ``comp``: bf16 ``p``'s Kahan buffer (what earlier roundings
    dropped), or None to round stochastically. ``hyper``: a tensor of (step size, eps,
    beta1, beta2, weight decay factor), and the rounding's ``key`` (an int64 tensor), so
    that a new learning rate or step is new data, not a new compiled kernel; ``offset``:
    the position of ``p[0]`` in its parameter."""
    step_size, eps_hat, b1, b2, decay = hyper.unbind()
    g = grad.float()
    m32 = m.float() * b1 + g * (1 - b1)
    v32 = v.float() * b2 + g * g * (1 - b2)
    w = p.float() if comp is None else p.float() + comp.float()
    w = w * decay - step_size * m32 / (v32.sqrt() + eps_hat)
    if p.dtype != torch.bfloat16:  # fp32: exact (fp16 would round to nearest)
        p.copy_(w)
    elif comp is None:
        p.copy_(_round_stochastic(w, key, offset))
    else:
        nearest = _round_nearest(w)
        comp.copy_(w - nearest)  # below nearest's resolution: kept to ~2^-16 of w
        p.copy_(nearest)  # exact: nearest has a bf16 representation
    m.copy_(m32)  # the moments round to nearest (see the module doc)
    v.copy_(v32)


def _adamw_whole(p, grad, m, v, comp, hyper, key):
    """``_adamw_flat`` on whole tensors of any shape, flattened inside (a view made outside
    would make the compiled kernel depend on the shape it was viewed from)."""
    _adamw_flat(p.view(-1), grad.view(-1), m.view(-1), v.view(-1),
                None if comp is None else comp.view(-1), hyper, key, 0)


# The step compiled into one loop over memory (torch.compile; inductor's C++ on a CPU)
# instead of ~20 eager passes over every tensor (docs/results.md, "bf16 weights"). Sizes
# are dynamic: one kernel for each number of dimensions (two for SmolLM2). Where
# compiling fails (no C++ compiler, say) the step runs eagerly.
_compiled_step = torch.compile(_adamw_whole, dynamic=True, fullgraph=True)


ROUNDINGS = ("kahan", "stochastic")


class Bf16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with fp32 arithmetic, bf16 weights written back by
    ``rounding`` (kahan or stochastic) and bf16 moments; see the module doc. fp32
    parameters in the same optimizer are updated exactly. State keys match
    ``torch.optim.AdamW``'s, plus ``compensation`` (Kahan's buffer) for bf16 weights."""

    def __init__(self, params, lr: float, betas=(0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, rounding: str | None = None,
                 compiled: bool = True):
        if rounding not in ROUNDINGS:
            raise ConfigError(f"hardware.bf16_rounding={rounding!r}: bf16 weights need kahan "
                              "or stochastic")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.seed = seed
        self.rounding = rounding
        self.compiled = compiled  # False after a failed compile: eager from then on

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
                kahan = self.rounding == "kahan" and p.dtype == torch.bfloat16
                if kahan and "compensation" not in state:
                    # New, or a state saved under stochastic rounding: nothing was dropped.
                    state["compensation"] = torch.zeros_like(p)
                state["step"] += 1
                t = int(state["step"].item())
                bc1, root_bc2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
                # p -= lr/bc1 * m / (sqrt(v)/root_bc2 + eps), root_bc2 folded into the step.
                hyper = torch.tensor([lr / bc1 * root_bc2, eps * root_bc2, b1, b2,
                                      1 - lr * wd], dtype=torch.float32)
                # detach: a Parameter would be compiled for its exact size.
                tensors = [local_shard(x).detach() for x in
                           (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                # A buffer saved under kahan and resumed under stochastic is left unused.
                comp = local_shard(state["compensation"]).detach() if kahan else None
                device = tensors[0].device
                key = torch.tensor(self._key(t, index), device=device)
                self._update(*tensors, comp, hyper.to(device), key)
        return loss

    def _key(self, step: int, index: int) -> int:
        """The rounding draws' key: a function of (seed, step, parameter), so that a
        resumed run rounds as the uninterrupted one would have, with no random state to
        save (splitmix64's finaliser, cut to 31 bits)."""
        z = (self.seed * 1_000_003 + step) * 65_537 + index
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return (z ^ (z >> 31)) & 0x7FFFFFFF

    def _update(self, p, grad, m, v, comp, hyper, key) -> None:
        if self.compiled:
            try:
                _compiled_step(p, grad, m, v, comp, hyper, key)
                return
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly
                log.warning("the bf16 AdamW step could not be compiled (%s: %s); it runs "
                            "eagerly, slower", type(e).__name__, str(e).splitlines()[0]
                            if str(e) else "")
                self.compiled = False
        # Eagerly, in chunks: bounds the fp32 and int64 temporaries to ~100 MB.
        flat = [x.view(-1) for x in (p, grad, m, v)]
        comp = None if comp is None else comp.view(-1)
        for i in range(0, p.numel(), CHUNK):
            _adamw_flat(*(x[i:i + CHUNK] for x in flat),
                        None if comp is None else comp[i:i + CHUNK], hyper, key, i)


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
