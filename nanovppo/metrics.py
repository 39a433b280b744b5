"""What a step reports: the rollout's figures (reward, accuracy, how varied and how
informative its groups are, lengths), the samples table, and the step's log line."""

from __future__ import annotations

import numpy as np


def rollout_metrics(ro, task, rollout_s: float) -> dict:
    """The step's rollout (which took ``rollout_s`` seconds), as ``train/*`` metrics and its
    generation speed (before they are averaged over ranks)."""
    lengths = [len(c.token_ids) for g in ro.groups for c in g]
    truncated = [c.finish_reason == "length" for g in ro.groups for c in g]
    return {
        "train/reward_mean": ro.rewards.mean().item(),
        "train/reward_std": ro.rewards.std(unbiased=False).item(),
        "train/accuracy": ro.correct.float().mean().item(),
        **collapse_metrics(ro, task), **signal_metrics(ro),
        "train/response_length": float(np.mean(lengths)),
        "train/truncated_frac": float(np.mean(truncated)),
        **{f"train/shaping/{k}_mean": v.mean().item() for k, v in ro.shaping.items()},
        "perf/gen_tokens_per_s": sum(lengths) / max(rollout_s, 1e-9),
    }


def samples_table(ro, task) -> dict:
    """The step's completions, one row each, as the MLflow samples table shows them."""
    table = {"prompt": [], "completion": [], "reward": [], "correct": [], "finish_reason": []}
    for g, group in enumerate(ro.groups):
        for j, c in enumerate(group):
            table["prompt"].append(task.messages(ro.examples[g])[-1]["content"])
            table["completion"].append(task.prefill + c.text)
            table["reward"].append(ro.rewards[g, j].item())
            table["correct"].append(bool(ro.correct[g, j]))
            table["finish_reason"].append(c.finish_reason)
    return table


def collapse_metrics(ro, task) -> dict:
    """How varied each group is: the share of distinct completions and of distinct final
    answers among a group's samples, averaged over groups. A policy that has collapsed to
    one output for a prompt scores 1 / group size on both.

    >>> from types import SimpleNamespace as NS
    >>> ro = NS(groups=[[NS(text="a"), NS(text="a")], [NS(text="a"), NS(text="b")]])
    >>> collapse_metrics(ro, NS(prefill="", final_answer=lambda t: "x"))
    {'train/distinct_completions': 0.75, 'train/distinct_answers': 0.5}
    """
    texts = [[c.text for c in g] for g in ro.groups]
    answers = [[task.final_answer(task.prefill + t) for t in g] for g in texts]
    share = lambda rows: float(np.mean([len(set(r)) / len(r) for r in rows])) if rows else 0.0
    return {"train/distinct_completions": share(texts), "train/distinct_answers": share(answers)}


def signal_metrics(ro) -> dict:
    """How many groups carry a learning signal. ``frac_reward_zero_std``: the share of
    groups whose samples all got the same reward (their group-relative advantages are all
    zero: no gradient; TRL logs the same figure under this name); ``frac_mixed_correct``:
    the share where some but not all samples are correct (what RL learns to solve from).

    >>> import torch
    >>> from types import SimpleNamespace as NS
    >>> ro = NS(rewards=torch.tensor([[1., 1.], [0., 0.3], [0., 0.]]),
    ...         correct=torch.tensor([[True, True], [False, False], [False, False]]))
    >>> {k: round(v, 3) for k, v in signal_metrics(ro).items()}
    {'train/frac_reward_zero_std': 0.667, 'train/frac_mixed_correct': 0.0}
    """
    if ro.rewards.numel() == 0:
        return {}
    flat = (ro.rewards == ro.rewards[:, :1]).all(dim=1)  # [G]
    some = ro.correct.any(dim=1) & ~ro.correct.all(dim=1)  # [G]
    return {"train/frac_reward_zero_std": flat.float().mean().item(),
            "train/frac_mixed_correct": some.float().mean().item()}


def bar_postfix(m: dict) -> str:
    """The latest figures, shown beside the run's progress bar."""
    text = f"reward {m['train/reward_mean']:.2f} acc {m['train/accuracy']:.2f}"
    if "eval/accuracy" in m:
        text += f" eval acc {m['eval/accuracy']:.2f}"
    return text


def step_line(step: int, total: int, m: dict) -> str:
    """One log line per step: reward, accuracy, signal, length, where the time went."""
    line = (f"step {step}/{total} | reward {m['train/reward_mean']:.3f} "
            f"acc {m['train/accuracy']:.2f} | distinct {m['train/distinct_completions']:.2f}"
            f" | zero-std {m.get('train/frac_reward_zero_std', 0):.2f}"
            f" | len {m['train/response_length']:.0f} | rollout {m['perf/rollout_s']:.1f}s "
            + (f"values {m['perf/experience_s']:.1f}s " if m["perf/experience_s"] > 0.5 else "")
            + f"update {m['perf/update_s']:.1f}s | {m['perf/gen_tokens_per_s']:.0f} tok/s")
    if "eval/reward_mean" in m:
        line += f" | eval reward {m['eval/reward_mean']:.3f} acc {m['eval/accuracy']:.2f}"
    return line
