#!/usr/bin/env bash
# Train on several nodes: run this once on every node, with the same settings.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 RUN_DIR=outputs/runs/x \
#       launch/multinode.sh hardware=multinode model=qwen2.5-3b-instruct
#   (and NODE_RANK=1 on the second node)
# NODE_RANK 0 hosts the rendezvous at MASTER_ADDR:MASTER_PORT; NPROC processes per node.
# RUN_DIR must name the same folder on every node (a shared file system): rank 0 writes the
# checkpoints there and every rank reads them on resume.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
: "${RUN_DIR:?set RUN_DIR, the same on every node}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m nanovppo.train "hydra.run.dir=$RUN_DIR" "$@"
