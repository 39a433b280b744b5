"""A table of finished runs from MLflow: wall time, reward first-5 vs last-5, step split.

    python bench/run_table.py [--experiment nanovppo] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from mlflow.tracking import MlflowClient

from nanovppo.tracking import default_tracking_uri, experiment_runs, kind_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="nanovppo")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args()
    client = MlflowClient(args.tracking_uri or default_tracking_uri("outputs"))
    runs = experiment_runs(client, args.experiment, "attributes.status = 'FINISHED'",
                           order_by=["attributes.start_time ASC"])
    print(f"{'run':28} {'wall min':>8} {'first5':>7} {'last5':>7} {'step s':>7} {'rollout':>8} "
          f"{'values':>7} {'update':>7} {'tok/s':>6}")
    for run in runs:
        if kind_of(run) != "train":
            continue
        hist = lambda k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k),
                                                   key=lambda m: m.step)]
        rewards = hist("train/reward_mean")
        med = lambda k: statistics.median(hist(k)) if hist(k) else float("nan")
        wall = (run.info.end_time - run.info.start_time) / 60000
        print(f"{run.info.run_name:28} {wall:8.1f} {np.mean(rewards[:5]):7.3f} "
              f"{np.mean(rewards[-5:]):7.3f} {med('perf/step_s'):7.1f} {med('perf/rollout_s'):8.1f} "
              f"{med('perf/experience_s'):7.1f} {med('perf/update_s'):7.1f} "
              f"{med('perf/gen_tokens_per_s'):6.0f}")


if __name__ == "__main__":
    main()
