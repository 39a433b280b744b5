"""Per-token log-probabilities of completions under a causal LM.

Logits are computed only at the positions that predict completion tokens and in chunks of
rows; when gradients are needed each chunk is recomputed in the backward pass
(``torch.utils.checkpoint``), so no [batch, seq, vocab] float32 tensor is ever held.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicLayer


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


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` and the entropy of the distributions, both [b, C]."""
    logits = F.linear(hidden, weight).float() / temperature        # [b, C, V]
    logz = torch.logsumexp(logits, dim=-1)                          # [b, C]
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logz  # [b, C]
    with torch.no_grad():
        probs = torch.exp(logits - logz[..., None])                 # [b, C, V]
        entropy = logz - (probs * logits).sum(-1)                   # [b, C]
    return logp, entropy


def completion_logprobs(model, batch: Batch, temperature: float = 1.0, chunk_rows: int = 4,
                        with_entropy: bool = False):
    """Log-probs [B, C] of the completion tokens (and their entropy [B, C] if asked)."""
    ids, attn, P = batch.input_ids, batch.attention_mask, batch.prompt_width
    positions = (attn.cumsum(-1) - 1).clamp(min=0)                        # [B, P + C]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn,
                                 position_ids=positions).last_hidden_state  # [B, P + C, H]
    hidden = hidden[:, P - 1:-1]                                           # [B, C, H]
    targets = ids[:, P:]                                                   # [B, C]
    return _head_logprobs(model, hidden, targets, batch.completion_mask, temperature,
                          chunk_rows, with_entropy)


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


def group_logprobs(model, batch: GroupBatch, temperature: float = 1.0, chunk_rows: int = 4,
                   with_entropy: bool = False):
    """Like ``completion_logprobs``, but each prompt is run once for its whole group.

    The prompt's keys and values (with their autograd history) are computed once and
    shared by its completions, so a group of n samples costs one prompt forward and
    backward instead of n: for GRPO on short completions most of the tokens are prompt.
    """
    decoder = model.get_decoder()
    pids, pmask, cids, cmask, index = batch
    n_layers = _attention_layers(model)
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)                              # [G, P]
    cache = Cache(layers=[_PrefixLayer() for _ in range(n_layers)])
    h_prompt = decoder(input_ids=pids, attention_mask=pmask, position_ids=ppos,
                       past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # [G, H]
    shared = Cache(layers=[_PrefixLayer((layer.keys[index], layer.values[index]))  # [B, ...]
                           for layer in cache.layers])
    attn = torch.cat([pmask[index], cmask.long()], dim=1)                   # [B, P + C]
    cpos = ppos[index, -1:] + 1 + torch.arange(cids.shape[1])[None]         # [B, C]
    h_comp = decoder(input_ids=cids, attention_mask=attn, position_ids=cpos,
                     past_key_values=shared, use_cache=True).last_hidden_state  # [B, C, H]
    # The state before completion token j is the prompt's last state (j = 0) or the
    # completion's state at j - 1.
    hidden = torch.cat([h_prompt[index][:, None], h_comp[:, :-1]], dim=1)  # [B, C, H]
    return _head_logprobs(model, hidden, cids, cmask, temperature, chunk_rows, with_entropy)


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


def _head_logprobs(model, hidden, targets, cmask, temperature, chunk_rows, with_entropy):
    """Apply the output head to ``hidden`` [B, C, H] in chunks of rows; see module doc."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("output heads with a bias are not supported")
    logps, ents = [], []
    for i in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[i:i + chunk_rows], targets[i:i + chunk_rows]
        if torch.is_grad_enabled():
            logp, ent = checkpoint(_chunk_logprobs, h, head.weight, t, temperature,
                                   use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs(h, head.weight, t, temperature)
        logps.append(logp)
        ents.append(ent)
    logp = torch.cat(logps) * cmask                                  # [B, C]
    if with_entropy:
        return logp, torch.cat(ents) * cmask
    return logp


class GroupLogprobs(torch.nn.Module):
    """``group_logprobs`` of a policy as a module's forward.

    The trainer wraps this module (not the policy) in DDP or FSDP2, so that every forward
    of an update, the prompt pass, the completion pass and the output head, runs inside
    one ``forward`` call: where DDP prepares its gradient reduction and FSDP2 gathers the
    root's parameters (embeddings, final norm, tied head).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: GroupBatch, temperature: float = 1.0, chunk_rows: int = 4,
                with_entropy: bool = False):
        return group_logprobs(self.model, batch, temperature, chunk_rows, with_entropy)
