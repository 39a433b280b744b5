"""Checking that each weight push reached the rollout engine.

A push that silently does nothing leaves the engine sampling from an old policy while the
trainer goes on as if it were on-policy: nothing crashes and the run is wasted. So after
every push (``SyncCheck.after_push``) the engine and the trainer score the same probe
sequence (the first held-out prompt, a few hundred tokens at most) at temperature 1, and
compare:

- ``sync/gap_mean``, ``sync/gap_max``: mean and largest |log pi_engine - log pi_trainer|
  over the probe's tokens. This is the engines' numerics (bf16 kernels against the
  trainer's autocast) when the weights arrived, and grows with the drift when they did
  not; above ``rollout.sync_check.max_gap`` the run stops.
- ``sync/engine_moved``, ``sync/trainer_moved``: the largest change of each side's probe
  log-probs since the last push. An engine whose log-probs did not change at all, bit for
  bit, while the trainer's did was not updated, whatever the size of the step: the run
  stops at that step.

Engines that sample from the policy's own module (the hf engine when its dtype is the
policy's) receive nothing and are not checked.
"""

from __future__ import annotations

import logging

import torch

from nanovppo import distributed as dd
from nanovppo.errors import NanovppoError

log = logging.getLogger("nanovppo")

PROBE_TOKENS = 256  # at most this many tokens of the probe are scored


class WeightSyncError(NanovppoError):
    """The rollout engine does not hold the trainer's weights after a push."""


class SyncCheck:
    """Scores the probe on both sides after each push; raises ``WeightSyncError`` on a
    push that did not arrive (see the module doc)."""

    def __init__(self, probe: list[int], max_gap: float, trainer_logprobs,
                 d: dd.Dist = dd.Dist()):
        """``trainer_logprobs(ids)``: the trainer's log-probs [T - 1] of ``ids[1:]`` at
        temperature 1, computed as an update computes them (``nanovppo.train`` passes its
        log-prob module, under DDP or FSDP2 as it trains)."""
        self.probe = [int(t) for t in probe[:PROBE_TOKENS]]
        self.max_gap = float(max_gap)
        self.trainer_logprobs = trainer_logprobs
        self.d = d
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (engine, trainer)

    def measure(self, engine) -> dict:
        """Score the probe on both sides; the gap and how far each side moved."""
        mine = self.trainer_logprobs(self.probe).float().cpu()               # [T - 1]
        theirs = torch.tensor(engine.score(self.probe), dtype=torch.float32)  # [T - 1]
        if theirs.shape != mine.shape:
            raise WeightSyncError(f"the {engine.name} engine scored {theirs.numel()} probe "
                                  f"tokens, the trainer {mine.numel()}")
        gap = (theirs - mine).abs()
        out = {"sync/gap_mean": gap.mean().item(), "sync/gap_max": gap.max().item()}
        if self.last is not None:
            out["sync/engine_moved"] = (theirs - self.last[0]).abs().max().item()
            out["sync/trainer_moved"] = (mine - self.last[1]).abs().max().item()
        self.last = (theirs, mine)
        return out

    def after_push(self, engine, step: int) -> dict:
        """Measure, and stop the run (on every rank alike) if the push did not arrive."""
        m = self.measure(engine)
        stale = m.get("sync/trainer_moved", 0.0) > 0 and m.get("sync/engine_moved") == 0.0
        far = m["sync/gap_mean"] > self.max_gap
        bad = dd.all_reduce_max([float(stale), float(far)], self.d)
        if bad[0] > 0 or bad[1] > 0:
            why = (f"its log-probs of the probe did not change while the trainer's moved by "
                   f"up to {m.get('sync/trainer_moved', 0.0):.3g}" if bad[0] > 0 else
                   f"its log-probs of the probe differ from the trainer's by {m['sync/gap_mean']:.3g}"
                   f" on average (rollout.sync_check.max_gap={self.max_gap:g})")
            raise WeightSyncError(
                f"step {step}: the {engine.name} engine does not hold the trainer's weights "
                f"after the push: {why}. Check that the engine's update_weights loads every "
                "tensor it is sent (names, dtype, LoRA merged), and that it is awake when it "
                "receives them")
        return m
