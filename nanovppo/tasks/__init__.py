"""Tasks: where examples come from, how a prompt is rendered, and the verifiable reward.

Every task is an object with this small interface (see ``base.Task``):

- ``train_examples`` / ``test_examples``: lists of dicts;
- ``messages(example)``: the chat messages of the prompt, and ``prefill``: the start of the
  assistant turn that the prompt ends with;
- ``reward(response, example)``: a ``Reward`` (total and named parts), a pure function of
  the response text (prefill included) and the example, safe on any text.
"""

from nanovppo.tasks.base import Reward, Task

__all__ = ["Reward", "Task"]
