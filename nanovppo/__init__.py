"""nanovppo: small, readable reinforcement learning on LLMs with verifiable rewards."""

__version__ = "0.1.0"
