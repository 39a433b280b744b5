"""Rollout engines. Each one implements the small protocol in ``base.Engine``."""

from nanovppo.engines.base import Completion, Engine, Sampling

__all__ = ["Completion", "Engine", "Sampling"]
