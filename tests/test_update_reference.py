"""The trainer's update against a deliberately plain one written here.

The production path (``nanovppo.update.update``, ``trainer.fast=true``) runs the real tokens
of prompts and completions in one pass (each prompt once for its group), scores only real
completion tokens in chunks through one autograd function, keeps the head's cast for a
minibatch, gives the tied embedding a sparse gradient, reuses the current log-probs as the
old ones when it can and accumulates micro-batches. The reference below does none of that: every sample is forwarded on its own
through the whole model, the full-vocabulary ``log_softmax`` is taken at every position,
and plain autograd differentiates it. Both run two PPO epochs of two minibatches with a KL
term (and, for grpo and cispo, the engine/trainer mismatch correction) from the same
weights with plain SGD, so the parameter updates are linear in the gradients they sum.

Tolerances. In fp32 the two paths differ only in the order of floating-point sums
(batched vs single matmuls, chunked vs whole softmax). Measured: after one step the
largest difference of an update is 2e-7 of the largest update; after the 4 steps of
2 x 2, where each step's ratios and clipping depend on the last, at most 2e-5. The test
allows 1e-4 of the largest update, and 1e-5 relative on the reported loss, KL and clip
fraction. In bf16 (autocast, the CPU default) each matmul rounds to 8 bits of mantissa
(a relative 2^-8 ~ 4e-3) at different places on the two paths, so one step is compared:
measured at most 4e-3 of the largest update, allowed 1e-2 (and 1e-3 on the metrics). A
missing, doubled or misweighted term would be off by ~100%. Over 4 bf16 steps the paths
drift apart as the rounding compounds through the ratios (5-6% measured), which is why
bf16 is not compared there.
"""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from nanovppo.algos.losses import rollout_correction
from nanovppo.algos.pg import LossBatch
from nanovppo.config import build
from nanovppo.logprobs import PlainLogprobs
from nanovppo.packed import PackedLogprobs
from nanovppo.rollout import Sample
from nanovppo.batching import split_groups
from nanovppo.fast import logprob_module
from nanovppo.kernels import KERNELS
from nanovppo.models import autocast_ctx
from nanovppo.update import resolve_correction, update
from tests.conftest import TINY, compose_cfg

GROUPS, PER_GROUP = 4, 2
LR = 5.0  # the tiny model's gradients are ~0.01-1: steps that move the ratios, not wildly


def scripted_samples(vocab: int, per_token: bool) -> list[Sample]:
    """4 groups of 2: prompts of 3-6 tokens, completions of 2-7, fixed advantages (per
    token for VinePPO), engine log-probs near the true ones, one truncated completion."""
    rng = random.Random(0)
    out = []
    for g in range(GROUPS):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 6))]
        for j in range(PER_GROUP):
            completion = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 7))]
            adv = ([rng.uniform(-1, 1) for _ in completion] if per_token
                   else rng.choice([-1.0, -0.5, 0.5, 1.0]))
            if g == 1:  # a group whose samples all scored the same: no signal
                adv = [0.0] * len(completion) if per_token else 0.0
            # the tiny random model gives every token ~log(1 / 49152) = -10.8
            engine = [rng.uniform(-11.6, -10.0) for _ in completion]
            out.append(Sample(prompt, completion, adv, rng.uniform(0, 1), truncated=(g == 3 and j == 1),
                              group=g, engine_logprobs=engine))
    return out


def plain_logprobs(model, s: Sample, temperature: float) -> torch.Tensor:
    """[C] log-probs of one sample's completion: the whole sequence through the model, a
    full-vocabulary log-softmax at every position."""
    ids = torch.tensor([s.prompt_ids + s.completion_ids])
    logits = model(input_ids=ids).logits[0].float() / temperature            # [P + C, V]
    logp = F.log_softmax(logits, dim=-1)[len(s.prompt_ids) - 1:-1]           # [C, V]
    return logp.gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1)


