"""MLflow tracking through ``MlflowClient``: one run per training job, resumable.

Only the process that trains (rank 0 under torchrun) creates a ``Tracker``. Nothing here
touches MLflow's global "active run", so the jobs of a multirun, which Hydra's basic
launcher runs one after another in one process, cannot leak into each other.

What MLflow's UI reads, and where it comes from here:

- the experiment's kind (tag ``mlflow.experimentKind``): set to
  ``custom_model_development`` when nanovppo creates the experiment, so the UI opens on
  the training runs, not on the GenAI views;
- the run's datasets (``log_datasets``): the task's training and test sets as dataset
  inputs with a name, a digest of their rows and their source (generated with a seed and
  settings, a hub id, or a file);
- system metrics (``system/*``: CPU, memory, disk, network, GPU where present), sampled by
  MLflow's own monitor in a thread;
- logged models (``log_checkpoint``): each checkpoint as an external logged model that
  points at its folder, with the step's metrics linked to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

log = logging.getLogger(__name__)

_ILLEGAL = re.compile(r"[^0-9A-Za-z_\-. /]")
EXPERIMENT_KIND = "mlflow.experimentKind"
CHECKPOINT_TAG = "nanovppo.checkpoint_dir"  # a logged model's checkpoint folder
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
        self.last_logged_step: int | None = None  # a new run has logged nothing
        if run_id:
            run = self.client.get_run(run_id)
            self.run_id = run.info.run_id
            self.experiment_id = run.info.experiment_id
            self.client.update_run(self.run_id, status="RUNNING")
            # Steps logged after the checkpoint we resume from would be replayed; skip them.
            for key in run.data.metrics:
                if key.startswith("system/"):  # the system monitor counts its own steps
                    continue
                history = self.client.get_metric_history(self.run_id, key)
                if history:
                    last = max(m.step for m in history)
                    if self.last_logged_step is None or last > self.last_logged_step:
                        self.last_logged_step = last
        else:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = None
                if uri.startswith("sqlite:") and artifact_dir is not None:
                    location = Path(artifact_dir).resolve().as_uri()
                try:  # the UI then opens on its runs, not on MLflow's GenAI views
                    self.experiment_id = self.client.create_experiment(
                        experiment, location, tags={EXPERIMENT_KIND: "custom_model_development"})
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

    def log_metrics(self, metrics: Mapping[str, float], step: int,
                    model_id: str | None = None) -> bool:
        """Log one step's metrics (linked to a logged model, e.g. the step's checkpoint); a
        step that this run already holds is skipped."""
        if self.last_logged_step is not None and step <= self.last_logged_step:
            return False
        now = int(time.time() * 1000)
        items = [Metric(sanitize_key(k), float(v), now, step, model_id=model_id)
                 for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
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

    # -- datasets, system metrics, models -------------------------------------------------

    def log_datasets(self, datasets: Mapping[str, dict]) -> None:
        """Log datasets as the run's inputs: ``{context: {"name", "rows", "source_type",
        "source"}}`` (``Task.datasets()``); the digest is a hash of the rows."""
        inputs = []
        for context, d in datasets.items():
            rows = json.dumps(d["rows"], sort_keys=True, default=str).encode()
            dataset = Dataset(name=d["name"], digest=hashlib.sha256(rows).hexdigest()[:12],
                              source_type=d["source_type"], source=json.dumps(d["source"]),
                              profile=json.dumps({"num_rows": len(d["rows"])}))
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def start_system_metrics(self, interval: float | None, resume: bool = False) -> None:
        """Sample CPU, memory, disk, network and GPU use every ``interval`` seconds into
        ``system/*`` (None: off)."""
        self._monitor = None
        if not interval:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                             resume_logging=resume, tracking_uri=self.uri)
        self._monitor.start()

    def log_checkpoint(self, step: int, path: str | os.PathLike,
                       params: Mapping[str, Any] | None = None) -> str:
        """Register the checkpoint at ``path`` as an external logged model, an output of this
        run (MLflow keeps only its description; the weights stay in the folder). Returns its
        id: ``models:/<id>``; ``log_metrics(..., model_id=...)`` links the step's metrics."""
        from mlflow.entities import LoggedModelOutput
        from mlflow.models.model import MLMODEL_FILE_NAME
        from mlflow.models.utils import get_external_mlflow_model_spec
        from mlflow.utils.file_utils import TempDir

        model = self.client.create_logged_model(
            self.experiment_id, name=f"checkpoint-step-{step}", source_run_id=self.run_id,
            tags={MLFLOW_MODEL_IS_EXTERNAL: "true", CHECKPOINT_TAG: str(Path(path).resolve()),
                  "nanovppo.step": str(step)},
            params={k: str(v)[:MAX_PARAM_CHARS] for k, v in (params or {}).items()},
            model_type="nanovppo-checkpoint")
        with TempDir() as tmp:  # the MLmodel file MLflow writes for external models
            get_external_mlflow_model_spec(model).save(tmp.path(MLMODEL_FILE_NAME))
            self.client.log_model_artifacts(model.model_id, tmp.path())
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def finish(self, status: str = "FINISHED") -> None:
        if getattr(self, "_monitor", None) is not None:
            self._monitor.finish()
        self.client.set_terminated(self.run_id, status=status)


def experiment_runs(client: MlflowClient, experiment: str, filter_string: str = "",
                    order_by: list[str] | None = None) -> list:
    """The runs of an MLflow experiment (an MLflow ``filter_string`` narrows them); an
    experiment that does not exist is a one-line error."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no MLflow experiment named {experiment!r}")
    return client.search_runs([exp.experiment_id], filter_string=filter_string,
                              max_results=5000, order_by=order_by)


def kind_of(run) -> str:
    """A run's ``nanovppo.kind`` tag: train, control, eval or plot (train for runs logged
    before the tag existed)."""
    return run.data.tags.get("nanovppo.kind", "train")


def checkpoint_of_model(uri: str, model_uri: str) -> Path:
    """The checkpoint folder behind a ``models:/<id>`` URI that ``log_checkpoint`` made."""
    model_id = model_uri.removeprefix("models:/").strip("/")
    model = MlflowClient(tracking_uri=uri).get_logged_model(model_id)
    path = model.tags.get(CHECKPOINT_TAG)
    if not path:
        raise ValueError(f"{model_uri} is not a nanovppo checkpoint (no {CHECKPOINT_TAG} tag)")
    return Path(path)
