"""Compare runs from MLflow: metrics against step, one line per group, a band over seeds.

    nanovppo-plot --experiment nanovppo --group-by algo.name \\
        --metrics train/reward_mean train/accuracy --out outputs/plots/algos.png
    nanovppo-plot --run-ids ID1 ID2 --group-by algo.lr --log   # also log the PNG to MLflow
    nanovppo-plot --group-by nanovppo.kind --x minutes --metrics eval/accuracy  # RL vs control

Runs come from an experiment (optionally narrowed by an MLflow ``--filter`` such as
"params.task.name = 'countdown'") or from explicit run ids. Each group (runs with the
same value of the ``--group-by`` param, or tag such as ``nanovppo.kind``) is drawn as the
mean over its runs, with a band from the lowest to the highest run at each step. With
``--x minutes`` each run is drawn on its own against wall-clock minutes since it started
(runs of one group share a colour), so that runs of different speeds compare fairly.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from nanovppo.tracking import default_tracking_uri, experiment_runs, kind_of


def collect(client: MlflowClient, experiment: str | None, run_ids: list[str] | None,
            filter_string: str, group_by: str, metrics: list[str], x: str = "step"):
    """{group value: {metric: [(xs, values) per run]}} and the runs used; xs are steps, or
    minutes since the run started (then each entry also holds the run's name)."""
    runs = ([client.get_run(r) for r in run_ids] if run_ids
            else experiment_runs(client, experiment, filter_string))
    # training runs and their controls; plots and evaluations are not training curves, and
    # failed or killed runs stop early
    runs = [r for r in runs if kind_of(r) in ("train", "control")
            and r.info.status in ("FINISHED", "RUNNING")]
    if not runs:
        raise SystemExit("error: no runs matched")
    data: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        group = run.data.params.get(group_by, run.data.tags.get(group_by, "(unset)"))
        for m in metrics:
            history = sorted((h.step, h.value) if x == "step" else
                             ((h.timestamp - run.info.start_time) / 60_000, h.value)
                             for h in client.get_metric_history(run.info.run_id, m))
            if history:
                steps, values = zip(*history)
                curve = (np.array(steps), np.array(values))
                # against minutes each run is its own line, named by its run name
                data[group][m].append(curve if x == "step" else (*curve, run.info.run_name))
    return data, runs


def band(curves: list[tuple[np.ndarray, np.ndarray]]):
    """Mean, min and max over runs at the steps all of them reached."""
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
    table = np.array([[dict(zip(s.tolist(), v.tolist()))[k] for k in common] for s, v in curves])
    return np.array(common), table.mean(0), table.min(0), table.max(0)


def figure(data, metrics: list[str], group_by: str, title: str | None, x: str = "step"):
    """The matplotlib figure: one panel a metric; a group keeps its colour in every panel,
    and against minutes the runs of a group are told apart by line style, given in the
    order of their names (so that e.g. the seed-1 runs of two groups share a style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {group: f"C{i}" for i, group in enumerate(sorted(data))}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    legend = {}  # label -> handle, over all panels
    for ax, metric in zip(axes[0], metrics):
        for group in sorted(data):
            curves = data[group].get(metric)
            if not curves:
                continue
            if x == "minutes":  # runs of one group do not share times: one line each
                for i, (xs, values, name) in enumerate(sorted(curves, key=lambda c: c[2])):
                    line, = ax.plot(xs, values, marker="o", markersize=3 if len(xs) > 1 else 7,
                                    color=colours[group],
                                    linestyle=("-", "--", ":", "-.")[i % 4],
                                    label=f"{group_by}={group}: {name}")
                    legend.setdefault(line.get_label(), line)
                continue
            steps, mean, lo, hi = band(curves)
            line, = ax.plot(steps, mean, color=colours[group],
                            label=f"{group_by}={group} (n={len(curves)})")
            legend.setdefault(line.get_label(), line)
            if len(curves) > 1:
                ax.fill_between(steps, lo, hi, color=colours[group], alpha=0.2)
        ax.set_title(metric)
        ax.set_xlabel("minutes since the run started" if x == "minutes" else "step")
        ax.grid(alpha=0.3)
    # one legend for all panels, below them, so that it hides no curve
    rows = -(-len(legend) // 2)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=2, fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 * rows, 1, 1))
    return fig


def draw(data, metrics: list[str], group_by: str, out: Path, title: str | None,
         x: str = "step") -> Path:
    import matplotlib.pyplot as plt

    fig = figure(data, metrics, group_by, title, x)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="nanovppo-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db)")
    p.add_argument("--outputs", default="outputs", help="the outputs folder holding mlflow.db")
    p.add_argument("--experiment", default="nanovppo")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.seed = '0'\"")
    p.add_argument("--run-ids", nargs="*", default=None)
    p.add_argument("--group-by", default="algo.name", help="param that names a curve")
    p.add_argument("--metrics", nargs="+", default=["train/reward_mean"])
    p.add_argument("--out", default="outputs/plots/compare.png")
    p.add_argument("--title", default=None)
    p.add_argument("--x", choices=("step", "minutes"), default="step",
                   help="x axis: the step, or wall-clock minutes since each run started")
    p.add_argument("--log", action="store_true",
                   help="log the PNG to a new MLflow run (tagged nanovppo.kind=plot)")
    args = p.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri(args.outputs)
    client = MlflowClient(tracking_uri=uri)
    data, runs = collect(client, args.experiment, args.run_ids, args.filter, args.group_by,
                         args.metrics, args.x)
    out = draw(data, args.metrics, args.group_by, Path(args.out), args.title, args.x)
    print(f"wrote {out} from {len(runs)} runs in {len(data)} groups of {args.group_by}")
    if args.log:
        run = client.create_run(runs[0].info.experiment_id, run_name=f"plot-{out.stem}",
                                tags={"nanovppo.kind": "plot",
                                      "nanovppo.plot.runs": ",".join(r.info.run_id for r in runs)})
        client.log_artifact(run.info.run_id, str(out))
        client.set_terminated(run.info.run_id)
        print(f"logged to MLflow run {run.info.run_id}")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
