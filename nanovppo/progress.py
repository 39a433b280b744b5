"""Progress bars that say what they count: steps, micro-batches, generated tokens.

``bar(enabled, ...)`` is a tqdm bar that is shown only when ``enabled`` (the trainer's
``trainer.progress``, on rank 0) and standard error is a terminal, so a log file or a CI
run gets the step lines without bar redraws. Log lines go above the bars
(``logging_redirect_tqdm``) instead of through them.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["bar", "logging_redirect_tqdm", "shown"]


def shown(enabled: bool) -> bool:
    """Whether a bar would be drawn: asked for, and on a terminal."""
    return bool(enabled) and sys.stderr.isatty()


def bar(enabled: bool, **kwargs) -> tqdm:
    return tqdm(disable=not shown(enabled), dynamic_ncols=True, **kwargs)
