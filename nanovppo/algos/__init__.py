"""RL algorithms: how experience is built from scored completions, and the loss."""
