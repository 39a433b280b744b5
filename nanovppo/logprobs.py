"""Per-token log-probabilities of completions under a causal LM, two ways.

``PlainLogprobs`` (``trainer.fast: false``) runs each completion with its own copy of its
prompt and takes the full log-softmax: the textbook version. ``GroupLogprobs`` (the fast
path) runs each prompt once for its group (``group_logprobs``: the completions continue
from the prompt's keys and values) and scores only the real completion tokens through the
output head in chunks (``nanovppo/head.py``): no [batch, seq, vocab] float32 tensor is
ever held. Both take a ``GroupBatch`` and give the same log-probs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicLayer

from nanovppo.head import head_logprobs


class Batch(NamedTuple):
    """A padded training micro-batch: prompt left-padded, completion right-padded."""

    input_ids: torch.Tensor       # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C]
    completion_mask: torch.Tensor  # [B, C] 1 on real completion tokens
    prompt_width: int             # P


def pad_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """Left-pad prompts and right-pad completions to the widest in this batch."""
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    B = len(prompts)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    cmask = torch.zeros((B, C), dtype=torch.float32)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        ids[r, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        ids[r, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[r, P - len(p):P + len(c)] = 1
        cmask[r, :len(c)] = 1.0
    return Batch(ids, attn, cmask, P)


def completion_logprobs(model, batch: Batch, temperature: float = 1.0,
                        chunk_tokens: int | None = None, with_entropy: bool = False):
    """Log-probs [B, C] of the completion tokens (and their entropy [B, C] if asked)."""
    ids, attn, P = batch.input_ids, batch.attention_mask, batch.prompt_width
    positions = (attn.cumsum(-1) - 1).clamp(min=0)                        # [B, P + C]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn,
                                 position_ids=positions).last_hidden_state  # [B, P + C, H]
    hidden = hidden[:, P - 1:-1]                                           # [B, C, H]
    targets = ids[:, P:]                                                   # [B, C]
    return head_logprobs(model, hidden, targets, batch.completion_mask, temperature,
                          chunk_tokens, with_entropy)


class GroupBatch(NamedTuple):
    """Micro-batch of whole groups: each prompt once, then its completions."""

    prompt_ids: torch.Tensor       # [G, P] left-padded
    prompt_mask: torch.Tensor      # [G, P]
    completion_ids: torch.Tensor   # [B, C] right-padded, B = sum of group sizes
    completion_mask: torch.Tensor  # [B, C] float, 1 on real tokens
    group_index: torch.Tensor      # [B] the group (prompt row) of each completion


def pad_groups(prompts: list[list[int]], completions: list[list[list[int]]], pad_id: int) -> GroupBatch:
    G, P = len(prompts), max(len(p) for p in prompts)
    flat = [c for group in completions for c in group]
    B, C = len(flat), max(1, max(len(c) for c in flat))
    pids = torch.full((G, P), pad_id, dtype=torch.long)
    pmask = torch.zeros((G, P), dtype=torch.long)
    for g, p in enumerate(prompts):
        pids[g, P - len(p):] = torch.tensor(p, dtype=torch.long)
        pmask[g, P - len(p):] = 1
    cids = torch.full((B, C), pad_id, dtype=torch.long)
    cmask = torch.zeros((B, C), dtype=torch.float32)
    for r, c in enumerate(flat):
        cids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[r, :len(c)] = 1.0
    index = torch.tensor([g for g, group in enumerate(completions) for _ in group])
    return GroupBatch(pids, pmask, cids, cmask, index)


class _PrefixLayer(DynamicLayer):
    """One layer's keys/values for ``group_logprobs``, with an ``update`` that gives the same
    result however often a forward runs: activation checkpointing (``checkpoint_layers``)
    runs each layer's forward again in the backward pass, and a growing cache would then
    append the same keys twice. With a ``prefix`` the layer returns prefix + new states
    and stores nothing (the completion pass); without one it records the new states,
    replacing what it held (the prompt pass)."""

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.prefix = prefix
        if prefix is not None:
            self.lazy_initialization(*prefix)
            self.keys, self.values = prefix

    def update(self, key_states, value_states, *args, **kwargs):
        if self.prefix is None:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        return (torch.cat([self.prefix[0], key_states], dim=-2),
                torch.cat([self.prefix[1], value_states], dim=-2))


def _attention_layers(model) -> int:
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise NotImplementedError(f"group_logprobs supports full attention only, not {kinds}")
    return config.num_hidden_layers


class _PromptBoundary(torch.autograd.Function):
    """Splits an update's backward pass in two: the completion pass's, then the prompt
    pass's.

    Every weight is used by both passes. In one backward pass autograd holds the
    completion pass's gradient of each weight until the prompt pass's part arrives, at the
    end: a whole model's worth of gradients held at once (~0.45 GB in fp32 for SmolLM2),
    above the accumulated ones. Here the completion pass reads detached copies of the
    prompt's outputs (keys, values, last hidden state), so its weight gradients are
    accumulated as soon as each layer is done; once the copies' gradients are all in,
    ``backward`` runs the prompt pass's own backward (a nested one, as reentrant
    checkpointing does). One process only: DDP and FSDP2 reduce each gradient once per
    backward pass.
    """

    @staticmethod
    def forward(ctx, prompt_outputs, *detached):
        ctx.prompt_outputs = prompt_outputs  # with their history; not autograd inputs
        return tuple(t.view_as(t) for t in detached)

    @staticmethod
    def backward(ctx, *grads):
        pairs = [(t, g) for t, g in zip(ctx.prompt_outputs, grads)
                 if g is not None and t.requires_grad]
        ctx.prompt_outputs = None
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        return (None,) * (1 + len(grads))


def _split_at_prompt(h_prompt, keys, values):
    outputs = [h_prompt, *keys, *values]
    detached = [t.detach().requires_grad_() for t in outputs]
    split = _PromptBoundary.apply(outputs, *detached)
    n = len(keys)
    return split[0], list(split[1:1 + n]), list(split[1 + n:])


def group_logprobs(model, batch: GroupBatch, temperature: float = 1.0,
                   chunk_tokens: int | None = None, with_entropy: bool = False,
                   split_backward: bool = False, fused: bool = False):
    """Like ``completion_logprobs``, but each prompt is run once for its whole group.

    The prompt's keys and values (with their autograd history) are computed once and
    shared by its completions, so a group of n samples costs one prompt forward and
    backward instead of n: for GRPO on short completions most of the tokens are prompt.
    ``split_backward`` runs the completion pass's backward before the prompt pass's
    (``_PromptBoundary``): the same gradients with a lower peak, in one process.
    ``fused``: the head's vocabulary-wide work compiled (``nanovppo/kernels.py``).
    """
    decoder = model.get_decoder()
    pids, pmask, cids, cmask, index = batch
    n_layers = _attention_layers(model)
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)                              # [G, P]
    cache = Cache(layers=[_PrefixLayer() for _ in range(n_layers)])
    h_prompt = decoder(input_ids=pids, attention_mask=pmask, position_ids=ppos,
                       past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # [G, H]
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    if split_backward and torch.is_grad_enabled():
        h_prompt, keys, values = _split_at_prompt(h_prompt, keys, values)
    shared = Cache(layers=[_PrefixLayer((k[index], v[index]))              # [B, ...]
                           for k, v in zip(keys, values)])
    attn = torch.cat([pmask[index], cmask.long()], dim=1)                   # [B, P + C]
    cpos = ppos[index, -1:] + 1 + torch.arange(cids.shape[1])[None]         # [B, C]
    h_comp = decoder(input_ids=cids, attention_mask=attn, position_ids=cpos,
                     past_key_values=shared, use_cache=True).last_hidden_state  # [B, C, H]
    # The state before completion token j is the prompt's last state (j = 0) or the
    # completion's state at j - 1.
    hidden = torch.cat([h_prompt[index][:, None], h_comp[:, :-1]], dim=1)  # [B, C, H]
    return head_logprobs(model, hidden, cids, cmask, temperature, chunk_tokens, with_entropy,
                         fused=fused)


def checkpoint_layers(model, layers: list[torch.nn.Module]) -> None:
    """Activation checkpointing: keep only each decoder layer's input in the forward pass
    and recompute the layer in the backward pass (less memory for ~1/3 more compute).

    transformers' own ``gradient_checkpointing_enable`` turns the key/value cache off in
    training, which ``group_logprobs`` needs to share a prompt with its completions; this
    wraps each layer's forward instead (the cache's layers are safe to re-run, see
    ``_PrefixLayer``). Without gradients (sampling, old log-probs) layers run as usual.
    """
    for layer in layers:
        if getattr(layer, "_nanovppo_checkpointed", False):
            continue
        layer.forward = functools.partial(_checkpointed, layer.forward)
        layer._nanovppo_checkpointed = True


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


class GroupLogprobs(torch.nn.Module):
    """``group_logprobs`` of a policy as a module's forward.

    The trainer wraps this module (not the policy) in DDP or FSDP2, so that every forward
    of an update, the prompt pass, the completion pass and the output head, runs inside
    one ``forward`` call: where DDP prepares its gradient reduction and FSDP2 gathers the
    root's parameters (embeddings, final norm, tied head).
    """

    def __init__(self, model, split_backward: bool = False, fused: bool = False):
        super().__init__()
        self.model = model
        self.split_backward = split_backward
        self.fused = fused

    def forward(self, batch: GroupBatch, temperature: float = 1.0,
                chunk_tokens: int | None = None, with_entropy: bool = False):
        return group_logprobs(self.model, batch, temperature, chunk_tokens, with_entropy,
                              self.split_backward, self.fused)


class PlainLogprobs(torch.nn.Module):
    """The plain path (``trainer.fast: false``): the same inputs and outputs as
    ``GroupLogprobs``, computed the way a textbook would. Every completion is run with its
    own copy of its prompt through the whole model (``model(...).logits``), the
    full-vocabulary log-softmax is taken at every completion position, and autograd
    differentiates all of it. Slower and hungrier ([B, C, vocab] float32 logits), and easy
    to check by eye."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: GroupBatch, temperature: float = 1.0,
                chunk_tokens: int | None = None, with_entropy: bool = False):
        pids, pmask, cids, cmask, index = batch
        ids = torch.cat([pids[index], cids], dim=1)                         # [B, P + C]
        attn = torch.cat([pmask[index], cmask.long()], dim=1)               # [B, P + C]
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=attn, position_ids=positions).logits
        P = pids.shape[1]
        logits = logits[:, P - 1:-1].float() / temperature                  # [B, C, V]
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, cids[..., None])[..., 0] * cmask         # [B, C]
        if not with_entropy:
            return logp
        entropy = -(logp_all.exp() * logp_all).sum(-1) * cmask              # [B, C]
        return logp, entropy.detach()
