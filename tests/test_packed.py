"""The one-pass forward (``nanovppo/packed.py``) gives the log-probs, entropies and gradients
of a plain forward of each sequence on its own, for the decoders it takes."""

import copy

import pytest
import torch

from nanovppo.logprobs import GroupLogprobs, completion_logprobs, pad_batch, pad_groups
from nanovppo.packed import PackedLogprobs, packed_logprobs, supports
from tests.conftest import kept_bytes
from tests.test_logprobs import COMPLETIONS, PROMPTS, naive_logprobs

PAIRS = [(p, c) for p, group in zip(PROMPTS, COMPLETIONS) for c in group]


def grads_of(model, fn, weights):
    model.zero_grad(set_to_none=True)
    logp = fn()
    (logp * weights[:, :logp.shape[1]]).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logprobs_equal_a_forward_of_each_sequence(tiny, attention):
    """Each completion sees its whole prompt and its own earlier tokens, not its group's
    other completions (the second completion of the first prompt is one token long: only
    the prompt's last state scores it)."""
    model, tok = tiny
    model = copy.deepcopy(model).eval()
    model.set_attn_implementation(attention)
    with torch.no_grad():
        expected = [naive_logprobs(model, p, c, 0.7) for p, c in PAIRS]
        logp, ent = packed_logprobs(model, pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id),
                                    0.7, chunk_tokens=3, with_entropy=True)
    assert logp.shape == (5, 4)
    for r, ((p, c), (want, want_ent)) in enumerate(zip(PAIRS, expected)):
        torch.testing.assert_close(logp[r, :len(c)], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[r, :len(c)], want_ent, atol=1e-4, rtol=1e-4)
        assert torch.all(logp[r, len(c):] == 0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_rows_change_nothing(tiny, monkeypatch, attention):
    """The packed rows are padded to a multiple of ``ROW_MULTIPLE``: the layers run on
    that many rows, and the log-probs and every gradient are those of the unpadded pass.
    PROMPTS and COMPLETIONS pack 5 + 2 prompt tokens and 2 + 0 + 3 + 1 + 2 completion
    inputs (each completion but its last token) = 15 rows: 16 with a multiple of 8."""
    import nanovppo.packed as packed

    model, tok = tiny
    model = copy.deepcopy(model).train()
    model.set_attn_implementation(attention)
    rows = []
    model.model.embed_tokens.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    batch = pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id)
    results = {}
    for multiple in (1, 8):
        monkeypatch.setattr(packed, "ROW_MULTIPLE", multiple)
        results[multiple] = grads_of(model, lambda: packed_logprobs(model, batch, 0.7), weights)
    assert rows == [15, 16]
    (want_logp, want), (got_logp, got) = results[1], results[8]
    torch.testing.assert_close(got_logp, want_logp, atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys() and len(got) > 5
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_recomputed_above_the_size_keeps_less_same_gradients(tiny, monkeypatch,
                                                                       dtype):
    """Above ``RECOMPUTED_PROBS_BYTES`` the eager attention keeps q, k, v and the mask
    instead of its float32 probabilities and computes them again in the backward: the
    log-probs and every gradient are the kept path's (the same ops; in bf16 under
    autocast too), and the forward keeps fewer bytes. The probabilities of a layer here:
    the prompts' [2 prompts, 2 heads, 5, 5] and the completions' [5, 2, 3, 5 + 3] in
    float32, 1,360 bytes, against q, k, v (bf16 or float32) and the bool masks."""
    import nanovppo.packed as packed

    model, tok = tiny
    model = copy.deepcopy(model).to(dtype).train()
    model.set_attn_implementation("eager")
    assert model.config.num_attention_heads == 2
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    batch = pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id)
    results = {}
    for limit in (1 << 30, 0):  # kept, recomputed
        monkeypatch.setattr(packed, "RECOMPUTED_PROBS_BYTES", limit)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            size, _ = kept_bytes(model, lambda: packed_logprobs(model, batch, 0.7))
            results[limit] = size, *grads_of(
                model, lambda: packed_logprobs(model, batch, 0.7), weights)
    (kept_size, want_logp, want), (recomputed_size, got_logp, got) = results[1 << 30], results[0]
    assert recomputed_size < kept_size
    assert torch.equal(got_logp, want_logp)
    assert got.keys() == want.keys() and len(got) > 5
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_completions_of_one_token_only(tiny):
    """With every completion one token long no completion token is an input: each is
    scored from its prompt's last state alone."""
    model, tok = tiny
    prompts, completions = [[5, 6, 7], [9]], [[[20], [21]], [[22]]]
    with torch.no_grad():
        logp = packed_logprobs(model, pad_groups(prompts, completions, tok.pad_token_id))
    pairs = [(p, c) for p, group in zip(prompts, completions) for c in group]
    assert logp.shape == (3, 1)
    for r, (p, c) in enumerate(pairs):
        torch.testing.assert_close(logp[r], naive_logprobs(model, p, c)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointed,attention", [(False, "sdpa"), (True, "sdpa"),
                                                    (False, "eager"), (True, "eager")])
