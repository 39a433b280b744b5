"""Tasks for the benchmarks, loaded by name like a user's own task
(``task._target_=bench.bench_tasks.LengthRewardCountdown``, with the repository root on
``PYTHONPATH``)."""

from nanovppo.tasks import Reward
from nanovppo.tasks.countdown import CountdownTask

# Characters at which the length reward stops growing.
LENGTH_CAP = 200


class LengthRewardCountdown(CountdownTask):
    """Countdown prompts with a reward that varies within every group, so that every
    sample carries a gradient in both frameworks (an untrained model solves nothing, and
    a reward that is 0 for all samples gives every advantage 0: nanovppo then skips the
    samples and TRL does not, which would make the two do different work). The reward is
    the completion's length in characters over ``LENGTH_CAP`` (at most 1); two samples of
    a group tie only when their lengths do. No stop string: completions run to EOS or the
    token limit, as TRL's do."""

    stop = ()

    def reward(self, response: str, example: dict) -> Reward:
        return Reward(False, {"length": length_reward(response[len(self.prefill):])})


def length_reward(completion: str) -> float:
    """>>> length_reward("ab"), length_reward("x" * 500)
    (0.01, 1.0)
    """
    return min(len(completion), LENGTH_CAP) / LENGTH_CAP
