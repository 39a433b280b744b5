"""The output head's log-probs: the sampled tokens' log-probabilities (and the
distributions' entropies) from the last hidden states, without a [batch, seq, vocab] tensor.

``head_logprobs`` applies the head only at the positions that predict real completion
tokens, in chunks, through one autograd function (``_HeadLogprobs``) that keeps only the
hidden states and recomputes a chunk's logits in the backward pass; each chunk's
vocabulary-wide work is a handful of passes. ``reuse_head_cast`` keeps the head's bf16
cast for a minibatch; ``sparse_tied_embedding_grads`` gives a tied input embedding a
sparse gradient. All three are the fast path's (``trainer.fast``); the plain path,
``logprobs.PlainLogprobs``, takes the full log-softmax instead.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from nanovppo.kernels import kernel


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's if it is on, else the inputs'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _CastCache:
    """The output head's weight cast to the compute dtype, kept while a ``reuse_head_cast``
    region is open and the weight is unchanged (same tensor, same version counter)."""

    def __init__(self):
        self.depth = 0
        self.entry = None  # (weakref to the weight, its version, dtype, cast)

    def get(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if weight.dtype == dtype:
            return weight
        if self.entry is not None:
            ref, version, cached_dtype, cast = self.entry
            if ref() is weight and version == weight._version and cached_dtype == dtype:
                return cast
        cast = weight.detach().to(dtype)
        if self.depth:
            self.entry = (weakref.ref(weight), weight._version, dtype, cast)
        return cast


_HEAD_CAST = _CastCache()


@contextlib.contextmanager
def reuse_head_cast():
    """Within this region the output head's weight is cast to the compute dtype once, not
    once per chunk and again in the backward pass: a [vocab, hidden] copy (~28M values
    for SmolLM2) each time. Like autocast's own cache of weight casts, it is dropped when
    the outermost region ends, and the weight must not change inside the region: the
    update opens one per minibatch and steps the optimizer after it. (An in-place change
    that bumps the weight's version counter makes the cast again, but the fused AdamW
    step does not bump it.)"""
    _HEAD_CAST.depth += 1
    try:
        yield
    finally:
        _HEAD_CAST.depth -= 1
        if not _HEAD_CAST.depth:
            _HEAD_CAST.entry = None


def _log_softmax_at(logits, targets, temperature, with_entropy: bool):
    """From a chunk's logits [n, V]: the log-probs [n] of ``targets`` [n] at
    ``temperature`` (a 0-d float32 tensor), and the distributions' entropies [n] where
    ``with_entropy``, in float32."""
    x = logits.float() / temperature
    top = x.amax(-1, keepdim=True)
    e = (x - top).exp()          # one exp per logit serves the normaliser and the entropy
    lse = (top + e.sum(-1, keepdim=True).log()).squeeze(-1)                 # log sum exp
    logp = x.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp
    return logp, lse - (e * x).sum(-1) / e.sum(-1)  # -sum p log p, log p = x - lse


# Two kernels, each compiled once per dtype (the temperature is a tensor for that reason:
# a Python float would be compiled into the code, one compilation per value).
@kernel
def _token_logprobs(logits, targets, temperature):
    """``_log_softmax_at`` without the entropies."""
    return _log_softmax_at(logits, targets, temperature, False)


@kernel
def _token_logprobs_entropy(logits, targets, temperature):
    """``_log_softmax_at`` with the entropies."""
    return _log_softmax_at(logits, targets, temperature, True)


@kernel
def _logits_grad(logits, grad_logp, targets, temperature):
    """The gradient of a chunk's logits [n, V] (in their dtype) for the gradient
    ``grad_logp`` [n] of the log-probs of ``targets`` [n] at ``temperature`` (a 0-d float32
    tensor): (onehot(target) - softmax) * grad_logp / temperature."""
    x = logits.float() / temperature
    gl = grad_logp[:, None] / temperature
    if torch.compiler.is_compiling():  # the one-hot as a comparison in the loop: 2.3x faster
        hit = torch.arange(x.shape[-1], device=x.device)[None] == targets[:, None]
        return ((hit.float() - torch.softmax(x, -1)) * gl).to(logits.dtype)
    # Eagerly in place, the one-hot scattered into the softmax.
    grad = torch.softmax(x, -1).mul_(-gl).scatter_add_(-1, targets[:, None], gl)
    return grad.to(logits.dtype)


class _HeadLogprobs(torch.autograd.Function):
    """Log-probs of ``targets`` [n] under the output head, and the entropies [n] of the
    distributions (not differentiated), from hidden states [n, H], ``chunk`` positions at
    a time.

    Only the inputs are saved; the backward pass recomputes each chunk's logits and forms
    d logp / d logits = onehot(target) - softmax in place: the gradient autograd would
    take through ``log_softmax(...).gather(...)``, without a checkpointed recompute of the
    whole forward (entropy included), the zero-filled gradient of the gather and the
    intermediate vocabulary-wide copies. Matmuls run in autocast's dtype when autocast is
    on (as ``F.linear`` would), the softmax in fp32; the weight's gradient is summed over
    the chunks by the matmul itself (``addmm_``, in the matmul's dtype) and cast to the
    weight's dtype once. ``fused``: the vocabulary-wide work after each chunk's product
    one kernel (``_token_logprobs``, ``_logits_grad``; ``nanovppo/kernels.py``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, with_entropy: bool,
                chunk: int, grads_in_place: bool = False, fused: bool = False):
        dtype = _compute_dtype(hidden, weight)
        w = _HEAD_CAST.get(weight, dtype)
        logps, ents = [], []
        temp = torch.tensor(temperature, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, hidden.shape[0], chunk):
                logits = hidden[i:i + chunk].to(dtype) @ w.T                    # [n, V]
                if with_entropy:
                    logp, ent = _token_logprobs_entropy(fused, logits, targets[i:i + chunk],
                                                        temp)
                    ents.append(ent)
                else:
                    logp = _token_logprobs(fused, logits, targets[i:i + chunk], temp)
                logps.append(logp)
                del logits
        logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
        entropy = torch.cat(ents) if ents else logp.new_zeros(0)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.dtype, ctx.temperature, ctx.chunk = dtype, temperature, chunk
        ctx.grads_in_place, ctx.fused = grads_in_place, fused
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        temp = torch.tensor(ctx.temperature, dtype=torch.float32, device=hidden.device)
        w = _HEAD_CAST.get(weight, dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # After a minibatch's first micro-batch, added into the weight's .grad in place
        # (as the packed forward's projections do: nanovppo/packed.py, _LinearGradInPlace)
        in_place = (ctx.grads_in_place and ctx.needs_input_grad[1] and weight.grad is not None
                    and weight.grad.layout == torch.strided and weight.grad.dtype == dtype)
        grad_weight = weight.grad if in_place else None
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, hidden.shape[0], chunk):
                h = hidden[i:i + chunk].to(dtype)
                grad = _logits_grad(ctx.fused, h @ w.T, grad_logp[i:i + chunk],
                                    targets[i:i + chunk], temp)              # [n, V]
                if grad_hidden is not None:
                    grad_hidden[i:i + chunk] = grad @ w
                if ctx.needs_input_grad[1]:                                 # [V, H]
                    if grad_weight is None:
                        grad_weight = grad.T @ h
                    else:
                        grad_weight.addmm_(grad.T, h)
            if in_place:
                grad_weight = None  # already added into .grad
            elif ctx.needs_input_grad[1]:
                grad_weight = (torch.zeros_like(weight) if grad_weight is None  # no positions
                               else grad_weight.to(weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None


def head_logprobs(model, hidden, targets, cmask, temperature, chunk_tokens, with_entropy,
                  grads_in_place: bool = False, fused: bool = False):
    """Apply the output head to the real positions of ``hidden`` [B, C, H], ``chunk_tokens``
    positions at a time (None: all at once); see module doc. Padded positions get 0.
    ``grads_in_place``: the weight's gradient is added into its ``.grad`` where there is
    one already (one process only). ``fused``: its vocabulary-wide work compiled."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("output heads with a bias are not supported")
    real = cmask.bool()
    h, t = hidden[real], targets[real]                                       # [n, H], [n]
    chunk = max(1, chunk_tokens or h.shape[0])
    logp, ent = _HeadLogprobs.apply(h, head.weight, t, float(temperature), with_entropy, chunk,
                                    grads_in_place, fused)

    def padded(values):  # [n] -> [B, C], 0 at padded positions
        zeros = torch.zeros(cmask.shape, dtype=torch.float32, device=cmask.device)
        return zeros.masked_scatter(real, values)

    return (padded(logp), padded(ent)) if with_entropy else padded(logp)


def sparse_tied_embedding_grads(model) -> bool:
    """Give the input embedding's backward a sparse gradient when it shares its weight
    with the output head; returns whether it does.

    A dense embedding gradient is a zero-filled [vocab, hidden] tensor per forward pass
    (two per micro-batch in ``group_logprobs``) that is then added to the head's gradient
    of the same weight. A sparse one holds only the rows looked up, and autograd adds it
    into the head's dense gradient (or into ``.grad``) in place. Should the sparse one be
    the first the weight receives, a hook makes ``.grad`` dense, as clipping and the
    optimizer want it. Not for DDP or FSDP2, which reduce dense gradients.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (not isinstance(emb, torch.nn.Embedding) or head is None
            or emb.weight is not head.weight or emb.sparse or not emb.weight.requires_grad):
        return False
    weight = emb.weight

    def dense_grad(param):
        if param.grad.is_sparse:
            param.grad = param.grad.to_dense()

    weight.register_post_accumulate_grad_hook(dense_grad)
    emb.sparse = True
    return True
