"""What passes between the trainer and an algorithm: rollouts in, training samples out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanovppo.engines.base import Completion, Sampling
from nanovppo.errors import ConfigError


@dataclass
class Sample:
    """One completion ready for the update.

    ``advantage`` is one number for every token (GRPO, RFT) or one per completion token
    (VinePPO, REINFORCE++). ``engine_logprobs`` are the sampled tokens' log-probs as the
    engine reported them (None if it reports none), for the mismatch correction.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float | list[float]
    reward: float
    truncated: bool
    group: int  # index of the prompt this completion answers
    engine_logprobs: list[float] | None = None


@dataclass
class Rollouts:
    """One batch of prompts, their sampled groups, rewards and correctness."""

    examples: list[dict]
    prompts: list[list[int]]
    groups: list[list[Completion]]
    rewards: torch.Tensor                      # [G, n] total (shaped) rewards
    correct: torch.Tensor                      # [G, n] bool: the task's verdict
    shaping: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [G, n]

    def extend(self, other: "Rollouts") -> None:
        self.examples += other.examples
        self.prompts += other.prompts
        self.groups += other.groups
        self.rewards = torch.cat([self.rewards, other.rewards])
        self.correct = torch.cat([self.correct, other.correct])
        self.shaping = {k: torch.cat([v, other.shaping[k]]) for k, v in self.shaping.items()}

    def select(self, keep: list[int]) -> "Rollouts":
        """Only the groups whose indices are in ``keep``."""
        return Rollouts([self.examples[g] for g in keep], [self.prompts[g] for g in keep],
                        [self.groups[g] for g in keep], self.rewards[keep], self.correct[keep],
                        {k: v[keep] for k, v in self.shaping.items()})


def score(task, examples: list[dict], prompts: list[list[int]],
          groups: list[list[Completion]]) -> Rollouts:
    """Rollouts of sampled ``groups``, each completion scored by the task (prefill included)."""
    rewards = [[task.reward(task.prefill + c.text, ex) for c in g] for g, ex in zip(groups, examples)]
    n = len(groups[0]) if groups else 0
    total = torch.tensor([[r.total for r in row] for row in rewards], dtype=torch.float32)
    correct = torch.tensor([[r.correct for r in row] for row in rewards], dtype=torch.bool)
    names = sorted({k for row in rewards for r in row for k in r.shaping})
    shaping = {k: torch.tensor([[r.shaping.get(k, 0.0) for r in row] for row in rewards],
                               dtype=torch.float32).reshape(len(groups), n) for k in names}
    return Rollouts(list(examples), prompts, groups, total.reshape(len(groups), n),
                    correct.reshape(len(groups), n), shaping)


def with_demonstrations(ro: Rollouts, task, tokenizer) -> Rollouts:
    """``ro`` with one more member in each group: the task's demonstration of its prompt,
    tokenised as the warm start tokenises it and scored by the task like a sample. It was
    not sampled, so it has no engine log-probs."""
    write = getattr(task, "demonstration", None)
    demos = [write(ex) if write else None for ex in ro.examples]
    if any(d is None for d in demos):
        raise ConfigError(f"algo.demonstrations=true, but task {task.name!r} has no "
                          "demonstration for some training problems (Countdown writes them "
                          "for the problems it generates: task.source=generate)")
    groups = [g + [Completion(token_ids=tokenizer(d, add_special_tokens=False).input_ids,
                              text=d, finish_reason="stop", logprobs=None, prompt_ids=list(p))]
              for g, d, p in zip(ro.groups, demos, ro.prompts)]
    return score(task, ro.examples, ro.prompts, groups)


def render_prompt(task, tokenizer, example: dict) -> list[int]:
    """Token ids of the prompt, ending with the task's assistant prefill: the chat template
    over ``task.messages``, or the task's plain text (with the tokenizer's BOS) for a model
    without one."""
    raw = task.prompt_text(example)
    if raw is not None:
        return tokenizer(raw + task.prefill, add_special_tokens=True).input_ids
    text = tokenizer.apply_chat_template(task.messages(example), tokenize=False,
                                         add_generation_prompt=True) + task.prefill
    return tokenizer(text, add_special_tokens=False).input_ids


