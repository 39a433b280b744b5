"""Real engines with their weight push broken, to show that the trainer notices
(tests/test_sync.py)."""

from nanovppo.engines.hf import HFEngine
from nanovppo.engines.vllm import VLLMEngine


class NoPushHFEngine(HFEngine):
    """The hf engine (a copy of the policy) whose push does nothing."""

    def update_weights(self, named_tensors=()) -> None:
        for _ in named_tensors:  # the tensors are produced, and dropped
            pass


class NoPushVLLMEngine(VLLMEngine):
    """The vllm engine whose push does nothing after the weights it starts with."""

    def __init__(self, *args, **kwargs):
        self.started = False
        super().__init__(*args, **kwargs)
        self.started = True
        self._pushed = set()  # it writes no weight, so sleeping releases none (KV cache only)

    def update_weights(self, named_tensors) -> None:
        if not self.started:
            return super().update_weights(named_tensors)
        for _ in named_tensors:
            pass
