"""torch.distributed for the trainer: process group, wrapping, reductions, state dicts.

Under torchrun (``WORLD_SIZE`` > 1) every rank samples and scores its own share of the
step's prompts (whole groups, so group statistics stay exact), and the ranks train one
model together: ``strategy=ddp`` (DistributedDataParallel, a full replica per rank) or
``strategy=fsdp2`` (``torch.distributed.fsdp.fully_shard`` on each decoder layer and the
root). Outside torchrun everything here is a no-op, and one process trains alone.

The loss of each micro-batch is normalised by token and sequence counts summed over all
ranks, then multiplied by the world size, so that the gradient the ranks average is the
gradient of the whole batch: two ranks on half a batch each take the same step as one
rank on all of it (tested in tests/test_distributed.py).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovppo.errors import ConfigError


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is an FSDP2-sharded tensor (a DTensor: each process holds a shard)."""
    return hasattr(t, "to_local")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's own shard of a (possibly FSDP2-sharded) tensor."""
    return t.to_local() if is_sharded(t) else t

STRATEGIES = ("ddp", "fsdp2")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init(device: str, timeout_s: int = 1800) -> Dist:
    """Join the process group that torchrun (or a SLURM job of several tasks started by
    Hydra's submitit launcher) describes in the environment, if any."""
    if "WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm" \
            and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, MASTER_ADDR, ...
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(cfg_device: str, d: Dist) -> str:
    """``cuda`` means this rank's GPU under torchrun (cuda:LOCAL_RANK)."""
    if cfg_device == "cuda":
        return f"cuda:{d.local_rank}"
    return cfg_device


def wrap(model: torch.nn.Module, strategy: str, d: Dist, device: str) -> torch.nn.Module:
    """The model to train: itself (one process), DDP-wrapped, or sharded with FSDP2.

    With FSDP2 the module keeps its class (parameters become DTensors), so the rest of
    the trainer still calls it as the transformers model it is.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"hardware.strategy={strategy!r}; use one of {STRATEGIES}")
    if not d.on:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a transformers causal LM (or of the one a
    ``GroupLogprobs`` holds)."""
    layers = None
    for m in model.modules():
        if isinstance(getattr(m, "layers", None), torch.nn.ModuleList):
            layers = m.layers
            break
    if layers is None:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__} to "
                          "shard with FSDP2; use hardware.strategy=ddp")
    return list(layers)


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Element-wise sum over ranks (the values themselves with one process)."""
    if not d.on:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], d: Dist) -> list[float]:
    if not d.on:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def any_rank(flag: bool, d: Dist) -> bool:
    """Whether ``flag`` holds on any rank: every rank gets the same answer (a stop asked
    for on one rank, work that one rank has), so they all take the same branch."""
    return all_reduce_max([float(flag)], d)[0] > 0


def reduce_metrics(metrics: dict, d: Dist) -> dict:
    """One value per metric for the whole job: the mean over ranks; timings take the
    slowest rank and throughput the sum. Every rank must pass the same keys."""
    if not d.on:
        return metrics
    keys = sorted(metrics)
    total = all_reduce_sum([float(metrics[k]) for k in keys], d)
    slowest = all_reduce_max([float(metrics[k]) for k in keys], d)
    out = {}
    for k, s, m in zip(keys, total, slowest):
        if k == "perf/gen_tokens_per_s":
            out[k] = s
        elif k.startswith("perf/"):
            out[k] = m
        else:
            out[k] = s / d.world
    return out


def global_sums(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks of the process group, if there is one (for the
    batch statistics that algorithms compute outside the trainer's ``Dist``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    return all_reduce_sum(values, Dist(rank=dist.get_rank(), world=dist.get_world_size()))


def broadcast_object(obj, d: Dist):
    """Rank 0's ``obj`` on every rank."""
    if not d.on:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, d: Dist) -> list | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    if not d.on:
        return [obj]
    out = [None] * d.world if d.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(d: Dist) -> None:
    if d.on:
        dist.barrier()


def full_state_dicts(model, optimizer, d: Dist) -> tuple[dict | None, dict]:
    """Whole (unsharded) model and optimizer state dicts, on CPU, for a checkpoint; with
    one process the model's state is None (the model saves its own tensors).

    A collective under FSDP2: every rank calls it; rank 0 writes the result.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict)

    if not d.on:
        return None, optimizer.state_dict()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizer, options=opts))


def load_optimizer_state(model, optimizer, state: dict, d: Dist) -> None:
    """Load a whole optimizer state dict written by ``full_state_dicts``."""
    if not d.on:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
