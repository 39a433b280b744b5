"""The three engines against the ``Engine`` protocol the trainer relies on."""

import inspect
import typing

import pytest

from nanovppo.engines.base import Engine
from nanovppo.engines.hf import HFEngine
from nanovppo.engines.sglang import SGLangEngine
from nanovppo.engines.vllm import VLLMEngine

METHODS = sorted(n for n, v in vars(Engine).items() if inspect.isfunction(v) and not n.startswith("_"))
ATTRIBUTES = sorted(typing.get_type_hints(Engine))


def test_the_protocol_names_what_the_trainer_uses():
    """train.py, policy.py and sync.py call these on an engine (and set ``progress``); a protocol
    that lost one would let an engine without it pass the test below."""
    assert METHODS == ["close", "generate", "load_state_dict", "score", "sleep", "state_dict",
                       "update_weights", "wake_up"]
    assert ATTRIBUTES == ["name", "progress", "shares_policy", "trainer_numerics"]


@pytest.mark.parametrize("engine", [HFEngine, VLLMEngine, SGLangEngine], ids=lambda e: e.name)
def test_each_engine_implements_the_protocol(engine):
    for m in METHODS:
        got, want = inspect.signature(getattr(engine, m)), inspect.signature(getattr(Engine, m))
        assert list(got.parameters)[:len(want.parameters)] == list(want.parameters), m
    source = inspect.getsource(engine)
    for a in ATTRIBUTES:  # a class attribute, or set on every instance in __init__
        assert hasattr(engine, a) or f"self.{a} =" in source, a