def plain_update(model, ref, algo, samples, cfg, step, correction, autocast):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    temperature = algo.loss_temperature(cfg.rollout.temperature)
    with torch.no_grad(), autocast():
        old = [plain_logprobs(model, s, temperature) for s in samples]
        refs = [plain_logprobs(ref, s, temperature) for s in samples]
    if algo.kl_in_reward:
        algo.fold_kl(samples, old, refs)
    rng = random.Random(cfg.seed * 1_000_003 + step)
    totals = {"loss": 0.0, "clip": 0.0, "kl": 0.0, "tokens": 0.0}
    for _ in range(algo.ppo_epochs):
        for rows in split_groups([s.group for s in samples], algo.num_minibatches, rng):
            minibatch = [samples[i] for i in rows]
            keep = [s for s in minibatch if not (algo.mask_truncated and s.truncated)]
            n_tokens = max(1.0, float(sum(len(s.completion_ids) for s in keep)))
            n_seqs = max(1.0, float(len(keep)))
            opt.zero_grad(set_to_none=True)
            for i in rows:
                s = samples[i]
                with autocast():
                    logp = plain_logprobs(model, s, temperature)[None]           # [1, C]
                C = logp.shape[1]
                mask = torch.full((1, C), 0.0 if algo.mask_truncated and s.truncated else 1.0)
                adv = torch.tensor([s.advantage if isinstance(s.advantage, list)
                                    else [s.advantage] * C], dtype=torch.float32)
                weight = torch.ones(1, C)
                if correction:
                    engine = torch.tensor([s.engine_logprobs])
                    weight, _ = rollout_correction(old[i][None], engine, mask, **correction)
                loss, stats = algo.loss(LossBatch(logp, old[i][None], refs[i][None], adv, mask,
                                                  weight, n_tokens, n_seqs,
                                                  cfg.rollout.max_new_tokens))
                loss.backward()
                totals["loss"] += loss.item()
                totals["clip"] += stats["clip_tokens"]
                totals["kl"] += stats["kl_tokens"]
                totals["tokens"] += mask.sum().item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.max_grad_norm)
            opt.step()
    updates = algo.ppo_epochs * algo.num_minibatches
    return {"train/loss": totals["loss"] / updates, "train/clip_frac": totals["clip"] / totals["tokens"],
            "train/kl": totals["kl"] / totals["tokens"]}


CASES = [  # algo, extra overrides, mismatch correction
    ("grpo", [], "tis"),
    # passes of 1 sequence: every group of 2 cut in two, its prompt run once per piece
    ("grpo-cut", ["trainer.micro_batch_size=1"], "tis"),
    ("dapo", [], "off"),
    ("dapo-no-kl", ["algo=dapo", "algo.kl_coef=0.0"], "off"),  # zero-advantage samples skipped
    ("gspo", ["algo.clip_low=0.01", "algo.clip_high=0.01"], "off"),
    ("cispo", [], "mis"),
    ("vppo", [], "off"),
    ("rft", [], "off"),
    ("reinforce_pp_baseline", [], "off"),
    ("reinforce_pp", [], "off"),
]


# Every algorithm in fp32 with 2 PPO epochs x 2 minibatches; the one-pass shortcut (old
# log-probs = the current ones, detached) and bf16 on three of them. The trainer's plain
# path (trainer.fast=false) on three algorithms, in both shapes.
RUNS = ([(*c, "float32", 2, True) for c in CASES]
        + [(*c, dt, 1, True) for c in CASES if c[0] in ("grpo", "vppo", "rft")
           for dt in ("float32", "bfloat16")]
        + [(*c, "float32", p, False) for c in CASES if c[0] in ("grpo", "vppo", "dapo-no-kl")
           for p in (1, 2)])


@pytest.mark.parametrize("name,extra,correction,dtype,passes,fast", RUNS,
                         ids=[f"{r[0]}-{r[3]}-{r[4]}x{r[4]}" + ("" if r[5] else "-plain") for r in RUNS])
