"""A minibatch's forward and backward through the one-pass forward, in variants.

    python bench/packed_update.py                   # the bench's micro-batches, SmolLM2
    python bench/packed_update.py --variants "baseline (autograd adds, kv repeated)" \
        "gradients in place" "grouped kv" "in place + grouped kv"      # the earlier four
    python bench/packed_update.py --smoke           # tiny model, one repeat (the suite)

The packed forward's (``nanovppo/packed.py``) changes against the way it ran before them,
each alone and together, on the same minibatches, taking turns. By default the three that
keep less for the backward, against the forward as it was before them ("in place + grouped
kv"):

- norms keep their input (``_RMSNorm``): the RMSNorms keep x and each row's scale, not
  HF's module's float32 copy of x and its normalised x;
- the MLP recomputes (``_GatedMLPGradInPlace``): the gated MLP keeps x, gate(x) and up(x)
  and recomputes silu(gate(x)) and the product in its backward;
- probabilities kept once (``_Attention``): the eager attention keeps its float32
  probabilities, not also their bf16 copy (as before: ``GroupedKV``).

Since, by name: "all three, fused kernels", the same with their elementwise work compiled
(``trainer.fused_kernels``, the trainer's default: ``nanovppo/kernels.py``). A candidate not
taken, by name: the head in chunks of 96 positions
(``trainer.logprob_chunk_tokens`` is 192). The attention keeping only q, k, v and the mask
and recomputing its probabilities in the backward at any length ("norms, MLP, attention
recomputed", ``RecomputedProbs``) or keeping them at any length ("norms, MLP, probabilities
kept at any length", ``KeptProbs``): the package keeps them up to
``packed.RECOMPUTED_PROBS_BYTES`` a call and recomputes above (compare the three with
``--new-tokens 96`` or 256).

The earlier two, by name: gradients in place (``grads_in_place``: each projection's
backward adds its weight gradient into ``.grad`` by ``addmm_``; the baseline: autograd
adds, as under DDP) and grouped-query attention without copies (the baseline: k and v
repeated for every query head, as ``repeat_interleave`` did; reconstructed here as
``RepeatKV``; grouped, as before the probabilities were kept once: ``GroupedKV``).
``--variants`` names any of ``VARIANTS``, e.g. "norms and MLP" (the attention as before).

A minibatch is ``--micro`` micro-batches of ``--groups`` prompts x ``--group-size``
completions of ``--min-tokens`` to ``--new-tokens`` random tokens, make train's weights and
autocast (bf16), gradients zeroed before each minibatch as the update does. Printed: the
median forward and backward seconds of a minibatch for each variant, its ratio to the
first variant, the bytes the forward of a micro-batch keeps for the backward (the
activations: tensors saved by autograd, parameters not counted; the median over the first
minibatch, which warms up and is not timed), and the largest relative difference of any
parameter's gradient from the first variant's (bf16 rounding).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.micro_batches import add_arguments, micro_batch  # noqa: E402
from nanovppo import packed  # noqa: E402
from nanovppo.models import autocast_ctx, load_model  # noqa: E402
from nanovppo.policy import set_attention  # noqa: E402
from tests.conftest import compose_cfg, kept_bytes  # noqa: E402


class RepeatKV(packed.Layout):
    """The eager attention as it was first: k and v repeated for every query head."""

    def _kernel(self, q, k, v, mask, scaling):
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class GroupedKV(packed.Layout):
    """The eager attention with grouped kv heads as it was next: autograd keeps the float32
    probabilities and their cast copy."""

    def _kernel(self, q, k, v, mask, scaling):
        b, h, c, d = q.shape
        kv = k.shape[1]
        scores = (q.reshape(b, kv, h // kv * c, d) @ k.transpose(-1, -2)) * scaling
        scores = scores.view(b, kv, h // kv, c, -1).masked_fill(
            ~mask[:, :, None], torch.finfo(scores.dtype).min)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return (p.view(b, kv, h // kv * c, -1) @ v).view(b, h, c, d)


class KeptProbs(packed.Layout):
    """The eager attention keeping its float32 probabilities at any length (before
    ``packed.RECOMPUTED_PROBS_BYTES``)."""

    def _kernel(self, q, k, v, mask, scaling):
        b, h, c, d = q.shape
        kv = k.shape[1]
        qg = q.reshape(b, kv, h // kv * c, d)
        return packed._Attention.apply(qg, k, v, mask, scaling, h // kv,
                                       False).view(b, h, c, d)


class RecomputedProbs(packed.Layout):
    """The eager attention keeping only q, k, v and the mask at any length, recomputing
    the scores and probabilities in its backward (``packed._Attention`` with ``recompute``;
    the package takes it above ``packed.RECOMPUTED_PROBS_BYTES``)."""

    def _kernel(self, q, k, v, mask, scaling):
        b, h, c, d = q.shape
        kv = k.shape[1]
        qg = q.reshape(b, kv, h // kv * c, d)
        return packed._Attention.apply(qg, k, v, mask, scaling, h // kv,
                                       True).view(b, h, c, d)


_LAYOUT = {"cls": packed.Layout}
_own_layout = packed._layout


def _layout(batch, eager):  # the layout of the variant that runs
    tokens, positions, layout = _own_layout(batch, eager)
    return tokens, positions, _LAYOUT["cls"](*layout)


def _module_norm(module, x, fused=False):  # the RMSNorms as they were: HF's modules
    return module(x)


def _mlp_op_by_op(mlp, x, grads_in_place, fused=False):  # the MLP as it was: op by op
    linear = lambda m, x: packed._linear(m, x, grads_in_place)  # noqa: E731
    return linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x))


_own = {"norm": packed._norm, "mlp": packed._mlp}
packed._layout = _layout

# name -> gradients in place, the layout's class, the norm, the MLP[, the head's chunk in
# positions (else trainer.logprob_chunk_tokens)]
OLD = (_module_norm, _mlp_op_by_op)
NOW = (_own["norm"], _own["mlp"])
VARIANTS = {"baseline (autograd adds, kv repeated)": (False, RepeatKV, *OLD),
            "gradients in place": (True, RepeatKV, *OLD),
            "grouped kv": (False, GroupedKV, *OLD),
            "in place + grouped kv": (True, GroupedKV, *OLD),
            "norms keep their input": (True, GroupedKV, NOW[0], OLD[1]),
            "MLP recomputes": (True, GroupedKV, OLD[0], NOW[1]),
            "probabilities kept once": (True, packed.Layout, *OLD),
            "norms and MLP": (True, GroupedKV, *NOW),
            "all three (now)": (True, packed.Layout, *NOW),
            "all three, fused kernels": (True, packed.Layout, *NOW),
            "all three, head in chunks of 96": (True, packed.Layout, *NOW, 96),
            "norms, MLP, attention recomputed": (True, RecomputedProbs, *NOW),
            "norms, MLP, probabilities kept at any length": (True, KeptProbs, *NOW)}
FUSED = {"all three, fused kernels"}  # trainer.fused_kernels (nanovppo/kernels.py)
DEFAULT = ["in place + grouped kv", "norms keep their input", "MLP recomputes",
           "probabilities kept once", "all three (now)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap, groups=2, group_size=4, min_tokens=40, repeats=5)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches in a minibatch")
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS),
                    help="the first is the one the others are compared with")
    args = ap.parse_args()
    overrides = ["experiment=countdown_cpu", f"model.cache_dir={ROOT}/outputs/cache/models",
                 *args.overrides]
    if args.smoke:
        overrides += ["model=tiny-random"]
        args.repeats = 1

    cfg = compose_cfg(overrides)
    task = instantiate(cfg.task)
    policy, tok = load_model(cfg.model, dtype=cfg.hardware.param_dtype)
    set_attention(policy, cfg.hardware.attn_implementation)
    policy.train()
    variants = {name: VARIANTS[name] for name in args.variants}
    modules = {name: (packed.PackedLogprobs(copy.deepcopy(policy), in_place, name in FUSED),
                      rest)
               for name, (in_place, *rest) in variants.items()}
    gen = torch.Generator().manual_seed(0)

    minibatches = [[micro_batch(task, tok, j * args.micro + i, args, gen)
                    for i in range(args.micro)]
                   for j in range(args.repeats + 1)]
    times = {name: ([], []) for name in variants}
    kept = {name: [] for name in variants}
    for j, minibatch in enumerate(minibatches):
        for name, (module, (layout, norm, mlp, *chunk)) in modules.items():
            positions = chunk[0] if chunk else cfg.trainer.logprob_chunk_tokens
            _LAYOUT["cls"], packed._norm, packed._mlp = layout, norm, mlp
            module.zero_grad(set_to_none=True)
            fwd = bwd = 0.0
            for batch in minibatch:
                forward = lambda: module(batch, 1.0, positions)  # noqa: E731
                t0 = time.perf_counter()
                with autocast_ctx(cfg):
                    if j == 0:  # untimed: what the forward keeps for the backward
                        size, logp = kept_bytes(module, forward)
                        kept[name].append(size)
                    else:
                        logp = forward()
                t1 = time.perf_counter()
                logp.sum().backward()
                fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
            if j > 0 or args.smoke:  # the first minibatch warms every variant up
                times[name][0].append(fwd)
                times[name][1].append(bwd)

    base_name = next(iter(variants))
    base = [p.grad.float() for p in modules[base_name][0].parameters()]
    print(f"{args.micro} micro-batches of {args.groups} prompt(s) x {args.group_size} "
          f"completions of {args.min_tokens}-{args.new_tokens} tokens, {cfg.model.name}, "
          f"{cfg.hardware.param_dtype} weights, {cfg.hardware.compute_dtype} compute, "
          f"medians of {len(times[base_name][0])} minibatches")
    print("| variant | fwd s | bwd s | fwd + bwd s | / first | kept for the backward MB "
          "| largest gradient difference |")
    print("|---|---|---|---|---|---|---|")
    base_total = None
    for name, (fwd, bwd) in times.items():
        f, b = statistics.median(fwd), statistics.median(bwd)
        base_total = base_total or f + b
        grads = [p.grad.float() for p in modules[name][0].parameters()]
        diff = max(((g - r).norm() / r.norm().clamp(min=1e-12)).item()
                   for g, r in zip(grads, base))
        print(f"| {name} | {f:.3f} | {b:.3f} | {f + b:.3f} | {(f + b) / base_total:.2f}x "
              f"| {statistics.median(kept[name]) / 2 ** 20:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
