"""Deterministic stand-ins for a tokenizer, task and engine, to check algorithms by hand.

Token id i is the character chr(i); the engine answers each prefix with continuations
fixed in advance, so every value and advantage can be worked out on paper.
"""

from nanovppo.engines.base import Completion, Sampling
from nanovppo.rollout import Rollouts, RolloutSource
from nanovppo.tasks.base import Reward

import torch


class CharTokenizer:
    pad_token_id = 0
    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 1)


def ids(text):
    return [ord(ch) for ch in text]


class ScriptedEngine:
    """``script[prefix text] = [continuation texts]``; records every call."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, sampling: Sampling, max_new_tokens=None):
        self.calls.append((prompts, sampling, max_new_tokens))
        out = []
        for p in prompts:
            conts = self.script["".join(chr(i) for i in p)]
            assert len(conts) == sampling.n
            out.append([Completion(ids(c), c, "length" if c.endswith("~") else "stop",
                                   None, list(p)) for c in conts])
        return out


class EndsWithDTask:
    """reward = 1 if the response ends with "d", + 0.5 if it starts with "a"."""

    prefill = ""
    stop = ()

    def reward(self, response, example):
        total = float(response.endswith("d")) + 0.5 * float(response.startswith("a"))
        return Reward(total, {"answer": total})

    def final_answer(self, response):
        return response[-1:] or None


def rollouts(prompt, completions, task=EndsWithDTask()):
    """A Rollouts of one prompt (text) and its completions (texts)."""
    group = [Completion(ids(c), c, "length" if c.endswith("~") else "stop", None, ids(prompt))
             for c in completions]
    rewards = torch.tensor([[task.reward(c, {}).total for c in completions]])
    return Rollouts([{}], [ids(prompt)], [group], rewards, {})


def source(engine, task=EndsWithDTask(), max_new_tokens=8):
    return RolloutSource(task, CharTokenizer(), engine,
                         Sampling(n=2, temperature=1.0, max_new_tokens=max_new_tokens))
