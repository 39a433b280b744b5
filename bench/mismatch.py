"""Engine/trainer mismatch: how far each engine's sampling distribution is from the
trainer's, and how much of a batch the corrections touch.

    python bench/mismatch.py                          # SmolLM2, hf and vllm, bf16
    python bench/mismatch.py --engines vllm --prompts 32 --new-tokens 96

Each engine samples Countdown completions (``--prompts`` x 4, T=1, no stop string); the
trainer then computes the same tokens' log-probs with its own code (``GroupLogprobs``
under the configured autocast, as in an update). Printed per engine: the mean k3 estimate
of KL(engine || trainer) per token, the mean and largest |log pi_trainer - log pi_engine|,
and the share of tokens that each correction of ``rollout.correction`` touches at its
default thresholds (tis: rho > cap; mis: rho outside [low, high]; token and sequence
level).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanovppo.algos.losses import mismatch_stats, rollout_correction  # noqa: E402
from nanovppo.engines.base import Sampling  # noqa: E402
from nanovppo.logprobs import GroupLogprobs, pad_groups  # noqa: E402
from nanovppo.models import load_model  # noqa: E402
from nanovppo.rollout import render_prompt  # noqa: E402
from nanovppo.models import autocast_ctx  # noqa: E402
from tests.conftest import compose_cfg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. hardware.compute_dtype=float32")
    args = ap.parse_args()

    cfg = compose_cfg(["task.n_train=300", *args.overrides])
    task = instantiate(cfg.task)
    policy, tok = load_model(cfg.model, dtype=cfg.hardware.param_dtype)
    policy.config._attn_implementation = cfg.hardware.attn_implementation or "sdpa"
    trainer = GroupLogprobs(policy).eval()
    corr = cfg.rollout.correction
    prompts = [render_prompt(task, tok, ex) for ex in task.train_examples[:args.prompts]]
    sp = Sampling(n=4, temperature=1.0, max_new_tokens=args.new_tokens)
    print(f"{args.prompts} prompts x 4 samples, {args.new_tokens} tokens, trainer compute "
          f"{cfg.hardware.compute_dtype} over {cfg.hardware.param_dtype} weights")
    print("| engine | tokens | mean k3 | mean abs diff | max abs diff | tis token | mis token "
          "| tis sequence | mis sequence |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.engines:
        ecfg = compose_cfg([f"inference_backend={name}", *args.overrides]).inference_backend
        engine = instantiate(ecfg, model=policy, tokenizer=tok, seed=0, _convert_="partial")
        groups = engine.generate(prompts, sp)
        sums = {"k3": 0.0, "abs": 0.0, "tokens": 0.0, "max": 0.0}
        touched = {k: 0.0 for k in ("tis-token", "mis-token", "tis-sequence", "mis-sequence")}
        for prompt, group in zip(prompts, groups):
            batch = pad_groups([prompt], [[c.token_ids for c in group]], tok.pad_token_id)
            with torch.no_grad(), autocast_ctx(cfg):
                old = trainer(batch, sp.temperature, cfg.trainer.logprob_chunk_tokens)
            mask = batch.completion_mask
            engine_logp = torch.zeros_like(old)
            for r, c in enumerate(group):
                engine_logp[r, :len(c.logprobs)] = torch.tensor(c.logprobs)
            m = mismatch_stats(old, engine_logp, mask)
            sums["k3"] += m["mismatch_k3_tokens"]
            sums["abs"] += ((old - engine_logp).abs() * mask).sum().item()
            sums["max"] = max(sums["max"], m["mismatch_max_abs"])
            sums["tokens"] += mask.sum().item()
            for key in touched:
                mode, level = key.split("-")
                _, n = rollout_correction(old, engine_logp, mask, mode, level, corr.cap, corr.low,
                                          corr.high)
                touched[key] += n
        n = sums["tokens"]
        print(f"| {name} | {int(n)} | {sums['k3'] / n:.2e} | {sums['abs'] / n:.4f} | "
              f"{sums['max']:.3f} | " + " | ".join(f"{touched[k] / n:.2%}" for k in touched) + " |")
        engine.close()


if __name__ == "__main__":
    main()
