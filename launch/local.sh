#!/usr/bin/env bash
# Train on this machine, in the project's venv, with any Hydra overrides:
#   launch/local.sh                                  # the CPU default
#   launch/local.sh seed=1 trainer.max_steps=20
#   launch/local.sh -m seed=0,1 algo.lr=1e-5,3e-5    # a sweep, one MLflow run per job
set -euo pipefail
cd "$(dirname "$0")/.."
make setup >/dev/null
exec .venv/bin/python -m nanovppo.train "$@"
