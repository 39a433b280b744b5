"""fp32 against bf16 compute for the CPU default: a few GRPO steps of each, side by side.

    python bench/dtype.py [--steps 4]
    python bench/dtype.py --smoke          # the tiny random model, 2 steps (the suite)

Runs the default training job (its RL steps: no warm start, no evaluation) once with
``hardware.compute_dtype=float32`` and once with ``bfloat16`` (master weights fp32 in
both), each for ``--steps`` steps into a scratch MLflow store, and prints the median
rollout, update and step seconds of steps 2..N.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="the tiny random model, 2 steps")
    args = p.parse_args()
    # removed at exit
    out_dir = tempfile.TemporaryDirectory(prefix="nanovppo-bench-", ignore_cleanup_errors=True)
    out = Path(out_dir.name)
    cache = f"model.cache_dir={Path('outputs/cache/models').resolve()}"
    # --smoke: the tiny model on a few short samples (that the script runs, not figures)
    model = (["model=tiny-random", cache, "inference_backend=hf", "trainer.prompts_per_step=2",
              "algo.group_size=2", "rollout.max_new_tokens=8"] if args.smoke else [cache])
    steps = 2 if args.smoke else args.steps
    rows = {}
    for dtype in ("float32", "bfloat16"):
        subprocess.run([sys.executable, "-m", "nanovppo.train", f"hardware.compute_dtype={dtype}",
                        "hardware.param_dtype=float32",  # fp32 master weights in both
                        f"trainer.max_steps={steps}", "trainer.progress=false",
                        "warm_start.steps=0", "trainer.eval_every=0", "trainer.eval_examples=0",
                        "trainer.eval_pass_k=0", f"paths.outputs={out}", *model,
                        f"tracking.run_name={dtype}"], check=True, capture_output=True)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("nanovppo")
    for run in client.search_runs([exp.experiment_id]):
        med = {}
        for key in ("perf/rollout_s", "perf/update_s", "perf/step_s", "perf/gen_tokens_per_s"):
            values = [m.value for m in client.get_metric_history(run.info.run_id, key) if m.step >= 2]
            med[key] = statistics.median(values)
        rows[run.data.params["hardware.compute_dtype"]] = med
    print(f"median of steps 2..{steps}, {'tiny random model' if args.smoke else 'SmolLM2-135M'}, "
          "the default recipe's prompts and samples per step, fp32 master weights")
    print(f"{'compute dtype':14} {'rollout s':>10} {'update s':>10} {'step s':>8} {'tok/s':>7}")
    for dtype, m in rows.items():
        print(f"{dtype:14} {m['perf/rollout_s']:10.1f} {m['perf/update_s']:10.1f} "
              f"{m['perf/step_s']:8.1f} {m['perf/gen_tokens_per_s']:7.0f}")
    f, b = rows["float32"], rows["bfloat16"]
    print(f"bf16 / fp32 step time: {b['perf/step_s'] / f['perf/step_s']:.2f}")


if __name__ == "__main__":
    main()
