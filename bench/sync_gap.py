"""The weight-sync check's gap: how far an engine that holds the trainer's weights is from
the trainer on the probe, and how far one that missed a push is.

    python bench/sync_gap.py                                   # SmolLM2, hf and vllm, bf16
    python bench/sync_gap.py hardware.compute_dtype=float32    # fp32 engines and trainer

For ``--probes`` held-out Countdown prompts (the check's probe is the first one), each
engine and the trainer score the prompt at temperature 1 (``nanovppo/sync.py``); printed
per engine: the median and largest per-probe mean gap |log pi_engine - log pi_trainer|,
the largest token gap, and the seconds one check takes. Then the policy takes one AdamW
step at ``--lr`` on a supervised loss (as an RL step would move it) without a push: the same
figures for the stale engine, and the largest change of the trainer's probe log-probs
(what a no-op push leaves the engine without).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanovppo.models import load_model  # noqa: E402
from nanovppo.rollout import render_prompt  # noqa: E402
from nanovppo.sync import SyncCheck  # noqa: E402
from nanovppo.fast import logprob_module  # noqa: E402
from nanovppo.models import autocast_ctx  # noqa: E402
from nanovppo.update import probe_logprobs  # noqa: E402
from tests.conftest import compose_cfg  # noqa: E402


def gaps(check: SyncCheck, engine, probes) -> tuple[list[float], float, float]:
    means, worst, t0 = [], 0.0, time.perf_counter()
    for probe in probes:
        check.probe, check.last = probe, None
        m = check.measure(engine)
        means.append(m["sync/gap_mean"])
        worst = max(worst, m["sync/gap_max"])
    return means, worst, (time.perf_counter() - t0) / len(probes)


def trainer_logprobs(check: SyncCheck, probes) -> list[torch.Tensor]:
    return [check.trainer_logprobs(probe) for probe in probes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = ap.parse_args()

    cfg = compose_cfg(["task.n_train=100", *args.overrides])
    task = instantiate(cfg.task)
    tok = load_model(cfg.model, dtype=cfg.hardware.param_dtype)[1]
    probes = [render_prompt(task, tok, ex) for ex in task.test_examples[:args.probes]]
    print(f"{len(probes)} probes of {min(map(len, probes))}-{max(map(len, probes))} tokens; "
          f"trainer compute {cfg.hardware.compute_dtype} over {cfg.hardware.param_dtype}")
    print("| engine | dtype | state | median mean gap | max mean gap | max token gap "
          "| trainer moved | s per check |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.engines:
        ecfg = compose_cfg([f"inference_backend={name}", *args.overrides]).inference_backend
        work = load_model(cfg.model, dtype=cfg.hardware.param_dtype)[0]  # fresh: it will train
        work.config._attn_implementation = cfg.hardware.attn_implementation or "sdpa"
        engine = instantiate(ecfg, model=work, tokenizer=tok, seed=0, _convert_="partial")
        if getattr(engine, "shares_policy", False):
            print(f"| {name} | {ecfg.dtype} | shares the policy: not checked | | | | | |")
            continue
        module = logprob_module(work, True)  # the trainer's, in one process
        check = SyncCheck(probes[0], cfg.rollout.sync_check.max_gap,
                          lambda ids: probe_logprobs(module, ids, cfg, tok.pad_token_id))
        means, worst, secs = gaps(check, engine, probes)
        print(f"| {name} | {ecfg.dtype} | pushed | {statistics.median(means):.4f} | "
              f"{max(means):.4f} | {worst:.3f} | | {secs:.3f} |")
        before = trainer_logprobs(check, probes)
        opt = torch.optim.AdamW(work.parameters(), lr=args.lr)
        ids = torch.tensor([probes[1]])
        with autocast_ctx(cfg):
            loss = work(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        after = trainer_logprobs(check, probes)
        moved = max((a - b).abs().max().item() for a, b in zip(after, before))
        means, worst, _ = gaps(check, engine, probes)
        print(f"| {name} | {ecfg.dtype} | one step (lr {args.lr:g}) not pushed | "
              f"{statistics.median(means):.4f} | {max(means):.4f} | {worst:.3f} | "
              f"{moved:.4f} | |")
        engine.close()


if __name__ == "__main__":
    main()
