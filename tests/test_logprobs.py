"""Completion log-probs: chunked and prefix-shared computations equal a plain forward pass."""

import pytest
import torch
import torch.nn.functional as F

from nanovppo.logprobs import completion_logprobs, group_logprobs, pad_batch, pad_groups

PROMPTS = [[5, 6, 7, 8, 9], [11, 12]]
COMPLETIONS = [[[20, 21, 22], [23], [24, 25, 26, 27]], [[30, 31], [32, 33, 34]]]


def naive_logprobs(model, prompt, completion, temperature=1.0):
    """Full forward of one unpadded sequence, full-vocabulary log-softmax."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    logp = F.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1), ent


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_plain_and_grouped_logprobs_equal_a_forward_pass(tiny, attention):
    """With either attention kernel (hardware.attn_implementation) the padded and the
    prompt-shared forwards give each completion's log-probs and entropies."""
    model, tok = tiny
    model.eval()
    model.set_attn_implementation(attention)
    pairs = [(p, c) for p, group in zip(PROMPTS, COMPLETIONS) for c in group]
    with torch.no_grad():
        expected = [naive_logprobs(model, p, c, 0.7) for p, c in pairs]
        plain = completion_logprobs(model, pad_batch([p for p, _ in pairs], [c for _, c in pairs],
                                                     tok.pad_token_id), 0.7, chunk_tokens=2)
        grouped, ent = group_logprobs(model, pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id),
                                      0.7, chunk_tokens=3, with_entropy=True)
    for r, ((p, c), (want, want_ent)) in enumerate(zip(pairs, expected)):
        torch.testing.assert_close(plain[r, :len(c)], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grouped[r, :len(c)], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[r, :len(c)], want_ent, atol=1e-4, rtol=1e-4)
        assert torch.all(grouped[r, len(c):] == 0)
    model.set_attn_implementation("sdpa")


def test_grouped_gradients_equal_plain_gradients(tiny):
    model, tok = tiny
    model.eval()
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    def grads(fn):
        model.zero_grad()
        logp = fn()
        (logp * weights[:, :logp.shape[1]]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    pairs = [(p, c) for p, group in zip(PROMPTS, COMPLETIONS) for c in group]
    g1 = grads(lambda: completion_logprobs(
        model, pad_batch([p for p, _ in pairs], [c for _, c in pairs], tok.pad_token_id)))
    g2 = grads(lambda: group_logprobs(model, pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id)))
    assert g1.keys() == g2.keys() and len(g1) > 5
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-4)
    model.zero_grad()


@pytest.mark.parametrize("autocast", [False, True])
def test_head_gradients_equal_autograd_through_a_full_log_softmax(tiny, autocast):
    """The head's own backward (logits recomputed, onehot - softmax formed in place) gives
    the gradients autograd gives through the full-vocabulary log-softmax, for every
    parameter (the tied head/embedding included), at a temperature, in fp32 and under bf16
    autocast (where both run the head's matmul in bf16)."""
    model, tok = tiny
    model.eval()
    pairs = [(p, c) for p, group in zip(PROMPTS, COMPLETIONS) for c in group]
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def naive_loss():
        return sum((naive_logprobs(model, p, c, 0.7)[0] * weights[r, :len(c)]).sum()
                   for r, (p, c) in enumerate(pairs))

    def grouped_loss():
        logp = group_logprobs(model, pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id), 0.7,
                              chunk_tokens=1)
        return (logp * weights[:, :logp.shape[1]]).sum()

    want, got = grads(naive_loss), grads(grouped_loss)
    assert want.keys() == got.keys() and "model.embed_tokens.weight" in got
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol)
    model.zero_grad()


