"""VinePPO value estimation with and without reusing prefixes' keys and values.

    python bench/vppo_prefix_reuse.py [--engine hf|vllm] [--prompts 8] [--group 4] [--mc 4]
    python bench/vppo_prefix_reuse.py --smoke   # the tiny random model, 2 x 2 x 2 (the suite)

Samples one GRPO-sized batch of Countdown responses from SmolLM2-135M, then times
VinePPO's Monte-Carlo value estimation on it twice per setting, alternating. hf engine:
each state's prefix prefilled once and its KV cache copied to the K continuations
(``share_prefix=True``) against every continuation prefilling its prefix itself. vllm
engine: prefix caching on (the prompt's and each state's KV blocks are shared by every
continuation that starts with them) against off; two engines, one per setting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from nanovppo.engines.base import Sampling
from nanovppo.models import load_model
from nanovppo.rollout import RolloutSource
from nanovppo.config import CONF_DIR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--mc", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--smoke", action="store_true", help="the tiny random model, 2 x 2 x 2")
    args = p.parse_args()
    extra = []
    if args.smoke:
        args.prompts = args.group = args.mc = 2
        args.repeats, args.engine, extra = 1, "hf", ["model=tiny-random", "rollout.max_new_tokens=8"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=["algo=vppo", f"inference_backend={args.engine}", *extra])
    torch.manual_seed(0)
    task = instantiate(cfg.task)
    model, tok = load_model(cfg.model, dtype=cfg.hardware.param_dtype)
    def build(**kw):
        return instantiate(cfg.inference_backend, model=model, tokenizer=tok, seed=0,
                           _convert_="partial", **kw)

    if args.engine == "hf":  # one engine; its share_prefix is switched for each run
        engines = dict.fromkeys((True, False), build())
    else:  # prefix caching is fixed when a vLLM engine starts: one engine per setting
        engines = {share: build(enable_prefix_caching=share) for share in (True, False)}
    engine = engines[True]
    sampling = Sampling(n=args.group, temperature=1.0, max_new_tokens=cfg.rollout.max_new_tokens,
                        stop=task.stop)
    source = RolloutSource(task, tok, engine, sampling)
    ro = source.collect(task.train_examples[: args.prompts])
    algo = instantiate(cfg.algo, mc_rollouts=args.mc, max_steps=args.max_steps)
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for share in (True, False):
            engine = engines[share]
            if args.engine == "hf":
                engine.share_prefix = share
            source.engine = engine
            t0 = time.perf_counter()
            _, m = algo.make_samples(ro, source)
            times[share].append(time.perf_counter() - t0)
    with_, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.prompts} prompts x {args.group} responses, {int(m['train/states_valued'])} "
          f"states x {args.mc} continuations ({int(m['train/continuations'])} in all)")
    print(f"value estimation, prefix KV reused : {with_:6.1f} s")
    print(f"value estimation, prefilled each   : {without:6.1f} s")
    print(f"speedup                            : {without / with_:6.2f}x")


if __name__ == "__main__":
    main()