def test_packed_gradients_equal_plain_gradients(tiny, checkpointed, attention):
    """The same gradient for every parameter as the padded forward of each sequence with
    its own prompt (sdpa attention), with activation checkpointing too, the packed forward
    with sdpa or with its eager attention (``_Attention``); each weight's gradient
    arrives in one part (the two-pass forward accumulates two for every weight)."""
    from nanovppo.distributed import decoder_layers
    from nanovppo.logprobs import checkpoint_layers

    model, tok = tiny
    model = copy.deepcopy(model).train()
    plain = copy.deepcopy(model)
    model.set_attn_implementation(attention)
    if checkpointed:
        checkpoint_layers(model, decoder_layers(model))
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    probe = model.model.layers[1].self_attn.k_proj.weight
    accumulations = []
    probe.register_post_accumulate_grad_hook(lambda p: accumulations.append(1))
    want_logp, want = grads_of(plain, lambda: completion_logprobs(
        plain, pad_batch([p for p, _ in PAIRS], [c for _, c in PAIRS], tok.pad_token_id),
        0.7), weights)
    got_logp, got = grads_of(model, lambda: packed_logprobs(
        model, pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id), 0.7), weights)
    assert len(accumulations) == 1
    torch.testing.assert_close(got_logp, want_logp, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys() and len(got) > 5
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def test_sparse_tied_embedding_gradients_in_one_pass(tiny):
    """The sparse tied-embedding gradient (one process) adds up to the dense one over two
    micro-batches, ``.grad`` dense at the end."""
    from nanovppo.head import sparse_tied_embedding_grads

    model, tok = tiny
    dense, sparse = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    assert sparse_tied_embedding_grads(sparse)
    batches = [pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id),
               pad_groups([[40, 41, 42]], [[[43], [44, 45]]], tok.pad_token_id)]

    def grads(m):
        for b in batches:
            logp = packed_logprobs(m, b, 0.7)
            (logp * torch.arange(logp.numel()).view_as(logp)).sum().backward()
        return {n: p.grad for n, p in m.named_parameters()}

    want, got = grads(dense), grads(sparse)
    assert sparse.get_input_embeddings().weight.grad.layout == torch.strided
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def _tiny(config_cls, model_cls, **extra):
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=8, **extra)
    torch.manual_seed(0)
    return model_cls(config).eval()


def test_qwen_decoders_packed_like_a_plain_forward():
    """Qwen2 (biased q/k/v projections) and Qwen3 (each head's queries and keys
    normalised) run through the same layer code."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    prompts, completions = [[5, 6, 7, 8], [9, 10]], [[[20, 21, 22], [23, 24]], [[30]]]
    for model in (_tiny(Qwen2Config, Qwen2ForCausalLM), _tiny(Qwen3Config, Qwen3ForCausalLM)):
        assert supports(model)
        with torch.no_grad():
            logp = packed_logprobs(model, pad_groups(prompts, completions, 0))
        pairs = [(p, c) for p, group in zip(prompts, completions) for c in group]
        for r, (p, c) in enumerate(pairs):
            torch.testing.assert_close(logp[r, :len(c)], naive_logprobs(model, p, c)[0],
                                       atol=1e-5, rtol=1e-5)


def test_other_decoders_take_the_two_pass_forward(tiny):
    """A decoder not built like Llama's (GPT-2), or one with sliding-window layers, is not
    packed: the fast path's module in one process is then ``GroupLogprobs``."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from nanovppo.fast import logprob_module

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    windowed = _tiny(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=4,
                     max_window_layers=0)
    assert not supports(gpt2) and not supports(windowed)
    model, _ = tiny
    assert supports(model)
    model = copy.deepcopy(model)
    assert isinstance(logprob_module(model, fast=True), PackedLogprobs)
    assert isinstance(logprob_module(model, fast=True, strategy="fsdp2"), GroupLogprobs)
    assert isinstance(logprob_module(windowed, fast=True), GroupLogprobs)


def test_ddp_takes_the_one_pass_forward_with_a_dense_embedding_gradient(tiny):
    """DDP calls the module's forward and reduces the gradients its parameters receive, so
    the packed forward serves it too; DDP reduces dense gradients, so the tied embedding's
    stays dense there, where one process makes it sparse. (tests/test_distributed.py runs
    it under torchrun against one process.)"""
    from nanovppo.fast import logprob_module

    model, _ = tiny
    one, ddp = copy.deepcopy(model), copy.deepcopy(model)
    assert isinstance(logprob_module(one, fast=True), PackedLogprobs)
    assert isinstance(logprob_module(ddp, fast=True, strategy="ddp"), PackedLogprobs)
    assert one.get_input_embeddings().sparse and not ddp.get_input_embeddings().sparse