def test_activation_checkpointing_keeps_the_prompt_shared_with_its_completions(tiny):
    """With checkpointed layers (hardware.gradient_checkpointing) the grouped forward in
    training mode gives the same log-probs and gradients: each completion still sees its
    prompt, and re-running a layer in the backward pass does not append its keys twice."""
    import copy

    from nanovppo.distributed import decoder_layers
    from nanovppo.logprobs import checkpoint_layers

    model, tok = tiny
    ckpt = copy.deepcopy(model)
    checkpoint_layers(ckpt, decoder_layers(ckpt))
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    batch = pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id)
    pairs = [(p, c) for p, group in zip(PROMPTS, COMPLETIONS) for c in group]
    with torch.no_grad():
        model.eval()
        expected = [naive_logprobs(model, p, c)[0] for p, c in pairs]

    def run(m):
        m.train()
        m.zero_grad()
        logp = group_logprobs(m, batch)
        (logp * weights[:, :logp.shape[1]]).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                               if p.grad is not None}

    logp1, g1 = run(model)
    logp2, g2 = run(ckpt)
    for r, ((p, c), want) in enumerate(zip(pairs, expected)):
        torch.testing.assert_close(logp2[r, :len(c)], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp1, logp2, atol=1e-6, rtol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 5
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-5)
    model.zero_grad()
    model.eval()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_split_backward_gives_the_same_gradients_accumulated_earlier(tiny, checkpointed):
    """``split_backward`` runs the completion pass's backward, then the prompt pass's:
    the same gradients, but each weight's completion-pass gradient is accumulated as soon
    as it is computed (a second accumulation per weight) instead of being held until the
    prompt pass adds its part."""
    import copy

    from nanovppo.distributed import decoder_layers
    from nanovppo.logprobs import checkpoint_layers

    model, tok = tiny
    model = copy.deepcopy(model).train()
    if checkpointed:
        checkpoint_layers(model, decoder_layers(model))
    batch = pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id)
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    probe = model.model.layers[0].mlp.down_proj.weight
    accumulations = []
    probe.register_post_accumulate_grad_hook(lambda p: accumulations.append(1))

    def run(split):
        model.zero_grad(set_to_none=True)
        accumulations.clear()
        logp = group_logprobs(model, batch, 0.7, split_backward=split)
        (logp * weights[:, :logp.shape[1]]).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, \
            len(accumulations)

    logp1, g1, n1 = run(False)
    logp2, g2, n2 = run(True)
    assert (n1, n2) == (1, 2)
    torch.testing.assert_close(logp1, logp2, atol=0, rtol=0)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_sparse_tied_embedding_gradients_equal_dense_ones(tiny, split):
    """With the tied embedding's gradient sparse (one process), two accumulated
    micro-batches give the dense run's gradients, and ``.grad`` stays dense, also when
    the embedding's sparse gradient is the first the weight receives."""
    import copy

    from nanovppo.head import sparse_tied_embedding_grads

    model, tok = tiny
    dense, sparse = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    assert sparse_tied_embedding_grads(sparse)
    assert not sparse_tied_embedding_grads(sparse)  # once only
    batches = [pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id),
               pad_groups([[40, 41, 42]], [[[43], [44, 45]]], tok.pad_token_id)]

    def grads(m):
        for b in batches:
            logp = group_logprobs(m, b, 0.7, split_backward=split)
            (logp * torch.arange(logp.numel()).view_as(logp)).sum().backward()
        return {n: p.grad for n, p in m.named_parameters()}

    want, got = grads(dense), grads(sparse)
    weight = sparse.get_input_embeddings().weight
    assert weight.grad.layout == torch.strided
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    sparse.zero_grad(set_to_none=True)
    sparse.get_input_embeddings()(torch.tensor([[3, 4, 3]])).sum().backward()
    assert weight.grad.layout == torch.strided
    assert weight.grad[3].eq(2).all() and weight.grad[4].eq(1).all()
    assert weight.grad.abs().sum(-1).nonzero().view(-1).tolist() == [3, 4]


def test_sparse_embedding_gradients_need_a_tied_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    from nanovppo.head import sparse_tied_embedding_grads

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    assert not sparse_tied_embedding_grads(model)
    assert not model.get_input_embeddings().sparse


def test_the_head_cast_is_reused_until_the_weight_changes(tiny):
    """Inside ``reuse_head_cast`` the head's bf16 cast is made once, forward and backward;
    a new region after an optimizer step casts the new weight, and an in-place change that
    bumps the version counter casts again inside a region."""
    import copy

    from nanovppo.head import _HEAD_CAST, reuse_head_cast
    from nanovppo.optim import adamw

    model, tok = tiny
    model = copy.deepcopy(model).train()
    batch = pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id)
    optimizer = adamw(model.parameters(), lr=1e-2)

    def logprobs():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return group_logprobs(model, batch, 0.7)

    with reuse_head_cast():
        before = logprobs()
        cast = _HEAD_CAST.entry[3]
        (before * torch.arange(before.numel()).view_as(before)).sum().backward()
        assert _HEAD_CAST.entry[3] is cast  # the backward pass reused it
    assert _HEAD_CAST.entry is None
    optimizer.step()
    with reuse_head_cast():
        after = logprobs()
        assert _HEAD_CAST.entry[3] is not cast
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(1.5)
        scaled = logprobs()
    with torch.no_grad():
        fresh_scaled = logprobs()
        model.get_output_embeddings().weight.div_(1.5)
        fresh_after = logprobs()
    torch.testing.assert_close(after.detach(), fresh_after, atol=0, rtol=0)
    torch.testing.assert_close(scaled.detach(), fresh_scaled, atol=0, rtol=0)
    assert not torch.equal(after.detach(), before.detach())
