"""Per-token log-probabilities of completions under a causal LM.

Logits are computed only at the positions that predict completion tokens and in chunks of
rows; when gradients are needed each chunk is recomputed in the backward pass
(``torch.utils.checkpoint``), so no [batch, seq, vocab] float32 tensor is ever held.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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
                    temperature: float) -> torch.Tensor:
    logits = F.linear(hidden, weight).float() / temperature   # [b, C, V]
    logz = torch.logsumexp(logits, dim=-1)                     # [b, C]
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logz  # [b, C]


@torch.no_grad()
def _chunk_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = F.log_softmax(F.linear(hidden, weight).float() / temperature, dim=-1)  # [b, C, V]
    return -(logp.exp() * logp).sum(-1)                                          # [b, C]


def completion_logprobs(model, batch: Batch, temperature: float = 1.0, chunk_rows: int = 4,
                        with_entropy: bool = False):
    """Log-probs [B, C] of the completion tokens (and their entropy [B, C] if asked)."""
    ids, attn, P = batch.input_ids, batch.attention_mask, batch.prompt_width
    positions = (attn.cumsum(-1) - 1).clamp(min=0)                        # [B, P + C]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn,
                                 position_ids=positions).last_hidden_state  # [B, P + C, H]
    hidden = hidden[:, P - 1:-1]                                           # [B, C, H]
    targets = ids[:, P:]                                                   # [B, C]
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("output heads with a bias are not supported")
    weight = head.weight
    logps, ents = [], []
    for i in range(0, ids.shape[0], chunk_rows):
        h, t = hidden[i:i + chunk_rows], targets[i:i + chunk_rows]
        if torch.is_grad_enabled():
            logps.append(checkpoint(_chunk_logprobs, h, weight, t, temperature,
                                    use_reentrant=False))
        else:
            logps.append(_chunk_logprobs(h, weight, t, temperature))
        if with_entropy:
            ents.append(_chunk_entropy(h.detach(), weight.detach(), temperature))
    logp = torch.cat(logps) * batch.completion_mask                       # [B, C]
    if with_entropy:
        return logp, torch.cat(ents) * batch.completion_mask
    return logp
