"""Did RL change the answers on the problems it trained on? Greedy accuracy of checkpoints
on the training problems of a run's first steps (the ones its RL saw) and on the same
number of training problems of the steps after (unseen by RL, same distribution).

    python bench/seen_unseen.py --steps 40 --prompts-per-step 4 \\
        --checkpoints outputs/runs/DATE/TIME/checkpoints/step_000000 \\
                      outputs/runs/DATE/TIME/checkpoints/step_000040 [KEY=VALUE ...]

KEY=VALUE are overrides of the evaluation config (conf/evaluate.yaml: the default recipe
unless one is named); ``seed`` must be the run's, since it orders the training prompts
(``nanovppo.batching.examples_for_step``). The warm start drew its demonstrations from the
same training problems, so both sets can read above the test set.
"""

from __future__ import annotations

import argparse

from hydra import compose, initialize_config_dir

from nanovppo.batching import examples_for_step
from nanovppo.config import CONF_DIR
from nanovppo.evaluate import evaluate_model

SMOKE = ["experiment=bare", "model=tiny-random", "inference_backend=hf", "rollout.max_new_tokens=4",
         "task.n_train=50", "task.n_test=4"]


def step_examples(n: int, per_step: int, seed: int, first: int, last: int) -> list[int]:
    """Indices of the training examples of steps ``first`` to ``last`` (1-based, inclusive)."""
    return [i for step in range(first, last + 1)
            for i in examples_for_step(n, per_step, seed, step)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="*", default=[],
                   help="step_N folders or run folders (none: the configured model)")
    p.add_argument("--steps", type=int, default=40, help="RL steps the run took")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="the tiny random model, 1 step of 2")
    args, overrides = p.parse_known_args()
    if args.smoke:
        args.steps, args.prompts_per_step, overrides = 1, 2, SMOKE + overrides
    base = ["eval.log_to_mlflow=false", "trainer.progress=false", "eval.batch_prompts=64"]
    rows = []
    for checkpoint in args.checkpoints or [None]:
        extra = [f"eval.checkpoint={checkpoint}"] if checkpoint else []
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("evaluate", overrides=base + extra + overrides)
        for name, first, last in (("seen", 1, args.steps), ("unseen", args.steps + 1, 2 * args.steps)):
            def select(task, first=first, last=last):
                idx = step_examples(len(task.train_examples), args.prompts_per_step, cfg.seed,
                                    first, last)
                return [task.train_examples[i] for i in idx]
            out = evaluate_model(cfg, select=select)
            rows.append((checkpoint or cfg.model.name, name, int(out["results"]["examples"]),
                         out["results"]["pass@1"]))
    print(f"{'checkpoint':60} {'problems':>8} {'n':>5} {'greedy acc':>10}")
    for checkpoint, name, n, acc in rows:
        print(f"{str(checkpoint)[-60:]:60} {name:>8} {n:5d} {acc:10.3f}")


if __name__ == "__main__":
    main()
