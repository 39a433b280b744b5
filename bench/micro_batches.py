"""Micro-batches for the update benchmarks (``one_pass.py``, ``packed_update.py``): real
prompts of the task, each with completions of random tokens and random lengths, the work of
a sampled micro-batch without sampling (the tokens' values do not change the work)."""

from __future__ import annotations

import argparse

import torch

from nanovppo.logprobs import GroupBatch, pad_groups
from nanovppo.rollout import render_prompt


def add_arguments(ap: argparse.ArgumentParser, groups: int, group_size: int, min_tokens: int,
                  repeats: int) -> None:
    """The micro-batch's shape, the repeats, ``--smoke`` and Hydra overrides."""
    ap.add_argument("--groups", type=int, default=groups, help="prompts in a micro-batch")
    ap.add_argument("--group-size", type=int, default=group_size,
                    help="completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--min-tokens", type=int, default=min_tokens)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, one repeat")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides")


def micro_batch(task, tok, i: int, args, gen: torch.Generator) -> GroupBatch:
    """Micro-batch ``i``: training problems ``i * groups`` on, each with ``group_size``
    completions of ``min_tokens`` to ``new_tokens`` random tokens."""
    examples = task.train_examples[i * args.groups:(i + 1) * args.groups]
    prompts = [render_prompt(task, tok, ex) for ex in examples]
    lengths = torch.randint(args.min_tokens, args.new_tokens + 1,
                            (args.groups, args.group_size), generator=gen)
    completions = [[torch.randint(0, len(tok), (int(n),), generator=gen).tolist()
                    for n in row] for row in lengths]
    return pad_groups(prompts, completions, tok.pad_token_id)
