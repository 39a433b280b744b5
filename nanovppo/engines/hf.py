"""Rollouts on a transformers model in this process, sharing the policy's module.

The sampling loop drives the model's forward with transformers' ``DynamicCache`` rather
than ``model.generate``, because it needs three things ``generate`` does not give cleanly:
the exact log-probability of each sampled token at the sampling temperature, a finish
reason that tells EOS from a stop string (SmolLM2's pad token *is* its EOS), and a prompt
prefilled once and shared by its ``n`` samples (``batch_repeat_interleave`` of the KV
cache) instead of being prefilled ``n`` times. Finished rows are dropped from the batch as
they finish, so short completions do not pay for long ones.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from typing import Iterable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from nanovppo.engines.base import Completion, Sampling, full_tensor
from nanovppo.lora import is_lora, merged_model
from nanovppo.models import to_dtype
from nanovppo.progress import bar


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Sample one token per row from ``probs`` [B, V], restricted to the top-p nucleus."""
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)  # [B, V]
        outside = sorted_p.cumsum(-1) - sorted_p > top_p     # keep the token that crosses p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)  # [B, 1]
        return idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


class HFEngine:
    """The ``hf`` inference backend (see ``conf/inference_backend/hf.yaml``)."""

    name = "hf"
    # It samples with the trainer's own model code and dtype: no mismatch to correct.
    trainer_numerics = True

    def __init__(self, model, tokenizer, seed: int, *, name: str, max_batch: int,
                 dtype: str | None, attn_implementation: str | None,
                 autocast_dtype: str | torch.dtype | None, share_prefix: bool,
                 copy_model: bool = False):
        """Every option comes from ``conf/inference_backend/hf.yaml`` (no defaults here).
        Sample from ``model`` itself (temperature 0 decodes greedily), or from a copy of it
        in ``dtype`` when that differs from the policy's (decoding is memory-bound on CPU, so a bf16 copy of an fp32 policy
        samples ~1.5x faster; ``update_weights`` then copies the trained weights in).
        ``copy_model`` asks for a copy in any case (the trainer does under FSDP2, where the
        policy's own parameters are sharded across ranks)."""
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.autocast_dtype = (to_dtype(autocast_dtype) if isinstance(autocast_dtype, str)
                               else autocast_dtype)
        policy_dtype = next(model.parameters()).dtype
        self.shares_policy = not copy_model and (dtype is None or to_dtype(dtype) == policy_dtype)
        if self.shares_policy:
            self.model = model
        else:  # with LoRA the copy is the merged model; update_weights sends merged weights
            self.model = (merged_model(model) if is_lora(model) else copy.deepcopy(model)).to(
                to_dtype(dtype) if dtype else policy_dtype)
            self.model.requires_grad_(False)
            if attn_implementation:
                self.model.config._attn_implementation = attn_implementation
        # A shared policy decodes with this attention and trains with its own.
        self.attn_implementation = attn_implementation
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = False  # the trainer turns the decoding bar on
        # Prefill a prompt once for all its samples (False: once per sample, to measure).
        self.share_prefix = share_prefix
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
        return {i for i in ids if i is not None}

    # -- protocol -------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 max_new_tokens: list[int] | None = None) -> list[list[Completion]]:
        """``sampling.n`` completions of each prompt; ``max_new_tokens`` optionally gives
        each prompt its own budget (at most ``sampling.max_new_tokens``)."""
        budgets = max_new_tokens or [sampling.max_new_tokens] * len(prompts)
        if not self.share_prefix and sampling.n > 1:  # prefill every sample on its own
            flat = self.generate([p for p in prompts for _ in range(sampling.n)],
                                 replace(sampling, n=1), [b for b in budgets for _ in range(sampling.n)])
            return [[g[0] for g in flat[i:i + sampling.n]] for i in range(0, len(flat), sampling.n)]
        per_call = max(1, self.max_batch // sampling.n)  # prompts per forward batch
        out: list[list[Completion]] = []
        was_training = self.model.training
        config = self.model.config
        trains_with = config._attn_implementation
        self.model.eval()
        try:
            if self.attn_implementation:
                config._attn_implementation = self.attn_implementation
            for i in range(0, len(prompts), per_call):
                out.extend(self._generate_batch(prompts[i:i + per_call], sampling,
                                                budgets[i:i + per_call]))
        finally:
            self.model.train(was_training)
            config._attn_implementation = trains_with
        return out

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] = ()) -> None:
        """Copy trained weights into the engine's copy; nothing to do when it shares the policy."""
        if self.shares_policy:
            return
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            params[name].copy_(full_tensor(tensor))

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> list[float]:
        """Log-probs at temperature 1 of ``token_ids[1:]``, each given the ones before it,
        with the engine's model and numerics."""
        device = next(self.model.parameters()).device
        ids = torch.tensor([list(map(int, token_ids))], device=device)
        with self._autocast():
            logits = self.model(input_ids=ids).logits[0, :-1].float()        # [T - 1, V]
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        self.model = None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    # -- sampling loop --------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], sp: Sampling,
                        budgets: list[int]) -> list[list[Completion]]:
        device = next(self.model.parameters()).device
        cache, logits, mask, last_pos = self._prefill(prompts, sp.n, device)
        batch = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logps: list[list[float]] = [[] for _ in range(batch)]
        finish = ["length"] * batch
        budget = [min(b, sp.max_new_tokens) for b in budgets for _ in range(sp.n)]
        alive = torch.arange(batch)  # original row of each row still in the batch
        stop_window = max((len(s) for s in sp.stop), default=0) + 2

        greedy = sp.temperature == 0
        temperature = 1.0 if greedy else sp.temperature
        # Counts the tokens generated (one per sequence still running at each decoding
        # step), so its rate is tokens per second.
        generated = bar(self.progress, desc="rollout", unit="tok", leave=False)
        for step in range(sp.max_new_tokens):
            generated.update(len(alive))
            logp = F.log_softmax(logits.float() / temperature, dim=-1)     # [b, V]
            if greedy:
                tok = logp.argmax(-1)                                      # [b]
            else:
                tok = sample_top_p(logp.exp(), sp.top_p, self.generator)  # [b]
            tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)           # [b]
            keep = []
            for j, (row, t, lp) in enumerate(zip(alive.tolist(), tok.tolist(), tok_logp.tolist())):
                tokens[row].append(t)
                logps[row].append(lp)
                if t in self.eos_ids or (sp.stop and self._hit_stop(tokens[row], sp.stop, stop_window)):
                    finish[row] = "stop"
                elif len(tokens[row]) < budget[row]:
                    keep.append(j)
            if not keep or step == sp.max_new_tokens - 1:
                break
            if len(keep) < len(alive):
                sel = torch.tensor(keep, device=device)
                cache.batch_select_indices(sel)
                alive, tok, mask, last_pos = alive[keep], tok[sel], mask[sel], last_pos[sel]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            last_pos = last_pos + 1
            with self._autocast():
                logits = self.model(input_ids=tok[:, None], attention_mask=mask,
                                    position_ids=last_pos[:, None], past_key_values=cache,
                                    use_cache=True).logits[:, -1]

        generated.close()
        out = []
        for p, prompt in enumerate(prompts):
            rows = range(p * sp.n, (p + 1) * sp.n)
            out.append([Completion(token_ids=tokens[r], finish_reason=finish[r],
                                   text=self.tokenizer.decode(tokens[r], skip_special_tokens=True),
                                   logprobs=logps[r], prompt_ids=list(prompt)) for r in rows])
        return out

    def _prefill(self, prompts: list[list[int]], n: int, device):
        """Run the prompts (left-padded) once and copy each one's KV cache to its ``n``
        samples; returns the cache, the next-token logits [P * n, V], the attention mask
        [P * n, W] and each row's last position [P * n]."""
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, W]
        cache = DynamicCache(config=self.model.config)
        with self._autocast():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1]  # [P, V]
        cache.batch_repeat_interleave(n)
        return (cache, logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0),
                positions[:, -1].repeat_interleave(n, 0))

    def _hit_stop(self, toks: list[int], stops, window: int) -> bool:
        tail = self.tokenizer.decode(toks[-window:], skip_special_tokens=False)
        return any(s in tail for s in stops)
