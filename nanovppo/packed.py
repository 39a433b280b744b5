"""Completion log-probs in one pass over a micro-batch's real tokens.

``group_logprobs`` runs a micro-batch in two passes: its prompts, then its completions on
the prompts' keys and values. Every weight then takes part in two products forward and
two backward, its gradient arrives in two parts to be added, and both passes also run on
their padding. ``packed_logprobs`` lays the real tokens end to end instead, first each
prompt's, then each completion's (all but its last token, whose output predicts nothing
scored), and runs every layer once over all of them:

    h = embed(tokens)                                   [N, H], N real tokens (and
                                                        padding to ROW_MULTIPLE rows)
    for each layer:
        q, k, v = projections of norm(h), rotated by each token's position
        h += o_proj(attend(q, k, v))                    the only step that sees the layout
        h += mlp(norm(h))
    log-probs of each completion token from the state before it (``head_logprobs``)

Only attention needs to know which token sees which: a prompt's tokens see the earlier
tokens of their prompt; a completion's tokens see their whole prompt and the earlier
tokens of their own completion, not the other completions of the group. ``attend``
gathers the prompts and the completions into padded blocks for that and scatters the
results back.

What the forward keeps for the backward is its activation memory, which sets the
update's peak: the RMSNorms (``_RMSNorm``), the gated MLP (``_GatedMLPGradInPlace``) and
the eager attention (``_Attention``) are autograd functions here that keep less than
the ops they replace (and recompute the rest), with the same gradients: for a micro-batch
of make train's, 437 MB -> 261 MB (``bench/packed_update.py``). For long completions the
attention keeps only q, k and v instead (``_Attention``'s ``recompute``, above
``RECOMPUTED_PROBS_BYTES``): at 256 tokens 1,512 MB -> 823 MB a micro-batch.

The layers' submodules (norms, projections, MLP) are called directly, so this works for
decoders built like Llama's (``SUPPORTED``: Llama, SmolLM2, Qwen2, Qwen2.5, Qwen3); other
architectures take the two-pass path. FSDP2 gathers a layer's weights in the layer's own
forward, which this does not call, so under FSDP2 the two-pass path runs (DDP only
reduces the gradients the parameters receive and runs this; ``nanovppo.fast.logprob_module``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanovppo.head import head_logprobs
from nanovppo.kernels import kernel
from nanovppo.logprobs import GroupBatch, _attention_layers

SUPPORTED = ("llama", "qwen2", "qwen3")
# The packed rows are padded to a multiple of this (rows of token 0 that nothing reads):
# the micro-batches of an update then come in a few row counts instead of one each, and
# the default's peak RSS measured ~0.09 GB lower in bench/trl_compare.py (3.05-3.08 GB
# against 3.14-3.18), the update no slower (16 and 64 saved less; docs/results.md).
ROW_MULTIPLE = 32
# The eager attention keeps its float32 probabilities for the backward up to this many
# bytes a call, and above it keeps only q, k and v and computes them again in the backward
# (``_Attention``'s ``recompute``). One micro-batch's forward and backward
# (bench/packed_update.py, docs/results.md): at make train's 48 tokens (calls of 1-3 MB)
# keeping is 1-7% faster; at 96 (~6 MB) the two take the same time and recomputing keeps
# 141 MB less; at 256 (~30 MB) recomputing is 8% faster and keeps 0.69 GB less.
RECOMPUTED_PROBS_BYTES = 4 << 20


def supports(model) -> bool:
    """Whether ``packed_logprobs`` can run ``model`` (a Llama-like decoder, full attention)."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED:
        return False
    if getattr(config, "attention_dropout", 0.0):
        return False  # no attention dropout here
    try:
        _attention_layers(model)  # full attention only: no sliding-window layers
    except NotImplementedError:
        return False
    return True