def context_length(cfg, model) -> int:
    """Tokens of prompt and completion that the run can take: the model's positions, and
    the engine's own limit where it has one (vLLM's ``max_model_len``)."""
    limit = int(getattr(model.config, "max_position_embeddings", None) or 1 << 30)
    if "max_model_len" in cfg.inference_backend:
        limit = min(limit, int(cfg.inference_backend.max_model_len))
    return limit


def drop_over_context(task, tokenizer, context: int, max_new_tokens: int) -> dict[str, int]:
    """Remove the training and test examples whose prompt leaves fewer than
    ``max_new_tokens`` of the ``context`` tokens (a prompt is never cut); returns how many
    of each were removed. A prompt is tokenized only when a bound on its length does not
    already show that it fits: the first example's whole prompt in tokens (at least the
    template's own) plus the UTF-8 bytes of this example's text (at least its tokens)."""
    budget = context - max_new_tokens
    if budget <= 0:
        raise ConfigError(f"rollout.max_new_tokens={max_new_tokens} leaves no room for a "
                          f"prompt in the {context}-token context")
    examples = task.train_examples + task.test_examples
    if not examples:
        return {"train": 0, "test": 0}
    template = len(render_prompt(task, tokenizer, examples[0]))

    def text_bytes(example) -> int:
        raw = task.prompt_text(example)
        parts = [raw] if raw is not None else [m["content"] for m in task.messages(example)]
        return sum(len(p.encode()) for p in parts) + len(task.prefill.encode())

    def fits(example) -> bool:
        return (template + text_bytes(example) <= budget
                or len(render_prompt(task, tokenizer, example)) <= budget)

    dropped = {}
    for split in ("train", "test"):
        kept = [ex for ex in getattr(task, f"{split}_examples") if fits(ex)]
        dropped[split] = len(getattr(task, f"{split}_examples")) - len(kept)
        setattr(task, f"{split}_examples", kept)
    if not task.train_examples or (dropped["test"] and not task.test_examples):
        raise ConfigError(f"no {'training' if not task.train_examples else 'test'} prompt of "
                          f"task {task.name} fits the {context}-token context with "
                          f"rollout.max_new_tokens={max_new_tokens}; raise the engine's "
                          "max_model_len or use a model with a longer context")
    return dropped


class RolloutSource:
    """Samples and scores groups of completions; algorithms call it for more when needed
    (DAPO's dynamic sampling) and for continuations of partial responses (VinePPO).

    ``more_examples(step, k, call)``, given once here, returns ``k`` training examples not
    yet used at ``step`` for the ``call``-th refill of that step (1, 2, ...); None: the
    source has no more (``more`` returns None). ``begin(step)`` starts a step's count."""

    def __init__(self, task, tokenizer, engine, sampling: Sampling, more_examples=None):
        self.task, self.tokenizer, self.engine, self.sampling = task, tokenizer, engine, sampling
        self.more_examples = more_examples
        self.step, self.refills = 0, 0

    def begin(self, step: int) -> None:
        self.step, self.refills = step, 0

    def collect(self, examples: list[dict]) -> Rollouts:
        prompts = [render_prompt(self.task, self.tokenizer, ex) for ex in examples]
        groups = self.engine.generate(prompts, self.sampling)
        return score(self.task, examples, prompts, groups)

    def more(self, k: int) -> Rollouts | None:
        """Rollouts of ``k`` prompts not yet used this step, or None if there is no source."""
        if self.more_examples is None:
            return None
        self.refills += 1
        return self.collect(self.more_examples(self.step, k, self.refills))

    def score_text(self, completion_text: str, example: dict) -> float:
        return self.task.reward(self.task.prefill + completion_text, example).total