def test_update_matches_a_plain_reference(tiny, name, extra, correction, dtype, passes, fast):
    cfg = compose_cfg([*TINY, f"algo={name.split('-')[0]}", f"algo.ppo_epochs={passes}",
                       f"trainer.fast={str(fast).lower()}",
                       f"algo.num_minibatches={passes}",
                       "algo.kl_coef=0.1", "trainer.logprob_chunk_tokens=1",
                       "rollout.temperature=0.7",
                       *([] if any(e.startswith("trainer.micro_batch_size=") for e in extra)
                         else ["trainer.micro_batch_size=2"]),
                       f"hardware.compute_dtype={dtype}", f"rollout.correction.mode={correction}",
                       "rollout.correction.level=" + ("sequence" if name == "cispo" else "token"),
                       "rollout.correction.low=0.8", "rollout.correction.high=1.25",
                       "trainer.fused_kernels=true", *extra])  # the default, off in TINY
    base, tok = tiny
    algo = build(cfg.algo)
    samples = scripted_samples(base.config.vocab_size, per_token=name == "vppo")
    fix = resolve_correction(cfg.rollout.correction, None)

    # the production path, as the trainer builds it in one process
    policy = copy.deepcopy(base).train()
    fused = bool(cfg.trainer.fused_kernels)
    ref = logprob_module(copy.deepcopy(base).eval().requires_grad_(False), fast, fused=fused)
    model = logprob_module(policy, fast, fused=fused)
    assert isinstance(model, PackedLogprobs if fast else PlainLogprobs)
    assert not fast or model.fused
    # the fast path's tied embedding has a sparse gradient; the plain one's is dense
    assert policy.get_input_embeddings().sparse == fast
    got = update(model, ref, algo, copy.deepcopy(samples), cfg,
                 torch.optim.SGD(model.parameters(), lr=LR), tok.pad_token_id, step=3,
                 correction=fix)
    assert not any(k.failed for k in KERNELS.values())  # the kernels ran compiled

    plain = copy.deepcopy(base).train()
    autocast = lambda: autocast_ctx(cfg)  # bf16 matmuls over fp32 weights, or nothing
    want = plain_update(plain, copy.deepcopy(base).eval(), build(cfg.algo), copy.deepcopy(samples),
                        cfg, 3, fix, autocast)

    tol, loss_tol = (1e-4, 1e-5) if dtype == "float32" else (1e-2, 1e-3)
    start = dict(base.named_parameters())
    largest, worst = 0.0, 0.0
    for (name_, p), (_, q) in zip(policy.named_parameters(), plain.named_parameters()):
        step_got, step_want = p.detach() - start[name_], q.detach() - start[name_]
        largest = max(largest, step_want.abs().max().item())
        worst = max(worst, (step_got - step_want).abs().max().item())
    assert largest > 1e-3, "the policy must move"
    assert worst <= tol * largest, (worst, largest)
    for key in ("train/loss", "train/kl", "train/clip_frac"):
        assert got[key] == pytest.approx(want[key], rel=loss_tol, abs=loss_tol), key
    if name in ("grpo", "dapo", "vppo") and passes > 1:
        assert want["train/clip_frac"] > 0, "the later minibatches must clip some tokens"
    if passes > 1:  # the first minibatch starts at the reference: KL 0
        assert (want["train/kl"] > 0) is algo.kl_in_loss  # REINFORCE++: the KL is in the reward
    if correction != "off":
        assert got["train/mismatch_corrected_frac"] > 0
    # without a KL term the fast path does not forward the group with zero advantages (1 of
    # 4) at all (REINFORCE++'s folded KL gives it advantages; RFT imitates every sample);
    # the plain path forwards every sample
    skips = (fast and not algo.kl_in_loss and not getattr(algo, "kl_in_reward", False)
             and name != "rft")
    assert got["train/skipped_samples_frac"] == (0.25 if skips else 0.0)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_entropy_is_taken_over_the_tokens_the_loss_trains(tiny, fast):
    """DAPO without KL, one pass: group 1 has zero advantages (no gradient; the fast path
    does not forward it) and one completion of group 3 is truncated (DAPO masks it). The
    reported entropy is the mean over the other 5 completions' tokens of the entropy of the
    policy at the loss temperature, computed here from the whole model's logits, on both
    paths alike."""
    cfg = compose_cfg([*TINY, "algo=dapo", "algo.kl_coef=0.0", "trainer.micro_batch_size=2",
                       f"trainer.fast={str(fast).lower()}", "rollout.temperature=0.7",
                       "hardware.compute_dtype=float32", "rollout.correction.mode=off"])
    base, tok = tiny
    algo = build(cfg.algo)
    assert algo.mask_truncated
    samples = scripted_samples(base.config.vocab_size, per_token=False)
    with torch.no_grad():
        total, count = 0.0, 0
        for s in samples:
            if s.group == 1 or s.truncated:
                continue
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = base(input_ids=ids).logits[0].float() / 0.7
            logp = F.log_softmax(logits, dim=-1)[len(s.prompt_ids) - 1:-1]     # [C, V]
            total += -(logp.exp() * logp).sum().item()
            count += len(s.completion_ids)
    policy = copy.deepcopy(base).train()
    model = logprob_module(policy, fast)
    got = update(model, None, algo, samples, cfg, torch.optim.SGD(model.parameters(), lr=0.0),
                 tok.pad_token_id, step=1)
    assert count == sum(len(s.completion_ids) for s in samples
                        if s.group != 1 and not s.truncated)
    assert got["train/entropy"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rft_measures_the_mismatch_only_where_its_log_probs_match_the_engines(tiny,
                                                                              temperature):
    """RFT's loss takes log-probs at temperature 1; the engine's are at the sampling
    temperature. At 1 both sides are the same distribution and the mismatch is logged; at
    0.7 comparing them would measure the temperature, so nothing is logged."""
    cfg = compose_cfg([*TINY, "algo=rft", f"rollout.temperature={temperature}",
                       "hardware.compute_dtype=float32", "rollout.correction.mode=off"])
    base, tok = tiny
    model = logprob_module(copy.deepcopy(base).train(), True)
    got = update(model, None, build(cfg.algo), scripted_samples(base.config.vocab_size, False),
                 cfg, torch.optim.SGD(model.parameters(), lr=0.0), tok.pad_token_id, step=1)
    assert ("train/mismatch_k3" in got) is (temperature == 1.0)