def _to_padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n, ...] rows into a [*mask.shape, ...] block at ``mask``'s true places, zero elsewhere
    (row-major order, the order ``block[mask]`` reads them back in)."""
    block = flat.new_zeros((*mask.shape, *flat.shape[1:]))
    return block.index_put((mask,), flat)


class Layout(NamedTuple):
    """Where a micro-batch's tokens sit in the packed sequence, and who sees whom."""

    prompt_mask: torch.Tensor   # [G, P] bool, real prompt tokens, right-aligned to 0
    input_mask: torch.Tensor    # [B, C - 1] bool, completion tokens that are inputs
    group_index: torch.Tensor   # [B] each completion's prompt row
    prompt_attn: torch.Tensor   # [G, 1, P, P] bool: query sees key
    comp_attn: torch.Tensor     # [B, 1, C - 1, P + C - 1] bool
    n_prompt: int               # prompt tokens, packed first
    eager: bool                 # attention as matmuls and a float32 softmax (else sdpa)
    n_real: int                 # real tokens; the rows after them are padding

    def attend(self, q, k, v, scaling: float) -> torch.Tensor:
        """Attention of packed q [N, h, d] over packed k, v [N, kv, d] -> [N, h * d]."""
        n, end = self.n_prompt, self.n_real
        pq, pk, pv = (_to_padded(t[:n], self.prompt_mask).transpose(1, 2) for t in (q, k, v))
        out = [self._kernel(pq, pk, pv, self.prompt_attn, scaling)           # [G, h, P, d]
               .transpose(1, 2)[self.prompt_mask]]                           # [n, h, d]
        if end > n:
            cq, ck, cv = (_to_padded(t[n:end], self.input_mask).transpose(1, 2) for t in (q, k, v))
            ck = torch.cat([pk[self.group_index], ck], dim=2)                # [B, kv, P + C', d]
            cv = torch.cat([pv[self.group_index], cv], dim=2)
            out.append(self._kernel(cq, ck, cv, self.comp_attn, scaling)
                       .transpose(1, 2)[self.input_mask])
        if q.shape[0] > end:  # the padding rows attend to nothing
            out.append(q.new_zeros((q.shape[0] - end, *q.shape[1:])))
        return torch.cat(out).flatten(1)

    def _kernel(self, q, k, v, mask, scaling):
        """q [b, h, c, d] over k, v [b, kv, K, d] (grouped-query attention: query head i
        reads kv head i // (h / kv)), ``mask`` [b, 1, c, K] -> [b, h, c, d]."""
        b, h, c, d = q.shape
        kv = k.shape[1]
        if not self.eager:
            if kv != h:
                k = k.repeat_interleave(h // kv, dim=1)
                v = v.repeat_interleave(h // kv, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        # The query heads that share a kv head as rows of one product with it: no copies of
        # k and v per query head, and h / kv times fewer, larger products.
        qg = q.reshape(b, kv, h // kv * c, d)
        if torch.is_autocast_enabled(q.device.type):  # cast as autocast's products would,
            dtype = torch.get_autocast_dtype(q.device.type)  # so that the casts are kept
            qg, k, v = qg.to(dtype), k.to(dtype), v.to(dtype)
        recompute = 4 * b * h * c * k.shape[2] > RECOMPUTED_PROBS_BYTES  # float32 probs
        return _Attention.apply(qg, k, v, mask, scaling, h // kv, recompute).view(b, h, c, d)


def _fill_hidden(x, mask, groups: int, value: float) -> torch.Tensor:
    """``x`` [b, kv, groups * c, K] (scores or their gradient) with ``value`` where
    ``mask`` [b, 1, c, K] hides a key from a query, for each of the ``groups`` heads."""
    b, kv, rows, keys = x.shape
    return x.view(b, kv, groups, rows // groups, keys).masked_fill(
        ~mask[:, :, None], value).view(b, kv, rows, keys)


def _attention_probs(scores, mask, scaling: float, groups: int):
    """The float32 softmax over the keys of ``scores * scaling`` [b, kv, groups * c, K]
    (the ``groups`` query heads of a kv head as rows), -inf-like where ``mask`` [b, 1, c,
    K] hides a key, and its cast to the scores' dtype (for the product with v)."""
    scaled = _fill_hidden(scores * scaling, mask, groups, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    return probs, probs.to(scores.dtype)


def _attention_scores_grad(dprobs, probs, mask, scaling: float, groups: int):
    """From the gradient ``dprobs`` of ``_attention_probs``' cast probabilities: the raw
    scores' gradient (softmax's backward, 0 at hidden keys, times ``scaling``) in
    ``dprobs``' dtype."""
    dscores = torch._softmax_backward_data(dprobs.float(), probs, -1, torch.float32)
    return _fill_hidden(dscores.to(dprobs.dtype), mask, groups, 0) * scaling


class _Attention(torch.autograd.Function):
    """The eager attention: ``qg k^T * scaling`` [b, kv, groups * c, K] (``qg`` holds the
    ``groups`` query heads of each kv head as rows), -inf-like where ``mask`` hides a key,
    its float32 softmax cast to the scores' dtype, times ``v``.

    For its backward it keeps q, k, v, the mask and the float32 probabilities (autograd
    would keep their cast copy too, half as many bytes again); with ``recompute`` not the
    probabilities: the backward computes them again (under the autocast the forward ran
    in), for long completions (``RECOMPUTED_PROBS_BYTES``). The gradients are autograd's
    for these ops. (Its softmax work compiled like the kernels of ``nanovppo/kernels.py``
    measured no faster: docs/results.md, "Fused kernels".)"""

    @staticmethod
    def forward(ctx, qg, k, v, mask, scaling: float, groups: int, recompute: bool = False):
        device = qg.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device),
                        torch.is_autocast_enabled(device))
        ctx.args = scaling, groups
        probs, cast = _attention_probs(qg @ k.transpose(-1, -2), mask, scaling, groups)
        ctx.save_for_backward(qg, k, v, mask, None if recompute else probs)
        return cast @ v

    @staticmethod
    def backward(ctx, dout):
        qg, k, v, mask, probs = ctx.saved_tensors
        scaling, groups = ctx.args
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            if probs is None:  # recomputed, with their cast
                probs, cast = _attention_probs(qg @ k.transpose(-1, -2), mask, scaling, groups)
            else:
                cast = probs.to(v.dtype)
            dv = cast.transpose(-1, -2) @ dout
            del cast
            dscores = _attention_scores_grad(dout @ v.transpose(-1, -2), probs, mask, scaling,
                                             groups)
            del probs
            return dscores @ k, dscores.transpose(-1, -2) @ qg, dv, None, None, None, None


def _layout(batch: GroupBatch, eager: bool):
    """The packed tokens [N], their positions [N] and their ``Layout``."""
    pids, pmask, cids, cmask, index = batch
    plen, clen = pmask.sum(-1), cmask.sum(-1).long()                       # [G], [B]
    P, C = pids.shape[1], cids.shape[1]
    arange_p = torch.arange(P)
    prompt_mask = arange_p[None] < plen[:, None]                            # [G, P]
    prompt_tokens = pids[pmask.bool()]          # left-padded rows read in order: real tokens
    inputs = cids[:, :-1]                                                   # [B, C - 1]
    arange_c = torch.arange(C - 1)
    input_mask = arange_c[None] < (clen - 1).clamp(min=0)[:, None]          # [B, C - 1]
    tokens = torch.cat([prompt_tokens, inputs[input_mask]])
    positions = torch.cat([arange_p.expand(len(plen), P)[prompt_mask],
                           (plen[index][:, None] + arange_c[None])[input_mask]])
    causal_p = arange_p[:, None] >= arange_p[None]                          # [P, P]
    prompt_attn = (causal_p[None] & prompt_mask[:, None, :])[:, None]       # [G, 1, P, P]
    causal_c = arange_c[:, None] >= arange_c[None]                          # [C', C']
    sees_prompt = prompt_mask[index][:, None, :].expand(-1, C - 1, -1)       # [B, C', P]
    comp_attn = torch.cat([sees_prompt, causal_c[None].expand(len(index), -1, -1)],
                          dim=-1)[:, None]                                  # [B, 1, C', P + C']
    n_real = len(tokens)
    pad = -n_real % ROW_MULTIPLE
    tokens = torch.cat([tokens, tokens.new_zeros(pad)])
    positions = torch.cat([positions, positions.new_zeros(pad)])
    layout = Layout(prompt_mask, input_mask, index, prompt_attn, comp_attn,
                    len(prompt_tokens), eager, n_real)
    return tokens, positions, layout


def _rotate(x, cos, sin):
    """Rotary position embedding of x [N, heads, d] (cos, sin [N, d])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _add_weight_grads(linear, dy, x) -> None:
    """Add ``linear``'s weight (and bias) gradient for output gradient ``dy`` at input ``x``
    into their ``.grad`` (the weight's by ``addmm_``: C += dy^T x in one product)."""
    weight, bias = linear.weight, linear.bias
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if weight.grad is None:
        weight.grad = dy2.T @ x2
    else:
        weight.grad.addmm_(dy2.T, x2)
    if bias is not None and bias.requires_grad:
        db = dy2.sum(0).to(bias.dtype)
        if bias.grad is None:
            bias.grad = db
        else:
            bias.grad.add_(db)


class _LinearGradInPlace(torch.autograd.Function):
    """``linear(x)`` (an ``nn.Linear``) whose backward adds the gradients of the weight and
    bias into their ``.grad`` itself (``_add_weight_grads``) instead of returning them.

    Autograd would make each micro-batch's weight gradient a new tensor and then add it to
    ``.grad``: one more pass over every weight's gradient per micro-batch after the first
    and, in bf16, a second rounding (for SmolLM2 in bf16 a minibatch of four micro-batches'
    backward is 6% shorter without them: ``bench/packed_update.py``). The parameters are not
    inputs of the autograd graph here, so autograd never accumulates them (nor runs their
    gradient hooks). One process only: DDP reduces the gradients autograd accumulates (it
    hooks that accumulation), so under DDP this is off (``PackedLogprobs``)."""

    @staticmethod
    def forward(ctx, x, linear):
        ctx.save_for_backward(x)
        ctx.linear = linear
        return F.linear(x, linear.weight, linear.bias)

    @staticmethod
    def backward(ctx, dy):
        (x,), linear = ctx.saved_tensors, ctx.linear
        dx = dy @ linear.weight if ctx.needs_input_grad[0] else None
        _add_weight_grads(linear, dy, x)
        return dx, None


@kernel
def _gated(gate, up):
    """The gated MLP's middle, ``silu(gate) * up``."""
    return torch.nn.functional.silu(gate) * up


@kernel
def _gated_grads(dmid, gate, up):
    """From the middle's gradient ``dmid``: the middle again (the down projection's input,
    for its weight gradient) and the gradients of ``up`` and ``gate``."""
    act = torch.nn.functional.silu(gate)
    dgate = torch.ops.aten.silu_backward(dmid * up, gate)
    return act * up, dmid * act, dgate


class _GatedMLPGradInPlace(torch.autograd.Function):
    """Llama's gated MLP, ``down(silu(gate(x)) * up(x))``, with its three weights'
    gradients added in place (as ``_LinearGradInPlace``) and only ``x``, ``gate(x)`` and
    ``up(x)`` kept for the backward, which recomputes ``silu(gate(x))`` and the product
    from them. Autograd's version of the same ops keeps those two as well, [N, intermediate]
    each: for SmolLM2 in bf16, 6 KB a token and layer of the ~30 KB the forward kept. The
    gradients are autograd's, op for op (``silu_backward`` is autograd's own kernel);
    ``fused``: the elementwise work one kernel each way (``nanovppo/kernels.py``)."""

    @staticmethod
    def forward(ctx, x, mlp, fused: bool = False):
        gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
        up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
        ctx.save_for_backward(x, gate, up)
        ctx.mlp, ctx.fused = mlp, fused
        return F.linear(_gated(fused, gate, up), mlp.down_proj.weight, mlp.down_proj.bias)

    @staticmethod
    def backward(ctx, dy):
        (x, gate, up), mlp = ctx.saved_tensors, ctx.mlp
        dmid = dy @ mlp.down_proj.weight                  # the product's gradient
        mid, dup, dgate = _gated_grads(ctx.fused, dmid, gate, up)
        del dmid
        _add_weight_grads(mlp.down_proj, dy, mid)
        del mid
        _add_weight_grads(mlp.gate_proj, dgate, x)
        _add_weight_grads(mlp.up_proj, dup, x)
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return dgate @ mlp.gate_proj.weight + dup @ mlp.up_proj.weight, None, None


@kernel
def _rms_norm(x, weight, eps: float):
    """An RMSNorm of x [n, H] and each row's scale [n, 1] (float32)."""
    x32 = x.float()
    scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * scale).to(x.dtype), scale


@kernel
def _rms_norm_dx(dy, x, scale, weight):
    """The RMSNorm's gradient for x [n, H] (``_rms_norm``'s autograd formula)."""
    x32 = x.float()
    dnormed = (dy * weight).to(x.dtype).float()
    dscale = (dnormed * x32).sum(-1, keepdim=True)
    dmean = -0.5 * dscale * scale.pow(3) / x.shape[-1]
    return (dnormed * scale + dmean * (2 * x32)).to(x.dtype)


@kernel
def _rms_norm_dweight(dy, x, scale, dtype: torch.dtype):
    """The RMSNorm's gradient for its weight [H], summed over the rows of x [n, H]."""
    normed = (x.float() * scale).to(x.dtype)
    return (dy * normed).sum(0).to(dtype)


class _RMSNorm(torch.autograd.Function):
    """Llama's (and Qwen's) RMSNorm, ``w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with the
    statistics in float32, keeping only ``x`` and each row's scale for the backward. The
    module's own forward keeps a float32 copy of ``x`` and the normalised ``x`` as well
    (3x the bytes of a bf16 ``x``); the backward here recomputes them. Its formulas are
    autograd's for those ops, in the same dtypes; ``fused``: each pass one kernel
    (``nanovppo/kernels.py``)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, fused: bool = False):
        out, scale = _rms_norm(fused, x.flatten(0, -2), weight, eps)
        ctx.save_for_backward(x, scale, weight)
        ctx.fused = fused
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, scale, weight = ctx.saved_tensors
        x2, dy2 = x.flatten(0, -2), dy.flatten(0, -2)                        # [n, H]
        dweight = dx = None
        if ctx.needs_input_grad[1]:
            dweight = _rms_norm_dweight(ctx.fused, dy2, x2, scale, weight.dtype)
        if ctx.needs_input_grad[0]:
            dx = _rms_norm_dx(ctx.fused, dy2, x2, scale, weight).view(x.shape)
        return dx, dweight, None, None


_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # the formula of ``_RMSNorm``


def _norm(module, x, fused: bool = False):
    """``module(x)``: an RMSNorm of ``_RMS_NORMS`` through ``_RMSNorm`` (less kept for the
    backward; ``fused``: its kernels compiled), any other norm through its own forward."""
    if type(module).__name__ not in _RMS_NORMS:
        return module(x)
    return _RMSNorm.apply(x, module.weight, module.variance_epsilon, fused)


def _in_place(module, x, grads_in_place: bool) -> bool:
    """Whether ``module(x)`` can add its weight gradients in place: ``grads_in_place``, and
    a plain ``nn.Linear`` whose weight trains in the dtype of ``x`` and of the compute.
    Anything else (a LoRA-wrapped projection, a frozen or differently typed weight) runs
    its own forward."""
    w = module.weight if type(module) is torch.nn.Linear else None
    device = x.device.type
    # x must require a gradient: else autograd would never call the backward
    return (grads_in_place and w is not None and w.requires_grad and w.dtype == x.dtype
            and torch.is_grad_enabled() and x.requires_grad
            and not (torch.is_autocast_enabled(device)  # autocast would cast w
                     and torch.get_autocast_dtype(device) != w.dtype))


def _linear(module, x, grads_in_place: bool):
    """``module(x)``, with its gradients added in place (``_LinearGradInPlace``) where
    ``_in_place`` allows."""
    if not _in_place(module, x, grads_in_place):
        return module(x)
    return _LinearGradInPlace.apply(x, module)


def _mlp(mlp, x, grads_in_place: bool, fused: bool = False):
    """The gated MLP of ``x``: through ``_GatedMLPGradInPlace`` (``fused``: its kernels
    compiled) where its three projections can add their gradients in place and the
    activation is SiLU, else op by op (as Llama's and Qwen's compute it)."""
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if (type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
            and all(_in_place(m, x, grads_in_place) for m in projections)):
        return _GatedMLPGradInPlace.apply(x, mlp, fused)
    linear = lambda m, x: _linear(m, x, grads_in_place)  # noqa: E731
    return linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x))


def _layer(layer, h, cos, sin, layout: Layout, grads_in_place: bool = False,
           fused: bool = False):
    """One decoder layer over the packed states h [N, H]."""
    attn = layer.self_attn
    linear = lambda m, x: _linear(m, x, grads_in_place)  # noqa: E731
    x = _norm(layer.input_layernorm, h, fused)
    q = linear(attn.q_proj, x).unflatten(-1, (-1, attn.head_dim))          # [N, heads, d]
    k = linear(attn.k_proj, x).unflatten(-1, (-1, attn.head_dim))          # [N, kv heads, d]
    v = linear(attn.v_proj, x).unflatten(-1, (-1, attn.head_dim))
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's queries and keys
        q, k = _norm(attn.q_norm, q, fused), _norm(attn.k_norm, k, fused)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    h = h + linear(attn.o_proj, layout.attend(q, k, v, attn.scaling))
    return h + _mlp(layer.mlp, _norm(layer.post_attention_layernorm, h, fused), grads_in_place,
                    fused)


def packed_logprobs(model, batch: GroupBatch, temperature: float = 1.0,
                    chunk_tokens: int | None = None, with_entropy: bool = False,
                    grads_in_place: bool = False, fused: bool = False):
    """Log-probs [B, C] of a ``GroupBatch``'s completion tokens (and their entropy), as
    ``group_logprobs`` gives them, in one pass over the real tokens; see module doc.
    ``grads_in_place``: the projections' weight gradients are added into ``.grad`` by
    their backward (``_LinearGradInPlace``; one process only). ``fused``: the norms', the
    MLP's and the head's elementwise work compiled (``nanovppo/kernels.py``)."""
    decoder = model.get_decoder()
    eager = getattr(model.config, "_attn_implementation", None) == "eager"
    tokens, positions, layout = _layout(batch, eager)
    h = decoder.embed_tokens(tokens)                                        # [N, H]
    cos, sin = decoder.rotary_emb(h, positions[None])                       # [1, N, d]
    cos, sin = cos[0], sin[0]
    for layer in decoder.layers:
        if getattr(layer, "_nanovppo_checkpointed", False) and torch.is_grad_enabled():
            h = checkpoint(_layer, layer, h, cos, sin, layout, grads_in_place, fused,
                           use_reentrant=False)
        else:
            h = _layer(layer, h, cos, sin, layout, grads_in_place, fused)
    h = _norm(decoder.norm, h, fused)
    # The state before completion token j: its prompt's last (j = 0), else input j - 1's.
    cids, cmask, index = batch.completion_ids, batch.completion_mask, batch.group_index
    last = layout.prompt_mask.sum(-1).cumsum(0) - 1                         # [G] packed index
    first = h[last][index][:, None]                                         # [B, 1, H]
    rest = _to_padded(h[layout.n_prompt:layout.n_real], layout.input_mask)  # [B, C - 1, H]
    hidden = torch.cat([first, rest], dim=1)                                # [B, C, H]
    return head_logprobs(model, hidden, cids, cmask, temperature, chunk_tokens, with_entropy,
                         grads_in_place, fused)


class PackedLogprobs(torch.nn.Module):
    """``packed_logprobs`` of a policy as a module's forward (the fast path's
    ``logprob_module`` in one process and under DDP, for the architectures it ``supports``).
    ``grads_in_place``, ``fused``: see ``packed_logprobs`` (``grads_in_place`` in one
    process, not under DDP)."""

    def __init__(self, model, grads_in_place: bool = False, fused: bool = False):
        super().__init__()
        self.model = model
        self.grads_in_place = grads_in_place
        self.fused = fused

    def forward(self, batch: GroupBatch, temperature: float = 1.0,
                chunk_tokens: int | None = None, with_entropy: bool = False):
        return packed_logprobs(self.model, batch, temperature, chunk_tokens, with_entropy,
                               self.grads_in_place, self.fused)
