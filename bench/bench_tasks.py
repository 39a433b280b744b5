"""Tasks for the benchmarks, loaded by name like a user's own task
(``task._target_=bench.bench_tasks.LengthRewardCountdown +task.max_new_tokens=N``, with the
repository root on ``PYTHONPATH``)."""

from nanovppo.tasks import Reward
from nanovppo.tasks.countdown import CountdownTask

# Characters per allowed new token at which the length reward stops growing: SmolLM2's
# tokens average about 3-4 characters of English, so a completion cut at the token limit
# stays below the cap and two cut completions still differ.
CHARS_PER_TOKEN_CAP = 8


class LengthRewardCountdown(CountdownTask):
    """Countdown prompts with a reward that varies within every group, so that every
    sample carries a gradient in both frameworks (an untrained model solves nothing, and
    a reward that is 0 for all samples gives every advantage 0: nanovppo then skips the
    samples and TRL does not, which would make the two do different work). The reward is
    the completion's length in characters over ``CHARS_PER_TOKEN_CAP x max_new_tokens``
    (the run's token limit, so that the reward does not saturate as the limit grows);
    two samples of a group tie only when their lengths do. No stop string: completions
    run to EOS or the token limit, as TRL's do."""

    stop = ()

    def __init__(self, *, max_new_tokens: int, **options):
        super().__init__(**options)
        self.length_cap = CHARS_PER_TOKEN_CAP * max_new_tokens

    def reward(self, response: str, example: dict) -> Reward:
        return Reward(False, {"length": length_reward(response[len(self.prefill):],
                                                      self.length_cap)})


def length_reward(completion: str, cap: int) -> float:
    """The completion's length over ``cap`` characters, at most 1.

    >>> length_reward("ab", 200), length_reward("x" * 500, 200), length_reward("x" * 500, 768)
    (0.01, 1.0, 0.6510416666666666)
    """
    return min(len(completion), cap) / cap
