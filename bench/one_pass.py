"""One micro-batch's forward and backward: the two-pass forward against the one-pass one.

    python bench/one_pass.py                                  # make train's recipe, SmolLM2
    python bench/one_pass.py --groups 2 --group-size 4             # the bench's micro-batch
    python bench/one_pass.py --smoke                          # tiny model, one repeat
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/one_pass.py --groups 2 --group-size 4
                                                    # under DDP: each rank its micro-batches

``GroupLogprobs`` (prompts, then completions on their keys and values, backward in two
phases) and ``PackedLogprobs`` (``nanovppo/packed.py``: every real token in one pass)
take turns on the same micro-batches, under the recipe's autocast and weights, as the
update runs them. Completions have random lengths (uniform in ``--min-tokens`` to
``--new-tokens``), as sampled ones do; their tokens are random, which does not change the
work. Printed: median seconds a micro-batch for each, their ratio, the mean and largest
log-prob difference between them, and the share of the two-pass forward's token rows that are
padding. Under torchrun each path is a DDP module of its own copy of the policy (as the
trainer wraps ``nanovppo.fast.logprob_module``; the two-pass backward in one phase, as DDP
needs), each rank runs micro-batches of its own, the backward's time includes the gradients'
all-reduce, and rank 0 prints its timings.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanovppo import distributed as dd  # noqa: E402
from bench.micro_batches import add_arguments, micro_batch  # noqa: E402
from nanovppo.logprobs import GroupLogprobs  # noqa: E402
from nanovppo.models import autocast_ctx, load_model  # noqa: E402
from nanovppo.packed import PackedLogprobs  # noqa: E402
from nanovppo.policy import set_attention  # noqa: E402
from tests.conftest import compose_cfg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap, groups=1, group_size=8, min_tokens=16, repeats=7)
    args = ap.parse_args()
    overrides = ["experiment=countdown_cpu", *args.overrides]
    if args.smoke:
        overrides += ["model=tiny-random"]
        args.repeats = 1

    cfg = compose_cfg(overrides)
    d = dd.init("cpu")  # one process unless started by torchrun
    if d.on:  # each rank its share of the cores (tests.conftest set its own count)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    torch.manual_seed(0)
    task = instantiate(cfg.task)
    policy, tok = load_model(cfg.model, dtype=cfg.hardware.param_dtype)
    set_attention(policy, cfg.hardware.attn_implementation)
    policy.train()
    if d.on:  # a DDP module each, over a copy of the policy each
        paths = {"two passes": dd.wrap(GroupLogprobs(policy), "ddp", d, "cpu"),
                 "one pass": dd.wrap(PackedLogprobs(copy.deepcopy(policy)), "ddp", d, "cpu")}
    else:
        paths = {"two passes": GroupLogprobs(policy, split_backward=True),
                 "one pass": PackedLogprobs(policy, grads_in_place=True)}  # as in the trainer
    gen = torch.Generator().manual_seed(d.rank)

    # each rank its own problems
    batches = [micro_batch(task, tok, i * d.world + d.rank, args, gen)
               for i in range(args.repeats + 1)]
    times = {name: [] for name in paths}
    diff, diffs = 0.0, []
    for i, batch in enumerate(batches):
        outs = {}
        for name, module in paths.items():
            module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with autocast_ctx(cfg):
                logp = module(batch, 1.0, cfg.trainer.logprob_chunk_tokens)
            logp.sum().backward()
            if i > 0:  # the first micro-batch warms up both
                times[name].append(time.perf_counter() - t0)
            outs[name] = logp.detach()
        gap = (outs["two passes"] - outs["one pass"]).abs()[batch.completion_mask.bool()]
        diff, diffs = max(diff, gap.max().item()), diffs + gap.tolist()

    dd.shutdown()
    if not d.main:
        return
    b = batches[0]
    real = b.prompt_mask.sum().item() + b.completion_mask.sum().item()
    rows = b.prompt_mask.numel() + b.completion_mask.numel()
    print(f"{args.groups} prompt(s) x {args.group_size} completions of "
          f"{args.min_tokens}-{args.new_tokens} tokens, {cfg.model.name}, "
          f"{cfg.hardware.param_dtype} weights, {cfg.hardware.compute_dtype} compute, "
          f"{args.repeats} micro-batches" + (f", rank 0 of {d.world} under DDP" if d.on else ""))
    print(f"padding in the two-pass forward: {1 - real / rows:.0%} of its token rows")
    print("| path | median s a micro-batch | / two passes |")
    print("|---|---|---|")
    base = statistics.median(times["two passes"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {med / base:.2f}x |")
    print(f"log-prob difference between the two: mean {statistics.mean(diffs):.2e}, "
          f"largest {diff:.2e} (rounding: bf16 keeps 8 bits of mantissa)")


if __name__ == "__main__":
    main()
