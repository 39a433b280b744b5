"""Same seed, same numbers, across a code change: run a shortened default recipe with one
thread (``hardware.threads=1``, which makes a run repeat to the bit: docs/results.md) and
save every logged value that is not a time; compare two such files.

    python bench/same_seed.py --out before.json          # on the old code
    python bench/same_seed.py --out after.json           # on the new code
    python bench/same_seed.py --compare before.json after.json

Extra keys after ``--`` are passed to ``nanovppo.train`` (e.g. ``-- algo=vppo``). ``--smoke``
runs the tiny random model for a few seconds instead (the suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

# The default recipe (conf/experiment/countdown_cpu.yaml) cut to a few steps of each phase:
# warm start, RL steps with an evaluation and a checkpoint in the middle, pass@k at both ends.
SHORT = ["hardware.threads=1", "warm_start.steps=4", "trainer.max_steps=4",
         "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.eval_examples=16",
         "trainer.eval_pass_k=2"]
SMOKE = ["model=tiny-random", "inference_backend=hf", "hardware.threads=1",
         "warm_start.steps=2", "trainer.max_steps=2", "trainer.eval_every=2",
         "trainer.eval_examples=4", "trainer.eval_pass_k=0", "trainer.prompts_per_step=2",
         "algo.group_size=2"]
# Readings of the clock or the machine differ between two runs of the same code.
TIMES = ("perf/", "system/")


def run(overrides: list[str], folder: Path) -> dict[str, list[float]]:
    """Run ``nanovppo.train`` into ``folder``; every non-time metric as key -> values by step."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "nanovppo.train", f"paths.outputs={folder}", *overrides]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"nanovppo.train exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    c = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    [r] = c.search_runs([c.get_experiment_by_name("nanovppo").experiment_id])
    out = {}
    for key in sorted(r.data.metrics):
        if key.startswith(TIMES) or key.endswith("seconds"):
            continue
        out[key] = [[m.step, m.value] for m in sorted(c.get_metric_history(r.info.run_id, key),
                                                       key=lambda m: m.step)]
    return out


def compare(a: dict, b: dict) -> list[str]:
    """The keys whose values differ at some step, or that only one file has."""
    diffs = [f"only in the first: {k}" for k in sorted(set(a) - set(b))]
    diffs += [f"only in the second: {k}" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k]:
            first = next((x, y) for x, y in zip(a[k] + [None], b[k] + [None]) if x != y)
            diffs.append(f"{k}: first difference {first[0]} vs {first[1]}")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="where to write the metrics (JSON)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    p.add_argument("--smoke", action="store_true", help="the tiny random model, a few seconds")
    p.add_argument("extra", nargs="*", help="more nanovppo.train keys (after --)")
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.loads(f.read_text()) for f in args.compare)
        diffs = compare(a, b)
        n = sum(len(v) for v in a.values())
        print(f"{len(a)} metrics, {n} values in {args.compare[0]}; "
              f"{'identical' if not diffs else f'{len(diffs)} differ'}")
        for d in diffs:
            print("  " + d)
        return 1 if diffs else 0
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run((SMOKE if args.smoke else SHORT) + args.extra, Path(tmp))
    n = sum(len(v) for v in metrics.values())
    print(f"{len(metrics)} metrics, {n} values")
    if args.out:
        args.out.write_text(json.dumps(metrics, indent=1))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
