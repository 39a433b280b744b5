"""nanovppo-plot on a real MLflow store."""

import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from nanovppo.plot import band, collect, main
from nanovppo.tracking import Tracker


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for algo, offset in [("grpo", 0.0), ("vppo", 1.0)]:
        for seed in (0, 1):
            t = Tracker(uri, "cmp", run_name=f"{algo}-{seed}", artifact_dir=tmp_path / "art")
            t.log_params({"algo.name": algo, "seed": seed})
            for step in range(1, 5 + seed):  # seed 1 runs one step longer
                t.log_metrics({"train/reward_mean": offset + step * 0.1 + seed * 0.05}, step)
            t.finish()
    return uri


def test_groups_and_bands(store):
    data, runs = collect(MlflowClient(store), "cmp", None, "", "algo.name", ["train/reward_mean"])
    assert len(runs) == 4 and sorted(data) == ["grpo", "vppo"]
    steps, mean, lo, hi = band(data["vppo"]["train/reward_mean"])
    assert steps.tolist() == [1, 2, 3, 4]  # the steps both seeds reached
    np.testing.assert_allclose(mean, [1.125, 1.225, 1.325, 1.425])
    np.testing.assert_allclose(hi - lo, [0.05] * 4)


def test_cli_writes_and_logs_a_png(store, tmp_path, capsys):
    out = tmp_path / "plots" / "cmp.png"
    proc = subprocess.run([sys.executable, "-m", "nanovppo.plot", "--tracking-uri", store,
                           "--experiment", "cmp", "--metrics", "train/reward_mean",
                           "--out", str(out), "--log", "--filter", "params.seed = '0'"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "from 2 runs in 2 groups" in proc.stdout
    c = MlflowClient(store)
    exp = c.get_experiment_by_name("cmp")
    plots = c.search_runs([exp.experiment_id], "tags.`nanovppo.kind` = 'plot'")
    assert len(plots) == 1
    assert [a.path for a in c.list_artifacts(plots[0].info.run_id)] == ["cmp.png"]
    # a second plot ignores the plot run itself: it counts the training runs only
    training = len(c.search_runs([exp.experiment_id])) - len(plots)
    main(["--tracking-uri", store, "--experiment", "cmp", "--out", str(tmp_path / "b.png")])
    assert f"from {training} runs" in capsys.readouterr().out


def test_unknown_experiment_is_a_clear_error(store, tmp_path):
    with pytest.raises(SystemExit, match="no MLflow experiment named 'nope'"):
        main(["--tracking-uri", store, "--experiment", "nope", "--out", str(tmp_path / "x.png")])


def test_group_by_a_tag_against_minutes_keeps_controls_and_drops_evaluations(tmp_path):
    """RL runs and their controls (tagged nanovppo.kind) grouped by that tag, against
    minutes since each run started: a metric logged 90 s after the start sits at 1.5."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for kind in ("train", "control", "eval"):
        t = Tracker(uri, "lc", run_name=kind, tags={"nanovppo.kind": kind},
                    artifact_dir=tmp_path / "art")
        start = client.get_run(t.run_id).info.start_time
        client.log_metric(t.run_id, "eval/accuracy", 0.5, timestamp=start + 90_000, step=0)
        t.finish()
    data, runs = collect(client, "lc", None, "", "nanovppo.kind", ["eval/accuracy"], x="minutes")
    assert sorted(data) == ["control", "train"] and len(runs) == 2
    [(xs, values, name)] = data["control"]["eval/accuracy"]
    assert xs.tolist() == [1.5] and values.tolist() == [0.5] and name == "control"
    out = main(["--tracking-uri", uri, "--experiment", "lc", "--group-by", "nanovppo.kind",
                "--x", "minutes", "--metrics", "eval/accuracy", "--out", str(tmp_path / "m.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_group_keeps_its_colour_and_a_run_its_style_by_name():
    """Against minutes: each group one colour in every panel, and runs styled in the order
    of their names, whatever order MLflow returned them in (the seed-0 runs of both groups
    solid, the seed-1 runs dashed); one legend for the figure, an entry per run."""
    import matplotlib.pyplot as plt

    from nanovppo.plot import figure

    xs, ys = np.array([1.0, 2.0]), np.array([0.1, 0.2])
    data = {"train": {"acc": [(xs, ys, "rl-seed1"), (xs, ys, "rl-seed0")],
                      "reward": [(xs, ys, "rl-seed0"), (xs, ys, "rl-seed1")]},
            "control": {"acc": [(xs[:1], ys[:1], "control-seed0"), (xs[:1], ys[:1], "control-seed1")]}}
    fig = figure(data, ["acc", "reward"], "kind", None, x="minutes")
    lines = {(ax.get_title(), line.get_label()): line for ax in fig.axes for line in ax.get_lines()}
    colour = lambda panel, label: lines[(panel, label)].get_color()  # noqa: E731
    assert colour("acc", "kind=train: rl-seed0") == colour("reward", "kind=train: rl-seed1")
    assert colour("acc", "kind=train: rl-seed0") != colour("acc", "kind=control: control-seed0")
    styles = {label: line.get_linestyle() for (_, label), line in lines.items()}
    assert styles["kind=train: rl-seed0"] == styles["kind=control: control-seed0"] == "-"
    assert styles["kind=train: rl-seed1"] == styles["kind=control: control-seed1"] == "--"
    [legend] = fig.legends
    assert len(legend.get_texts()) == 4
    plt.close(fig)
