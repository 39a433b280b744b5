#!/usr/bin/env bash
# Train with N processes on this node (torchrun), one run folder and one MLflow run for all:
#   launch/torchrun.sh 2 hardware=cpu                         # two CPU processes, gloo, DDP
#   launch/torchrun.sh 8 hardware=node hardware.strategy=fsdp2 model=qwen2.5-1.5b-instruct
# Each process samples and scores its share of the step's prompts; rank 0 logs and saves.
# NPROC must divide trainer.prompts_per_step. RUN_DIR=... picks the run folder (default:
# outputs/runs/DATE/TIME); resume=RUN_DIR continues it with the same number of processes.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC [hydra overrides...]}
shift
PYTHON=${PYTHON:-python}
RUN_DIR=${RUN_DIR:-outputs/runs/$(date +%Y-%m-%d/%H-%M-%S)}
# Keep each process to its share of the cores (torchrun would otherwise pick 1 thread).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m nanovppo.train "hydra.run.dir=$RUN_DIR" "$@"
