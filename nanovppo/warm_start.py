"""The warm start: a short supervised stage on demonstrations the task writes itself,
before RL.

A small model may never sample a correct answer, and then a reward pays for nothing and
RL has nothing to learn from. Countdown's generator builds each target from an equation,
so the task can write a response that solves it (``task.demonstration``); a few steps of
fine-tuning on those teach the layout and a first feel for the arithmetic. The bar that
matters is what RL adds afterwards: the trainer evaluates the policy when the warm start
ends and logs it as ``eval/accuracy_rl_start`` (and as ``eval/accuracy`` at step 0).

The stage has its own optimizer and learning rate (``warm_start``), uses the trainer's
update (the token NLL of the demonstrations, at temperature 1) and logs
``warm_start/loss`` and ``warm_start/lr`` at steps -W .. -1, so that in MLflow it comes
before the evaluation of the RL start (step 0) and RL's steps 1 .. N on the same axis.
"""

from __future__ import annotations

import logging
import threading
import time

from nanovppo import distributed as dd
from nanovppo.algos.rft import RFT
from nanovppo.batching import examples_for_step
from nanovppo.errors import ConfigError
from nanovppo.optim import adamw
from nanovppo.progress import bar
from nanovppo.rollout import Sample, render_prompt
from nanovppo.update import update

log = logging.getLogger("nanovppo")


def demonstrations(task, limit: int | None) -> list[tuple[dict, str]]:
    """The training examples the task can demonstrate, with their demonstrations: those
    of the first ``limit`` training problems (None: of all)."""
    write = getattr(task, "demonstration", None)
    examples = task.train_examples if limit is None else task.train_examples[:limit]
    pairs = [(ex, write(ex)) for ex in examples] if write else []
    pairs = [(ex, demo) for ex, demo in pairs if demo]
    if not pairs:
        raise ConfigError(f"warm_start.steps > 0, but task {task.name!r} writes no "
                          "demonstrations (Countdown does for the problems it generates: "
                          "task.source=generate); set warm_start.steps=0")
    return pairs


# The warm start's loss: the token NLL of the demonstrations, nothing else.
def _sft() -> RFT:
    return RFT(name="sft", lr=0.0, group_size=1, dedup=None, success_band=None, kl_coef=0.0,
               kl_estimator="k3", kl_agg="token-mean", loss_agg="token-mean", ppo_epochs=1,
               num_minibatches=1, mask_truncated=False)


def warm_start(cfg, task, tokenizer, model, tracker, d: dd.Dist, stop: threading.Event) -> dict:
    """Run ``cfg.warm_start.steps`` supervised steps on the policy (``model`` is its
    ``GroupLogprobs`` wrapper, possibly DDP-wrapped) and return the stage's metrics. It runs
    before the rollout engine is built, so the engine starts from the warm-started weights.
    When ``stop`` is set (a signal) it ends after the current step: nothing is saved before
    the RL start, so the run is stopped, not resumable."""
    ws = cfg.warm_start
    pairs = demonstrations(task, ws.demonstrations)
    if d.main:
        log.info("warm start: %d supervised steps of %d demonstrations, drawn from %d "
                 "problems' own", ws.steps, ws.batch_size, len(pairs))
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=ws.lr, betas=tuple(cfg.trainer.adam_betas),
                      weight_decay=cfg.trainer.weight_decay, seed=cfg.seed + 1,
                      kind=cfg.trainer.optimizer, bf16_rounding=cfg.hardware.bf16_rounding)
    algo = _sft()
    losses = []
    t0 = time.perf_counter()
    steps = bar(cfg.trainer.progress and d.main, iterable=range(1, ws.steps + 1),
                desc="warm start", unit="step", leave=False)
    for step in steps:
        # A pure function of (seed, step), like the RL stage's prompts: its own stream.
        idx = examples_for_step(len(pairs), ws.batch_size, cfg.seed + 7_777, step)[d.rank::d.world]
        samples = []
        for g, i in enumerate(idx):
            ex, demo = pairs[i]
            samples.append(Sample(render_prompt(task, tokenizer, ex),
                                  tokenizer(demo, add_special_tokens=False).input_ids,
                                  1.0, 0.0, False, g))
        lr = ws.lr * (1.0 - (step - 1) / ws.steps if ws.schedule == "linear" else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        m = update(model, None, algo, samples, cfg, optimizer, tokenizer.pad_token_id,
                   step=-step, d=d)
        losses.append(m["train/loss"])
        steps.set_postfix(loss=f"{m['train/loss']:.3f}")
        if d.main:
            tracker.log_metrics({"warm_start/loss": m["train/loss"], "warm_start/lr": lr,
                                 "warm_start/grad_norm": m["train/grad_norm"]},
                                step - ws.steps - 1)
        if dd.any_rank(stop.is_set(), d):
            raise KeyboardInterrupt(f"stopped during the warm start, after its step {step} of "
                                    f"{ws.steps}; a run saves nothing before its RL start: "
                                    "start it again")
    steps.close()
    seconds = time.perf_counter() - t0
    if d.main:
        log.info("warm start: done in %.0f s, loss %.3f -> %.3f", seconds, losses[0],
                 losses[-1])
    return {"warm_start/seconds": seconds, "warm_start/final_loss": losses[-1]}
