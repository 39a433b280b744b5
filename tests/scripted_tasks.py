"""Tasks with scripted verdicts, so that runs of the tiny random model (which never solves
Countdown) still have correct samples to keep (RFT) and groups to filter (DAPO)."""

import time

from nanovppo.tasks import Reward
from nanovppo.tasks.countdown import CountdownTask


class EvenLengthCountdown(CountdownTask):
    """Countdown's prompts; a response is "correct" when its length in characters is even
    (about half of the samples), with Countdown's own shaping."""

    def reward(self, response: str, example: dict) -> Reward:
        return Reward(len(response) % 2 == 0, super().reward(response, example).shaping)


class TargetParityCountdown(CountdownTask):
    """Countdown's prompts; a response is "correct" when its length in characters plus the
    problem's target is even, so the verdict depends on both the problem and the response
    (the tiny model's greedy responses all have one length, and about half the targets are
    even)."""

    def reward(self, response: str, example: dict) -> Reward:
        return Reward((len(response) + example["target"]) % 2 == 0,
                      super().reward(response, example).shaping)


class SlowEvenLengthCountdown(EvenLengthCountdown):
    """EvenLengthCountdown whose reward takes 50 ms per response, so that a step of the
    tiny model lasts long enough for a test to kill the run in the middle of one."""

    def reward(self, response: str, example: dict) -> Reward:
        time.sleep(0.05)
        return super().reward(response, example)
