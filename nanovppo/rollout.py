"""What passes between the trainer and an algorithm: rollouts in, training samples out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nanovppo.engines.base import Completion, Sampling


@dataclass
class Sample:
    """One completion ready for the update.

    ``advantage`` is one number for every token (GRPO, RFT) or one per completion token
    (VinePPO).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float | list[float]
    reward: float
    truncated: bool
    group: int  # index of the prompt this completion answers


@dataclass
class Rollouts:
    """One batch of prompts, their sampled groups and rewards."""

    examples: list[dict]
    prompts: list[list[int]]
    groups: list[list[Completion]]
    rewards: torch.Tensor                      # [G, n]
    parts: dict[str, list[float]] = field(default_factory=dict)  # per completion, flattened

    def extend(self, other: "Rollouts") -> None:
        self.examples += other.examples
        self.prompts += other.prompts
        self.groups += other.groups
        self.rewards = torch.cat([self.rewards, other.rewards])
        for k, v in other.parts.items():
            self.parts.setdefault(k, []).extend(v)

    def select(self, keep: list[int]) -> "Rollouts":
        """Only the groups whose indices are in ``keep``."""
        n = self.rewards.shape[1]
        flat = [g * n + j for g in keep for j in range(n)]
        return Rollouts([self.examples[g] for g in keep], [self.prompts[g] for g in keep],
                        [self.groups[g] for g in keep], self.rewards[keep],
                        {k: [v[i] for i in flat] for k, v in self.parts.items()})

    def part_means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.parts.items() if v}

    def part_stds(self) -> dict[str, float]:
        return {k: float(np.std(v)) for k, v in self.parts.items() if v}


def render_prompt(task, tokenizer, example: dict) -> list[int]:
    """Token ids of the chat prompt, ending with the task's assistant prefill."""
    text = tokenizer.apply_chat_template(task.messages(example), tokenize=False,
                                         add_generation_prompt=True) + task.prefill
    return tokenizer(text, add_special_tokens=False).input_ids


class RolloutSource:
    """Samples and scores groups of completions; algorithms call it for more when needed
    (DAPO's dynamic sampling) and for continuations of partial responses (VinePPO)."""

    def __init__(self, task, tokenizer, engine, sampling: Sampling):
        self.task, self.tokenizer, self.engine, self.sampling = task, tokenizer, engine, sampling
        self.extra_examples = None  # set by the trainer: a function k -> k more examples

    def collect(self, examples: list[dict]) -> Rollouts:
        prompts = [render_prompt(self.task, self.tokenizer, ex) for ex in examples]
        groups = self.engine.generate(prompts, self.sampling)
        rewards, parts = [], {}
        for group, example in zip(groups, examples):
            row = []
            for c in group:
                r = self.task.reward(self.task.prefill + c.text, example)
                row.append(r.total)
                for k, v in r.parts.items():
                    parts.setdefault(k, []).append(v)
            rewards.append(row)
        return Rollouts(list(examples), prompts, groups,
                        torch.tensor(rewards, dtype=torch.float32).reshape(len(groups), -1), parts)

    def more(self, k: int) -> Rollouts | None:
        """Rollouts of ``k`` prompts not yet used this step, or None if there is no source."""
        if self.extra_examples is None:
            return None
        return self.collect(self.extra_examples(k))

    def score_text(self, completion_text: str, example: dict) -> float:
        return self.task.reward(self.task.prefill + completion_text, example).total
