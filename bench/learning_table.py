"""The learning comparison as a table: for each RL run and control in an MLflow experiment,
its wall time, held-out accuracy at the RL start (the warm start's end) and at its end,
pass@k at both ends, the median step split and the share of groups with no signal.

    python bench/learning_table.py [--experiment nanovppo] [--tracking-uri URI] [--run-ids ID ...]

A control (tag nanovppo.kind=control) has no RL phase: its RL start is its end.
"""

from __future__ import annotations

import argparse
import statistics

from mlflow.tracking import MlflowClient

from nanovppo.tracking import default_tracking_uri, experiment_runs, kind_of


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def row(client: MlflowClient, run) -> dict:
    rid = run.info.run_id
    acc = history(client, rid, "eval/accuracy")
    passk = [k for k in run.data.metrics if k.startswith("eval/pass_at_")]
    pk = history(client, rid, passk[0]) if passk else []
    med = lambda k: statistics.median(v for _, v in history(client, rid, k)) if k in run.data.metrics else float("nan")  # noqa: E731
    zero = [v for _, v in history(client, rid, "train/frac_reward_zero_std")]
    return {
        "run": run.info.run_name, "kind": kind_of(run),
        "seed": run.data.params.get("seed"), "status": run.info.status,
        "wall min": ((run.info.end_time or run.info.start_time) - run.info.start_time) / 60_000,
        "warm s": run.data.metrics.get("warm_start/seconds", float("nan")),
        "acc start": acc[0][1] if acc else float("nan"),
        "acc end": acc[-1][1] if acc else float("nan"),
        "end step": acc[-1][0] if acc else -1,
        "pass@k start": pk[0][1] if pk else float("nan"),
        "pass@k end": pk[-1][1] if pk else float("nan"),
        "step s": med("perf/step_s"), "rollout s": med("perf/rollout_s"),
        "exp s": med("perf/experience_s"), "update s": med("perf/update_s"),
        "zero-std": sum(zero) / len(zero) if zero else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="nanovppo")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--run-ids", nargs="*", default=None,
                   help="only these runs of the experiment (by default all)")
    args = p.parse_args()
    client = MlflowClient(args.tracking_uri or default_tracking_uri("outputs"))
    runs = [r for r in experiment_runs(client, args.experiment,
                                       order_by=["attributes.start_time ASC"])
            if kind_of(r) in ("train", "control")
            and (args.run_ids is None or r.info.run_id in args.run_ids)]
    rows = [row(client, r) for r in runs]
    if not rows:
        raise SystemExit("error: no training or control runs")
    cols = list(rows[0])
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) and c.startswith(("acc", "pass", "zero"))
                         else f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
