"""A task defined outside nanovppo: Countdown that also rewards short answers.

    PYTHONPATH=examples python -m nanovppo.train task._target_=my_tasks.ConciseCountdown \\
        +task.length_bonus=0.5
"""

from nanovppo.tasks import Reward
from nanovppo.tasks.countdown import CountdownTask


class ConciseCountdown(CountdownTask):
    """Countdown's reward, plus a shaping term of up to ``length_bonus`` for responses under
    100 characters (logged as train/shaping/concise_mean). Correctness is Countdown's own."""

    def __init__(self, length_bonus: float = 0.5, **countdown_options):
        super().__init__(**countdown_options)
        self.length_bonus = length_bonus

    def reward(self, response: str, example: dict) -> Reward:
        base = super().reward(response, example)
        bonus = self.length_bonus * max(0.0, 1.0 - len(response) / 100)
        return Reward(base.correct, {**base.shaping, "concise": bonus})
