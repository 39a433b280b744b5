"""VinePPO (Kazemnejad et al., arXiv 2410.01679): PPO with Monte-Carlo values instead of a
critic.

Each sampled response is split into reasoning steps (``algos/steps.py``). The value of a
state s_t (the prompt plus the response's first t steps) is the mean score of ``K``
continuations the current policy samples from it through the rollout engine, each scored
on the *whole* response (prefix + continuation); a continuation that runs out of tokens
scores ``unfinished_penalty`` instead, as does a response cut at the budget. Step t's
advantage is V(s_{t+1}) - V(s_t), the last value being the response's own score, and every
token of the step carries it. Advantages are whitened over all tokens of the batch (every
rank's), the loss is PPO-clip (``algos/pg.py``) with a KL term summed over each sequence's
tokens and averaged over sequences, as the official code does.

The states are token-level: prompt ids + the first k completion ids, so a continuation goes
on exactly from the tokens the policy produced; step boundaries are found on characters
and mapped to tokens through the tokenizer's offsets. All states of a step go to the
engine in one call, identical ones once (every response of a prompt shares the prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nanovppo.algos.grpo import whiten_over_tokens
from nanovppo.algos.pg import PolicyGradient
from nanovppo.algos.steps import SPLITTERS, split_steps
from nanovppo.engines.base import Sampling
from nanovppo.errors import ConfigError
from nanovppo.rollout import Rollouts, Sample


def token_ends(tokenizer, token_ids: list[int], text: str | None = None) -> list[int]:
    """Character end of each token in the decoded text, in time linear in its length.

    The decoded text is encoded again with the tokenizer's offsets; where that gives back
    the same ids (the usual case) the offsets are the answer. Where it does not (a policy
    may sample a tokenization the tokenizer would not choose), each token's end is the
    length of the decoded prefix up to it. Special tokens (EOS) end where the text ends.
    """
    if text is None:
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = len(token_ids)
    while n and token_ids[n - 1] in special:
        n -= 1
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        same = list(enc["input_ids"]) == list(token_ids[:n])
    except (NotImplementedError, TypeError, ValueError, KeyError):  # no offsets (slow tokenizers)
        same = False
    if same:
        ends, last = [], 0
        for _, end in enc["offset_mapping"]:
            last = max(last, end)
            ends.append(last)
    else:
        ends = [len(tokenizer.decode(token_ids[:i + 1], skip_special_tokens=True))
                for i in range(n)]
    return ends + [len(text)] * (len(token_ids) - n)


def step_token_bounds(char_spans: list[tuple[int, int]], ends: list[int]) -> list[int]:
    """Token counts at which steps start: [0, k_1, ..., k_m] with k_m = len(tokens).

    A step starts at the first token that ends after the previous step's end; steps that
    would get no token are merged into the next.
    """
    n = len(ends)
    bounds = [0]
    for _, end in char_spans[:-1]:
        k = sum(1 for e in ends if e <= end)
        if bounds[-1] < k < n:
            bounds.append(k)
    bounds.append(n)
    return bounds if n > 0 else [0]


def prefix_key(c, k: int) -> tuple[int, ...]:
    """The state after the first ``k`` tokens of completion ``c``: prompt + those tokens."""
    return tuple(c.prompt_ids) + tuple(c.token_ids[:k])


def step_advantages(values: list[float]) -> list[float]:
    """Advantages of steps 0..m-1 from values V(s_0) .. V(s_m).

    >>> step_advantages([0.5, 0.75, 1.0])
    [0.25, 0.25]
    """
    return [b - a for a, b in zip(values, values[1:])]


@dataclass
class VinePPO(PolicyGradient):
    """``algo=vppo``: see conf/algo/vppo.yaml for what each field does."""

    mc_rollouts: int
    splitter: str
    max_steps: int
    min_step_chars: int
    chunk_tokens: int
    unfinished_penalty: float
    whiten_advantages: bool
    prompt_value: str
    kl_in_reward = False  # the KL, if any, is a loss term

    def __post_init__(self):
        super().__post_init__()
        if self.splitter not in SPLITTERS:
            raise ConfigError(f"algo.splitter={self.splitter!r}; use one of {SPLITTERS}")
        if self.mc_rollouts < 1:
            raise ConfigError("algo.mc_rollouts must be at least 1")
        if self.group_size < 1:
            raise ConfigError("algo.group_size must be at least 1")
        if self.prompt_value not in ("mc", "group"):
            raise ConfigError(f"algo.prompt_value={self.prompt_value!r}; use mc or group")
        if self.prompt_value == "group" and self.group_size < 2:
            raise ConfigError("algo.prompt_value=group values the prompt with the group's "
                              "other responses: it needs algo.group_size of at least 2")

    def split(self, tokenizer, token_ids: list[int]) -> list[int]:
        """Token bounds of the steps of one completion."""
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        ends = token_ends(tokenizer, token_ids, text)
        spans = split_steps(text, self.splitter, max_steps=self.max_steps,
                            min_chars=self.min_step_chars, token_ends=ends,
                            chunk_tokens=self.chunk_tokens)
        return step_token_bounds(spans, ends) if spans else [0, len(token_ids)]

    def score(self, source, completion_ids: list[int], finish_reason: str, example) -> float:
        """A continued response's score: its total reward, or ``unfinished_penalty`` if it
        was cut at the token budget."""
        if finish_reason == "length":
            return self.unfinished_penalty
        text = source.tokenizer.decode(completion_ids, skip_special_tokens=True)
        return source.score_text(text, example)

    def make_samples(self, ro: Rollouts, source) -> tuple[list[Sample], dict]:
        t0 = time.perf_counter()
        tok, max_new = source.tokenizer, source.sampling.max_new_tokens
        # 1. steps of every response, as token bounds
        flat = [(g, c) for g, group in enumerate(ro.groups) for c in group]
        bounds = [self.split(tok, c.token_ids) for _, c in flat]
        n = ro.rewards.shape[1]
        finals = [self.unfinished_penalty if c.finish_reason == "length"
                  else ro.rewards[g, i % n].item() for i, (g, c) in enumerate(flat)]
        # 2. one request per distinct prefix (state) that needs a value: all but the last,
        # and not the prompt if the group's other responses value it (prompt_value=group)
        by_group = _leave_one_out(flat, finals) if self.prompt_value == "group" else {}
        keys, requests, budgets, owner = states(flat, bounds, max_new, by_group)
        # 3. K continuations of each state, each scored on the whole response
        value, n_cont, n_unfinished, sampling_s = self.values(ro, source, requests, budgets, owner)
        # 4. advantages per step, spread over the step's tokens
        samples, per_token_all, prompt_values = [], [], []
        for i, ((g, c), b) in enumerate(zip(flat, bounds)):
            final = finals[i]
            vals = [by_group[i] if k == 0 and i in by_group else value[keys[prefix_key(c, k)]]
                    for k in b[:-1]]
            prompt_values.append(vals[0] if vals else final)
            per_token = torch.zeros(len(c.token_ids))
            for t, a in enumerate(step_advantages(vals + [final])):
                per_token[b[t]:b[t + 1]] = a
            per_token_all.append(per_token)
            samples.append(Sample(c.prompt_ids, c.token_ids, None, final,
                                  c.finish_reason == "length", g, c.logprobs))
        if self.whiten_advantages:
            per_token_all = whiten_over_tokens(per_token_all)
        for s, a in zip(samples, per_token_all):
            s.advantage = a.tolist()
        metrics = {"train/states_valued": float(len(requests)),
                   "train/continuations": float(n_cont),
                   "train/continuation_unfinished_frac": n_unfinished / max(n_cont, 1),
                   "train/steps_per_response": sum(len(b) - 1 for b in bounds) / max(len(bounds), 1),
                   "train/value_prompt_mean": sum(prompt_values) / max(len(prompt_values), 1),
                   "perf/value_sampling_s": sampling_s,
                   "perf/value_estimation_s": time.perf_counter() - t0}
        return samples, metrics

    def values(self, ro: Rollouts, source, requests, budgets, owner):
        """Each state's Monte-Carlo value: the mean score of ``mc_rollouts`` continuations
        sampled from it (prefix + continuation scored as a whole response); also the number
        of continuations, of those cut at the token budget, and the seconds of sampling."""
        sampling = Sampling(n=self.mc_rollouts, temperature=source.sampling.temperature,
                            top_p=source.sampling.top_p, max_new_tokens=source.sampling.max_new_tokens,
                            stop=source.sampling.stop, logprobs=False)  # scored as text
        t0 = time.perf_counter()
        conts = source.engine.generate(requests, sampling, max_new_tokens=budgets) if requests else []
        sampling_s = time.perf_counter() - t0
        value = [0.0] * len(requests)
        n_cont = n_unfinished = 0
        for i, group in enumerate(conts):
            g, c, k = owner[i]
            scores = [self.score(source, c.token_ids[:k] + cont.token_ids, cont.finish_reason,
                                 ro.examples[g]) for cont in group]
            n_cont += len(group)
            n_unfinished += sum(cont.finish_reason == "length" for cont in group)
            value[i] = sum(scores) / len(scores)
        return value, n_cont, n_unfinished, sampling_s


def _leave_one_out(flat, finals: list[float]) -> dict[int, float]:
    """V(prompt) for each response of a group of two or more: the mean final score of the
    group's other responses, each of them a Monte-Carlo continuation from the prompt (its
    own score left out, so that its first step's advantage does not contain itself)."""
    members: dict[int, list[int]] = {}
    for i, (g, _) in enumerate(flat):
        members.setdefault(g, []).append(i)
    out = {}
    for rows in members.values():
        if len(rows) > 1:
            total = sum(finals[i] for i in rows)
            out.update({i: (total - finals[i]) / (len(rows) - 1) for i in rows})
    return out


def states(flat, bounds, max_new: int, valued: dict[int, float] | None = None):
    """The states to value: one per distinct prefix (prompt + the response up to a step
    boundary, the last boundary excluded), but not the prompt of the responses in
    ``valued`` (their V(prompt) is known). Returns (prefix -> request index, the requests'
    token ids, each one's remaining token budget, and for each (group, a response with that
    prefix, the prefix length))."""
    keys: dict[tuple[int, ...], int] = {}
    requests: list[list[int]] = []
    budgets: list[int] = []
    owner: list[tuple] = []
    for i, ((g, c), b) in enumerate(zip(flat, bounds)):
        for k in b[:-1]:
            if k == 0 and valued and i in valued:
                continue
            key = prefix_key(c, k)
            if key not in keys:
                keys[key] = len(requests)
                requests.append(list(key))
                budgets.append(max(1, max_new - k))
                owner.append((g, c, k))
    return keys, requests, budgets, owner
