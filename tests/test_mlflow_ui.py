"""What MLflow's UI shows for a run, read through the REST API its pages call, on a real
``mlflow server`` that the test starts and stops."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TINY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, **query):
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post(base: str, path: str, body: dict):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def server(tmp_path):
    """A local MLflow tracking server with its own SQLite store and artifact folder."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("mlflow server did not start:\n"
                                     + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def test_the_ui_shows_kind_datasets_system_metrics_and_checkpoints_as_models(tmp_path, server):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": server}
    cmd = [sys.executable, "-m", "nanovppo.train", *TINY, f"paths.outputs={tmp_path}",
           "trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0",
           "tracking.system_metrics_interval=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # The experiment opens on the training-runs view, not the GenAI overview.
    exp = get(server, "/api/2.0/mlflow/experiments/get-by-name",
              experiment_name="nanovppo")["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"

    runs = post(server, "/api/2.0/mlflow/runs/search",
                {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run_id = runs[0]["info"]["run_id"]
    run = get(server, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]

    # The Dataset column: the generated training and test sets (TINY: 50 and 4 problems),
    # with a digest and a source that says how they were generated.
    inputs = run["inputs"]["dataset_inputs"]
    by_context = {next(t["value"] for t in i["tags"] if t["key"] == "mlflow.data.context"):
                  i["dataset"] for i in inputs}
    assert set(by_context) == {"train", "test"}
    assert by_context["train"]["name"] == "countdown-train"
    assert json.loads(by_context["train"]["profile"]) == {"num_rows": 50}
    assert json.loads(by_context["test"]["profile"]) == {"num_rows": 4}
    assert by_context["train"]["digest"] != by_context["test"]["digest"]
    source = json.loads(by_context["train"]["source"])
    assert source["generator"].endswith("countdown.generate_examples") and source["n_train"] == 50

    # System metrics, sampled every second by MLflow's own monitor.
    keys = {m["key"] for m in run["data"]["metrics"]}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys

    # Checkpoints 0 (the RL start), 1 and 2, each a logged model of this run that points at
    # its folder, with the step's metrics linked to it.
    models = post(server, "/api/2.0/mlflow/logged-models/search",
                  {"experiment_ids": [exp["experiment_id"]]})["models"]
    steps = {}
    for m in models:
        info = m["info"]
        assert info["source_run_id"] == run_id
        mtags = {t["key"]: t["value"] for t in info.get("tags", [])}
        steps[int(mtags["nanovppo.step"])] = (mtags, m.get("data", {}).get("metrics", []))
    assert sorted(steps) == [0, 1, 2]
    for step, (mtags, metrics) in steps.items():
        folder = Path(mtags["nanovppo.checkpoint_dir"])
        assert folder.name == f"step_{step:06d}" and (folder / "model" / "config.json").is_file()
        linked = {m["key"] for m in metrics}
        want = {"eval/accuracy_rl_start"} if step == 0 else {"train/reward_mean"}
        assert want <= linked, (step, linked)
    assert "eval/accuracy" in {m["key"] for m in steps[2][1]}  # the last step evaluates
    outputs = run.get("outputs", {}).get("model_outputs", [])
    assert sorted(int(o["step"]) for o in outputs) == [0, 1, 2]
