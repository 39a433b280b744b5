"""Deterministic stand-ins for a tokenizer, task and engine, to check algorithms by hand.

Token id i is the character chr(i); the engine answers each prefix with continuations
fixed in advance, so every value and advantage can be worked out on paper.
"""

from nanovppo.engines.base import Completion, Sampling
from nanovppo.rollout import RolloutSource, score
from nanovppo.tasks.base import Reward



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
    """Correct if the response ends with "d"; shaping "a" pays 0.5 if it starts with "a".
    So the total reward is 1 + 0.5 for "ad", 1 for "bd", 0.5 for "ax", 0 for "zz"."""

    prefill = ""
    stop = ()

    def reward(self, response, example):
        return Reward(response.endswith("d"), {"a": 0.5 * float(response.startswith("a"))})

    def final_answer(self, response):
        return response[-1:] or None

    def solution_key(self, response):
        return response


def rollouts(prompt, completions, task=EndsWithDTask()):
    """A Rollouts of one prompt (text) and its completions (texts), scored by ``task``."""
    return batch({prompt: completions}, task)


def batch(groups: dict, task=EndsWithDTask()):
    """A Rollouts of several prompts: ``{prompt text: [completion texts]}``."""
    made = [[Completion(ids(c), c, "length" if c.endswith("~") else "stop", None, ids(p))
             for c in cs] for p, cs in groups.items()]
    return score(task, [{} for _ in groups], [ids(p) for p in groups], made)


def source(engine, task=EndsWithDTask(), max_new_tokens=8):
    return RolloutSource(task, CharTokenizer(), engine,
                         Sampling(n=2, temperature=1.0, max_new_tokens=max_new_tokens))