@pytest.mark.parametrize("case", ["llama", "checkpointed", "qwen2", "frozen embedding",
                                  "fp32 weights, bf16 autocast"])
def test_weight_gradients_added_in_place(tiny, case):
    """In one process the projections' backward adds each weight's gradient into ``.grad``
    itself (``grads_in_place``): over two micro-batches every parameter ends with the
    gradient autograd accumulates, in the same ``.grad`` tensor as after the first, and
    autograd never accumulated a projection's weight (its post-accumulate hook never ran).
    Qwen2's biased projections get their bias gradients in place too, and its untied
    output head its weight's gradient after the first micro-batch. With a frozen
    embedding and first norm, the first layer's q/k/v inputs need no gradient (autograd
    would not call their backward): those run as plain modules (autograd accumulates layer
    0's k_proj), the later ones in place. Under a bf16 autocast over fp32 weights (the
    matmul's dtype is not the weight's) the plain modules run."""
    from nanovppo.distributed import decoder_layers
    from nanovppo.logprobs import checkpoint_layers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = (_tiny(Qwen2Config, Qwen2ForCausalLM) if case == "qwen2" else tiny[0])
    plain, fused = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    if case == "checkpointed":
        for m in (plain, fused):
            checkpoint_layers(m, decoder_layers(m))
    if case == "frozen embedding":  # tied to the head: the head freezes with it
        for m in (plain, fused):
            m.get_input_embeddings().weight.requires_grad_(False)
            m.model.layers[0].input_layernorm.weight.requires_grad_(False)
    batches = [pad_groups(PROMPTS, COMPLETIONS, 0),
               pad_groups([[40, 41, 42]], [[[43], [44, 45]]], 0)]
    autocast = case.startswith("fp32")
    probe_name = "model.layers.1.self_attn.k_proj.weight"
    first_name = "model.layers.0.self_attn.k_proj.weight"

    def run(m, in_place):
        probe = dict(m.named_parameters())[probe_name]
        hooked, grads_seen, first = [], [], []
        probe.register_post_accumulate_grad_hook(lambda p: hooked.append(1))
        dict(m.named_parameters())[first_name].register_post_accumulate_grad_hook(
            lambda p: first.append(1))
        head = []  # the gradients autograd passed to the output head's weight
        if m.get_output_embeddings().weight.requires_grad:
            m.get_output_embeddings().weight.register_hook(lambda g: head.append(g is not None))
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logp = packed_logprobs(m, b, 0.7, grads_in_place=in_place)
            (logp * torch.arange(logp.numel()).view_as(logp)).sum().backward()
            grads_seen.append(probe.grad)
        return {n: p.grad for n, p in m.named_parameters()}, hooked, grads_seen, first, head

    want, want_hooked, _, _, want_head = run(plain, False)
    got, got_hooked, seen, first, head = run(fused, True)
    if case == "qwen2":  # an untied head: after the first micro-batch its gradient went
        assert want_head == [True, True] and head == [True, False]  # straight into .grad
    assert len(first) == (2 if case == "frozen embedding" or autocast else 0)
    assert len(want_hooked) == 2  # autograd accumulated the probe weight once a micro-batch
    if autocast:  # the plain modules ran: autograd accumulated as before
        assert len(got_hooked) == 2
    else:
        assert got_hooked == [] and seen[0] is seen[1]
    assert got.keys() == want.keys()
    assert [n for n, g in got.items() if g is None] == [n for n, g in want.items() if g is None]
    assert sum(g is not None for g in got.values()) > 10
    if case == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def test_norms_the_mlp_and_attention_keep_less_for_the_backward(tiny):
    """The RMSNorm keeps its input and each row's scale, the gated MLP (gradients in
    place) its input, gate(x) and up(x), the eager attention's softmax its float32
    probabilities only, with the gradients of the ops they replace. For N rows of H = 64
    (intermediate I = 128 in the tiny Llama) in bf16:

    - norm: x (2NH bytes) + the scale (4N) against the module's float32 x (4NH), its
      normalised x in bf16 (2NH) and its scale (4N): 2NH + 4N against 6NH + 4N;
    - MLP: x (2NH) + gate(x), up(x) (2NI each) against those + silu(gate(x)) and the
      product (2NI each): 2N(H + 2I) against 2N(H + 4I);
    - the eager attention (``_Attention``), 2 query heads a kv head, S = 2 x 3 x 10 x 6
      scores: q, k, v, the mask and the float32 probabilities (4S bytes) against those +
      the probabilities' bf16 copy (2S).

    Gradients in bf16: the norm's are the module's to one bf16 rounding, the MLP's and the
    attention's the op-by-op ones' (the same ops in the same order); the attention's also
    under a bf16 autocast with float32 q, k, v (cast to bf16 and kept as such, as autocast's
    products keep them)."""
    from nanovppo.packed import Layout, _fill_hidden, _mlp, _norm

    model, _ = tiny
    layer = copy.deepcopy(model.model.layers[0]).to(torch.bfloat16).train()
    N, H, I = 7, model.config.hidden_size, model.config.intermediate_size
    assert (H, I) == (64, 128)
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    dy = torch.randn(N, H, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def grads(fn):
        layer.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_()
        size, y = kept_bytes(layer, lambda: fn(xin))
        y.backward(dy)
        return size, y.detach(), xin.grad, {n: p.grad for n, p in layer.named_parameters()
                                            if p.grad is not None}

    norm = layer.input_layernorm
    got, want = grads(lambda t: _norm(norm, t)), grads(norm)
    assert (got[0], want[0]) == (2 * N * H + 4 * N, 6 * N * H + 4 * N)
    assert torch.equal(got[1], want[1])
    for g, w in [(got[2], want[2]), (got[3]["input_layernorm.weight"],
                                     want[3]["input_layernorm.weight"])]:
        torch.testing.assert_close(g, w, atol=0, rtol=2 ** -7)  # one bf16 rounding apart

    mlp = layer.mlp
    op_by_op = lambda t: mlp.down_proj(mlp.act_fn(mlp.gate_proj(t)) * mlp.up_proj(t))  # noqa: E731
    got, want = grads(lambda t: _mlp(mlp, t, True)), grads(op_by_op)
    assert (got[0], want[0]) == (2 * N * (H + 2 * I), 2 * N * (H + 4 * I))
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert got[3].keys() == want[3].keys() == {f"mlp.{p}_proj.weight"
                                               for p in ("gate", "up", "down")}
    for name in want[3]:
        assert torch.equal(got[3][name], want[3][name]), name

    g = torch.Generator().manual_seed(2)
    groups, scaling = 2, 0.5
    qg, k = torch.randn(2, 3, groups * 5, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    v = torch.randn(2, 3, 6, 4, generator=g)
    mask = torch.rand(2, 1, 5, 6, generator=g) < 0.7
    mask[..., 0] = True  # every query sees a key
    dout = torch.randn(2, 3, groups * 5, 4, generator=g).to(torch.bfloat16)
    S = 2 * 3 * groups * 5 * 6  # scores
    layout = Layout(*[None] * 5, n_prompt=0, eager=True, n_real=0)  # its eager attention

    def op_by_op(qg, k, v):
        scores = _fill_hidden((qg @ k.transpose(-1, -2)) * scaling, mask, groups,
                              torch.finfo(torch.bfloat16).min)
        return torch.softmax(scores, -1, dtype=torch.float32).to(torch.bfloat16) @ v

    for autocast, dtype in [(False, torch.bfloat16), (True, torch.float32)]:
        def attention(fn):
            ins = [t.to(dtype).requires_grad_() for t in (qg, k, v)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                size, out = kept_bytes(layer, lambda: fn(*ins))
            out.backward(dout)
            return size, out.detach(), *(t.grad for t in ins)

        got = attention(lambda q_, k_, v_: layout._kernel(
            q_.view(2, 3 * groups, 5, 4), k_, v_, mask, scaling).view(2, 3, groups * 5, 4))
        want = attention(op_by_op)
        assert got[0] == want[0] - 2 * S
        assert got[2].dtype == dtype
        for a, b in zip(got[1:], want[1:]):
            assert torch.equal(a, b)


def test_head_chunks_are_counted_in_positions(tiny, monkeypatch):
    """The head's float32 blocks ([positions, vocab]: logits, softmax) hold at most
    ``chunk_tokens`` positions however wide the completions: 4 completions of 30 tokens
    after one prompt are 120 positions, in blocks of at most 7: 18 in the forward (17 of 7
    and one of 1) and 18 again in the backward, where chunks of 4 rows of the widest
    completion would have been one block of 120."""
    import nanovppo.head as head

    model, tok = tiny
    model = copy.deepcopy(model).train()
    rows = []
    for name in ("_token_logprobs", "_token_logprobs_entropy", "_logits_grad"):  # a chunk's logits
        real = getattr(head, name)
        monkeypatch.setattr(head, name, lambda fused, logits, *a, real=real:
                            rows.append(logits.shape[0]) or real(fused, logits, *a))
    gen = torch.Generator().manual_seed(0)
    completions = [[torch.randint(3, 200, (30,), generator=gen).tolist() for _ in range(4)]]
    batch = pad_groups([[5, 6, 7]], completions, tok.pad_token_id)
    packed_logprobs(model, batch, 1.0, chunk_tokens=7).sum().backward()
    assert rows == ([7] * 17 + [1]) * 2
