"""Rollout throughput of the inference backends on the same prompts, side by side.

    python bench/engines.py                      # SmolLM2, 32 and 256 sequences, 48 tokens
    python bench/engines.py --batches 32 --new-tokens 96 --engines hf vllm

Each engine samples ``batch`` completions (batch/4 Countdown prompts x 4 samples, T=1, no
stop string so every completion runs its full length), once to warm up and then
``--repeats`` times; the table gives generated tokens per second (median) and the ratio to
the first engine. Engines are built one after the other in this process, in the dtype of
``hardware.compute_dtype`` (bf16 by default).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanovppo.engines.base import Sampling  # noqa: E402
from nanovppo.models import load_model  # noqa: E402
from nanovppo.rollout import render_prompt  # noqa: E402
from tests.conftest import compose_cfg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 256])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny-random")
    args = ap.parse_args()

    cfg = compose_cfg(["task.n_train=300", *args.overrides])
    task = instantiate(cfg.task)
    policy, tok = load_model(cfg.model, dtype=cfg.hardware.param_dtype)
    results: dict[tuple[str, int], float] = {}
    for name in args.engines:
        ecfg = compose_cfg([f"inference_backend={name}", *args.overrides]).inference_backend
        engine = instantiate(ecfg, model=policy, tokenizer=tok, seed=0, _convert_="partial")
        for batch in args.batches:
            prompts = [render_prompt(task, tok, ex) for ex in task.train_examples[:batch // 4]]
            sp = Sampling(n=4, temperature=1.0, max_new_tokens=args.new_tokens)
            engine.generate(prompts[:2], sp)  # warm-up
            rates = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                groups = engine.generate(prompts, sp)
                dt = time.perf_counter() - t0
                rates.append(sum(len(c.token_ids) for g in groups for c in g) / dt)
            results[(name, batch)] = statistics.median(rates)
            print(f"{name:6s} batch {batch:4d}: {results[(name, batch)]:8.1f} tokens/s",
                  flush=True)
        engine.close()
        del engine
        gc.collect()

    base = args.engines[0]
    print(f"\n{cfg.model.name}, {cfg.hardware.compute_dtype}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    print("| engine | " + " | ".join(f"batch {b} tok/s" for b in args.batches) + " | "
          + " | ".join(f"vs {base} @ {b}" for b in args.batches) + " |")
    print("|---" * (1 + 2 * len(args.batches)) + "|")
    for name in args.engines:
        row = [f"{results[(name, b)]:.0f}" for b in args.batches]
        ratio = [f"{results[(name, b)] / results[(base, b)]:.2f}x" for b in args.batches]
        print(f"| {name} | " + " | ".join(row + ratio) + " |")


if __name__ == "__main__":
    main()
