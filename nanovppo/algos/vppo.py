"""VinePPO (arXiv 2410.01679): PPO with Monte-Carlo value estimates instead of a critic.

Each sampled response is split into reasoning steps (``algos/steps.py``). The value of a
state (the prompt, or the prompt plus the first t steps) is the mean reward of ``K``
continuations sampled from the current policy through the rollout engine, each scored on
the *whole* response (prefix + continuation). Step t's advantage is
V(s_{t+1}) - V(s_t), the last value being the response's own reward, and every token of
the step carries it. The loss is GRPO's PPO-clip, with token-level advantages.

The prefixes are token-level: prompt ids + the first k completion ids, so a continuation
goes on exactly from the tokens the policy produced. All prefixes of a step go to the
engine in one call, identical ones once (every response of a prompt shares the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovppo.algos.grpo import GRPO
from nanovppo.algos.steps import SPLITTERS, split_steps
from nanovppo.engines.base import Sampling
from nanovppo.errors import ConfigError
from nanovppo.rollout import Rollouts, Sample


def token_ends(tokenizer, token_ids: list[int]) -> list[int]:
    """Character end of each token in the decoded text: ``decode(ids[:i+1])`` has that length."""
    return [len(tokenizer.decode(token_ids[:i + 1], skip_special_tokens=True))
            for i in range(len(token_ids))]


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
class VinePPO(GRPO):
    """``algo=vppo``: see conf/algo/vppo.yaml for what each field does."""

    name: str = "vppo"
    mc_rollouts: int = 4
    splitter: str = "newlines"
    max_steps: int = 4
    min_step_chars: int = 1
    chunk_tokens: int = 16
    truncated_penalty: float = 0.0
    whiten_advantages: bool = False
    group_size: int = 2

    def __post_init__(self):
        if self.splitter not in SPLITTERS:
            raise ConfigError(f"algo.splitter={self.splitter!r}; use one of {SPLITTERS}")
        if self.mc_rollouts < 1:
            raise ConfigError("algo.mc_rollouts must be at least 1")
        if self.group_size < 1:
            raise ConfigError("algo.group_size must be at least 1")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            raise ConfigError(f"algo.loss_agg={self.loss_agg!r} is not known")

    def split(self, tokenizer, token_ids: list[int]) -> list[int]:
        """Token bounds of the steps of one completion."""
        ends = token_ends(tokenizer, token_ids)
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        spans = split_steps(text, self.splitter, max_steps=self.max_steps,
                            min_chars=self.min_step_chars, token_ends=ends,
                            chunk_tokens=self.chunk_tokens)
        return step_token_bounds(spans, ends) if spans else [0, len(token_ids)]

    def make_samples(self, ro: Rollouts, source) -> tuple[list[Sample], dict]:
        tok, max_new = source.tokenizer, source.sampling.max_new_tokens
        # 1. steps of every response, as token bounds
        flat = [(g, c) for g, group in enumerate(ro.groups) for c in group]
        bounds = [self.split(tok, c.token_ids) for _, c in flat]
        # 2. one request per distinct prefix (state) that needs a value: all but the last
        keys: dict[tuple[int, ...], int] = {}
        requests: list[list[int]] = []
        budgets: list[int] = []
        for (g, c), b in zip(flat, bounds):
            for k in b[:-1]:
                key = prefix_key(c, k)
                if key not in keys:
                    keys[key] = len(requests)
                    requests.append(list(key))
                    budgets.append(max(1, max_new - k))
        sampling = Sampling(n=self.mc_rollouts, temperature=source.sampling.temperature,
                            top_p=source.sampling.top_p, max_new_tokens=max_new,
                            stop=source.sampling.stop)
        conts = source.engine.generate(requests, sampling, max_new_tokens=budgets) if requests else []
        # 3. each continuation is scored on the whole response: prefix + continuation
        owner: dict[int, tuple] = {}  # request -> (group, a response with that prefix, k)
        for (g, c), b in zip(flat, bounds):
            for k in b[:-1]:
                owner.setdefault(keys[prefix_key(c, k)], (g, c, k))
        value = [0.0] * len(requests)
        n_cont, n_trunc = 0, 0
        for i, group in enumerate(conts):
            g, c, k = owner[i]
            scores = []
            for cont in group:
                text = tok.decode(c.token_ids[:k] + cont.token_ids, skip_special_tokens=True)
                score = source.score_text(text, ro.examples[g])
                if cont.finish_reason == "length":
                    score -= self.truncated_penalty
                    n_trunc += 1
                scores.append(score)
                n_cont += 1
            value[i] = sum(scores) / len(scores)
        # 4. advantages per step, spread over the step's tokens
        samples, all_adv = [], []
        n = ro.rewards.shape[1]
        for idx, ((g, c), b) in enumerate(zip(flat, bounds)):
            reward = ro.rewards[g, idx % n].item()
            final = reward - (self.truncated_penalty if c.finish_reason == "length" else 0.0)
            vals = [value[keys[prefix_key(c, k)]] for k in b[:-1]]
            adv_steps = step_advantages(vals + [final])
            per_token = [0.0] * len(c.token_ids)
            for t, a in enumerate(adv_steps):
                for j in range(b[t], b[t + 1]):
                    per_token[j] = a
            all_adv.extend(per_token)
            samples.append(Sample(c.prompt_ids, c.token_ids, per_token, reward,
                                  c.finish_reason == "length", g))
        if self.whiten_advantages and len(all_adv) > 1:
            t = torch.tensor(all_adv)
            mean, std = t.mean().item(), t.std(unbiased=False).item() + 1e-6
            for s in samples:
                s.advantage = [(a - mean) / std for a in s.advantage]
        metrics = {"train/value_requests": float(len(requests)),
                   "train/continuations": float(n_cont),
                   "train/continuation_truncated_frac": n_trunc / max(n_cont, 1),
                   "train/steps_per_response": sum(len(b) - 1 for b in bounds) / max(len(bounds), 1),
                   "train/value_prompt_mean": float(sum(value[keys[prefix_key(c, 0)]]
                                                        for _, c in flat) / max(len(flat), 1))}
        return samples, metrics
