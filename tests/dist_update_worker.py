"""One training update on fixed samples, alone or as one rank of a torchrun job.

    python tests/dist_update_worker.py OUT STRATEGY [overrides...]
    torchrun --nproc-per-node 2 tests/dist_update_worker.py OUT STRATEGY [overrides...]

Rank r takes the groups g with g % world == r (whole groups, unevenly sized shares), runs
``nanovppo.train.update`` and rank 0 saves the loss and the updated parameters to OUT, so
that tests/test_distributed.py can compare a 2-rank update with a 1-process one.
"""

import random
from dataclasses import replace
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanovppo import distributed as dd  # noqa: E402
from nanovppo import lora  # noqa: E402
from nanovppo.fast import logprob_module  # noqa: E402
from nanovppo.logprobs import GroupLogprobs, checkpoint_layers  # noqa: E402
from nanovppo.models import load_model  # noqa: E402
from nanovppo.rollout import Sample  # noqa: E402
from nanovppo.update import update  # noqa: E402
from nanovppo.kernels import KERNELS  # noqa: E402
from tests.conftest import TINY, compose_cfg  # noqa: E402

# Group g has GROUP_SIZES[g] completions; with two ranks rank 0 gets groups 0, 2, 4 and
# rank 1 gets 1, 3: different numbers of micro-batches, which the trainer pads.
GROUP_SIZES = [2, 2, 2, 1, 3]


def fixed_samples(vocab: int) -> list[Sample]:
    rng = random.Random(0)
    out = []
    for g, n in enumerate(GROUP_SIZES):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 7))]
        for j in range(n):
            completion = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))]
            out.append(Sample(prompt, completion, rng.uniform(-1, 1), 0.0,
                              truncated=(g == 4 and j == 0), group=g))
    return out


def main(out: str, strategy: str, overrides: list[str]) -> None:
    cfg = compose_cfg([*TINY, "hardware.compute_dtype=float32", f"hardware.strategy={strategy}",
                       *overrides])
    d = dd.init("cpu")
    torch.manual_seed(0)
    policy, tok = load_model(cfg.model, dtype="float32")
    algo = instantiate(cfg.algo)
    ref = None
    if cfg.model.lora:  # the adapters train; the reference is the policy with them off
        policy = lora.add_adapters(policy, cfg.model.lora)
        if algo.kl_coef > 0:
            ref = lora.AdapterOffLogprobs(GroupLogprobs(policy))
    elif algo.kl_coef > 0:
        ref_model, _ = load_model(cfg.model, dtype="float32")
        ref = GroupLogprobs(ref_model.requires_grad_(False))
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    if cfg.hardware.gradient_checkpointing:
        checkpoint_layers(policy, dd.decoder_layers(policy))
    # The trainer's module (nanovppo/parts.py): under DDP, and in one process, the one-pass
    # forward over prompt and completion tokens (packed); under FSDP2 the two-pass one.
    module = logprob_module(policy, bool(cfg.trainer.fast), strategy if d.on else None,
                            bool(cfg.trainer.fused_kernels))
    module_name = type(module).__name__  # before FSDP2 renames the class it shards
    model = dd.wrap(module, strategy, d, "cpu")
    # Plain SGD: its step is proportional to the gradient, so a gradient off by a factor
    # (e.g. a wrong world-size scaling) shows; Adam's first step would hide it.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    # The trainer numbers a rank's groups 0, 1, ... (its share of the step's prompts).
    samples = [replace(s, group=s.group // d.world)
               for s in fixed_samples(policy.config.vocab_size) if s.group % d.world == d.rank]
    metrics = update(model, ref, algo, samples, cfg, optimizer, tok.pad_token_id, step=1, d=d)
    state, _ = dd.full_state_dicts(model, optimizer, d)
    if state is None:  # one process: the model's own tensors
        state = model.state_dict()
    if d.main:
        torch.save({"module": module_name, "metrics": metrics,
                    "kernels_fell_back": [n for n, k in KERNELS.items() if k.failed],
                    "params": {k.removeprefix("model."): v.clone() for k, v in state.items()},
                    "initial": initial}, out)
    dd.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
