#!/usr/bin/env bash
# A sweep on SLURM through Hydra's submitit launcher: one SLURM job per combination, each
# with one process per GPU (torch.distributed is set up from SLURM's environment).
#   pip install -e .[slurm]          # hydra-submitit-launcher, once
#   PARTITION=gpu GPUS=4 launch/slurm.sh algo=grpo,vppo seed=0,1
# Extra overrides go to every job; the MLflow store is under paths.outputs, which must be on
# a file system the nodes share. `squeue --me` shows the jobs; `mlflow ui` the runs.
set -euo pipefail
PARTITION=${PARTITION:?set PARTITION to a SLURM partition}
GPUS=${GPUS:-1}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m nanovppo.train -m hardware=slurm \
    "hydra.launcher.partition=$PARTITION" "hydra.launcher.gpus_per_node=$GPUS" \
    "hydra.launcher.tasks_per_node=$GPUS" "hydra.launcher.timeout_min=${TIMEOUT_MIN:-1440}" \
    "$@"
