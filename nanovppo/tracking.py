"""MLflow tracking through ``MlflowClient``: one run per training job, resumable.

Only the process that trains (rank 0 under torchrun) creates a ``Tracker``. Nothing here
touches MLflow's global "active run", so the jobs of a multirun, which Hydra's basic
launcher runs one after another in one process, cannot leak into each other.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

_ILLEGAL = re.compile(r"[^0-9A-Za-z_\-. /]")
MAX_PARAM_CHARS = 6000


def sanitize_key(key: str) -> str:
    """An MLflow-legal metric or param name: ``eval/pass@4`` -> ``eval/pass_at_4``."""
    return _ILLEGAL.sub("_", key.replace("@", "_at_"))


def default_tracking_uri(outputs_dir: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite store under the outputs folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = Path(outputs_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """An MLflow run: new, or an existing one continued after a resume."""

    def __init__(self, uri: str, experiment: str, run_name: str | None = None,
                 run_id: str | None = None, tags: Mapping[str, str] | None = None,
                 artifact_dir: str | os.PathLike | None = None):
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.last_logged_step = 0
        if run_id:
            run = self.client.get_run(run_id)
            self.run_id = run.info.run_id
            self.experiment_id = run.info.experiment_id
            self.client.update_run(self.run_id, status="RUNNING")
            # Steps logged after the checkpoint we resume from would be replayed; skip them.
            for key in run.data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                if history:
                    self.last_logged_step = max(self.last_logged_step, max(m.step for m in history))
        else:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = None
                if uri.startswith("sqlite:") and artifact_dir is not None:
                    location = Path(artifact_dir).resolve().as_uri()
                try:
                    self.experiment_id = self.client.create_experiment(experiment, location)
                except mlflow.exceptions.MlflowException:  # created by a concurrent job
                    self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
            else:
                self.experiment_id = exp.experiment_id
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags=dict(tags or {}))
            self.run_id = run.info.run_id

    # -- logging --------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(sanitize_key(k), str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> bool:
        """Log one step's metrics; a step that this run already holds is skipped."""
        if step <= self.last_logged_step:
            return False
        import time

        now = int(time.time() * 1000)
        items = [Metric(sanitize_key(k), float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])
        self.last_logged_step = step
        return True

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file)

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
