"""Every script in bench/ still runs: each is run for real, on the tiny random model and the
smallest budget it takes, and must exit 0 and print its table. Their figures mean nothing
at this size; what breaks here is a script that no longer matches the code it measures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Modules of bench/ that are not scripts.
HELPERS = {"bench_tasks.py", "micro_batches.py"}
TINY_MODEL = "model=tiny-random"

# script -> (its smoke arguments, a line its output must hold). "{store}" is the MLflow
# store of a tiny training run (for the scripts that tabulate runs).
SMOKE = {
    "dtype.py": (["--smoke"], "bf16 / fp32 step time"),
    "ema_8bit.py": (["--smoke"], "ema update"),
    "engines.py": (["--engines", "hf", "--batches", "4", "--new-tokens", "4", "--repeats", "1",
                    TINY_MODEL], "tok/s"),
    "grading.py": ([], "agreement:"),
    "learning_table.py": (["--tracking-uri", "{store}"], "acc start"),
    "mismatch.py": (["--engines", "hf", "--prompts", "2", "--new-tokens", "4", TINY_MODEL],
                    "hf"),
    "model_load.py": (["--smoke"], "second load"),
    "one_pass.py": (["--smoke"], "| one pass |"),
    "packed_update.py": (["--smoke"], "| all three (now) |"),
    "run_table.py": (["--tracking-uri", "{store}"], "wall min"),
    "same_seed.py": (["--smoke"], "metrics,"),
    "seen_unseen.py": (["--smoke"], "greedy acc"),
    "sync_gap.py": (["--engines", "hf", "--probes", "2", TINY_MODEL], "hf"),
    "trl_compare.py": (["--smoke"], "samples with gradient"),
    "vppo_prefix_reuse.py": (["--smoke"], "speedup"),
}


def test_every_bench_script_has_a_smoke_run():
    scripts = {p.name for p in BENCH.glob("*.py")} - HELPERS
    assert scripts == set(SMOKE)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The MLflow store of a one-step tiny training run."""
    folder = tmp_path_factory.mktemp("runs")
    run_cli(folder, "trainer.max_steps=1", base=TINY)
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_bench_script_runs(script, request, tmp_path):
    args, expected = SMOKE[script]
    if "{store}" in args:
        uri = request.getfixturevalue("store")
        args = [a.replace("{store}", uri) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stderr[-4000:]}"
    assert expected in proc.stdout, proc.stdout[-3000:]
