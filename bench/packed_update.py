"""A minibatch's forward and backward through the one-pass forward, in four variants.

    python bench/packed_update.py                   # the bench's micro-batches, SmolLM2
    python bench/packed_update.py --smoke           # tiny model, one repeat (the suite)

Two of the packed forward's speed changes (``nanovppo/packed.py``) against the way it ran
before them, each alone and both together, on the same minibatches, taking turns:

- gradients in place (``grads_in_place``, on in one process): each projection's backward
  adds its weight gradient into ``.grad`` by ``addmm_`` instead of returning a new tensor
  for autograd to add (the baseline: ``grads_in_place=False``, as under DDP);
- grouped-query attention without copies: the query heads that share a kv head are rows
  of one product with it (the baseline: k and v repeated for every query head, as
  ``repeat_interleave`` did before; reconstructed here as ``RepeatKV``).

A minibatch is ``--micro`` micro-batches of ``--groups`` prompts x ``--group-size``
completions of ``--min-tokens`` to ``--new-tokens`` random tokens, make train's weights and
autocast (bf16), gradients zeroed before each minibatch as the update does. Printed: the
median forward and backward seconds of a minibatch for each variant, its ratio to the
baseline, and the largest relative difference of any parameter's gradient from the
baseline's (bf16 rounding: the products are summed in another order).
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
from tests.conftest import compose_cfg  # noqa: E402


class RepeatKV(packed.Layout):
    """The eager attention as it was: k and v repeated for every query head."""

    def _kernel(self, q, k, v, mask, scaling):
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


_LAYOUT = {"cls": packed.Layout}
_own_layout = packed._layout


def _layout(batch, eager):  # the layout of the variant that runs
    tokens, positions, layout = _own_layout(batch, eager)
    return tokens, positions, _LAYOUT["cls"](*layout)


packed._layout = _layout

# name -> (gradients in place, the layout's class)
VARIANTS = {"baseline (autograd adds, kv repeated)": (False, RepeatKV),
            "gradients in place": (True, RepeatKV),
            "grouped kv": (False, packed.Layout),
            "both (now)": (True, packed.Layout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap, groups=2, group_size=4, min_tokens=40, repeats=5)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches in a minibatch")
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
    modules = {name: (packed.PackedLogprobs(copy.deepcopy(policy), in_place), layout)
               for name, (in_place, layout) in VARIANTS.items()}
    gen = torch.Generator().manual_seed(0)

    minibatches = [[micro_batch(task, tok, j * args.micro + i, args, gen)
                    for i in range(args.micro)]
                   for j in range(args.repeats + 1)]
    times = {name: ([], []) for name in VARIANTS}
    for j, minibatch in enumerate(minibatches):
        for name, (module, layout) in modules.items():
            _LAYOUT["cls"] = layout
            module.zero_grad(set_to_none=True)
            fwd = bwd = 0.0
            for batch in minibatch:
                t0 = time.perf_counter()
                with autocast_ctx(cfg):
                    logp = module(batch, 1.0, cfg.trainer.logprob_chunk_rows)
                t1 = time.perf_counter()
                logp.sum().backward()
                fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
            if j > 0 or args.smoke:  # the first minibatch warms every variant up
                times[name][0].append(fwd)
                times[name][1].append(bwd)

    base_name = next(iter(VARIANTS))
    base = [p.grad.float() for p in modules[base_name][0].parameters()]
    print(f"{args.micro} micro-batches of {args.groups} prompt(s) x {args.group_size} "
          f"completions of {args.min_tokens}-{args.new_tokens} tokens, {cfg.model.name}, "
          f"{cfg.hardware.param_dtype} weights, {cfg.hardware.compute_dtype} compute, "
          f"medians of {len(times[base_name][0])} minibatches")
    print("| variant | fwd s | bwd s | fwd + bwd s | / baseline | largest gradient difference |")
    print("|---|---|---|---|---|---|")
    base_total = None
    for name, (fwd, bwd) in times.items():
        f, b = statistics.median(fwd), statistics.median(bwd)
        base_total = base_total or f + b
        grads = [p.grad.float() for p in modules[name][0].parameters()]
        diff = max(((g - r).norm() / r.norm().clamp(min=1e-12)).item()
                   for g, r in zip(grads, base))
        print(f"| {name} | {f:.3f} | {b:.3f} | {f + b:.3f} | {(f + b) / base_total:.2f}x "
              f"| {diff:.1e} |")


if __name__ == "__main__":
    main()
