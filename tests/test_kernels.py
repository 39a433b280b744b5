"""The fused kernels (``nanovppo/kernels.py``): compiled, each agrees with its own eager
form, the one-pass update with them agrees with the update without, and a kernel that
cannot be compiled runs eagerly."""

import copy
import logging

import pytest
import torch

from nanovppo import head, kernels
from nanovppo.kernels import Kernel
from nanovppo.logprobs import pad_groups
from nanovppo.packed import packed_logprobs
from tests.test_logprobs import COMPLETIONS, PROMPTS

KERNELS = kernels.KERNELS  # the package's (head and packed, imported here, define them)
CASES = ["_rms_norm", "_rms_norm_dx", "_rms_norm_dweight", "_gated", "_gated_grads",
         "_token_logprobs", "_token_logprobs_entropy", "_logits_grad"]


def _inputs(name, gen):
    """Arguments of kernel ``name`` at a micro-batch's shapes (37 rows: no power of two),
    bf16 activations, float32 scales and log-prob gradients."""
    def bf16(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).bfloat16()

    n, h, inter, vocab = 37, 64, 160, 1000
    x, w = bf16(n, h), 1 + bf16(h, scale=0.1)
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    temperature = torch.tensor(0.7)
    return {"_rms_norm": (x, w, 1e-5),
            "_rms_norm_dx": (bf16(n, h), x, scale, w),
            "_rms_norm_dweight": (bf16(n, h), x, scale, torch.bfloat16),
            "_gated": (bf16(n, inter), bf16(n, inter)),
            "_gated_grads": (bf16(n, inter), bf16(n, inter), bf16(n, inter)),
            "_token_logprobs": (bf16(n, vocab, scale=3.0), targets, temperature),
            "_token_logprobs_entropy": (bf16(n, vocab, scale=3.0), targets, temperature),
            "_logits_grad": (bf16(n, vocab, scale=3.0), torch.randn(n, generator=gen),
                             targets, temperature)}[name]


def test_every_kernel_is_checked():
    """The cases below cover every kernel the package defines."""
    assert sorted(KERNELS) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_each_compiled_kernel_agrees_with_its_eager_form(name, monkeypatch):
    """Eagerly each op rounds its bf16 result; compiled, the intermediates stay in float32
    and the result is rounded once. So the two differ by rounding only: within 2^-7 of the
    result's norm (two steps of bf16's 8-bit significand) for bf16 results, 1e-5 for the
    float32 ones (scales, log-probs, entropies). The compiled form is the one that ran."""
    kernel = KERNELS[name]
    calls = []
    compiled = kernel.compiled
    monkeypatch.setattr(kernel, "compiled", lambda *a: calls.append(1) or compiled(*a))
    args = _inputs(name, torch.Generator().manual_seed(0))
    eager, fused = kernel(False, *args), kernel(True, *args)
    assert calls == [1] and not kernel.failed
    eager = eager if isinstance(eager, tuple) else (eager,)
    fused = fused if isinstance(fused, tuple) else (fused,)
    assert len(eager) == len(fused)
    for e, f in zip(eager, fused):
        assert e.shape == f.shape and e.dtype == f.dtype
        tol = 2 ** -7 if e.dtype == torch.bfloat16 else 1e-5
        assert (f.float() - e.float()).norm() <= tol * e.float().norm()


def test_logits_grad_is_onehot_minus_softmax():
    """The head's backward kernel, compiled and eagerly: for logits (1, 2, 3) at
    temperature 1 the softmax is (0.0900, 0.2447, 0.6652); target 1 and an upstream
    gradient of 2 give 2 * (onehot - softmax) = (-0.1800, 1.5106, -1.3305)."""
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    want = torch.tensor([[-0.1800, 1.5106, -1.3305]])
    for fused in (False, True):
        got = head._logits_grad(fused, logits, torch.tensor([2.0]), torch.tensor([1]),
                                torch.tensor(1.0))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_fused_one_pass_gives_the_update_without(tiny, autocast):
    """The one pass with its kernels compiled (norms, MLP, head; the projections' gradients
    in place, as the trainer runs it; the default's eager attention) against the same pass
    op by op: log-probs, entropies and every parameter's gradient agree, to float32's
    rounding in fp32 and to bf16's (2^-7 of each gradient's norm) under bf16 autocast, at
    a temperature."""
    model, tok = tiny
    model = copy.deepcopy(model).train()
    model.set_attn_implementation("eager")  # the default's (hardware.attn_implementation)
    batch = pad_groups(PROMPTS, COMPLETIONS, tok.pad_token_id)
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))

    def run(fused):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp, ent = packed_logprobs(model, batch, 0.7, chunk_tokens=3, with_entropy=True,
                                        grads_in_place=True, fused=fused)
        (logp * weights[:, :logp.shape[1]]).sum().backward()
        return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.grad is not None}

    (logp0, ent0, g0), (logp1, ent1, g1) = run(False), run(True)
    assert not any(k.failed for k in KERNELS.values())
    tol = 2 ** -7 if autocast else 1e-5
    torch.testing.assert_close(logp1, logp0, atol=tol, rtol=tol)
    torch.testing.assert_close(ent1, ent0, atol=tol, rtol=tol)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for name in g0:
        assert (g1[name] - g0[name]).norm() <= tol * g0[name].norm(), name


def test_a_kernel_that_cannot_be_compiled_runs_eagerly(caplog):
    """A branch on a tensor's value cannot be compiled into one graph: the call warns,
    returns the eager result, and later calls run eagerly without trying again."""
    def halve_if_positive(x):
        return x / 2 if x.sum() > 0 else x

    kernel = Kernel(halve_if_positive)
    with caplog.at_level(logging.WARNING, logger="nanovppo.kernels"):
        assert torch.equal(kernel(True, torch.ones(3)), torch.full((3,), 0.5))
    assert kernel.failed
    assert "halve_if_positive could not be compiled" in caplog.text
    kernel.compiled = None  # not called again
    assert torch.equal(kernel(True, -torch.ones(3)), -torch.ones(3))
