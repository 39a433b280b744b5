"""The trainer's host-memory policy (nanovppo/memory.py) on this process's real malloc."""

import sys

import pytest
import torch

from nanovppo.memory import keep_freed_memory, release_free_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def touch_and_free(mb: int) -> None:
    x = torch.ones(mb * 2 ** 18)  # mb MiB of float32, every page written
    del x


def test_freed_blocks_are_kept_for_reuse_until_released():
    try:
        assert keep_freed_memory(True)
        release_free_memory()
        base = rss_mb()
        touch_and_free(256)
        kept = rss_mb() - base
        release_free_memory()
        released = rss_mb() - base
        assert kept > 200, kept        # the freed block stays resident, ready for reuse
        assert released < 50, released  # and goes back to the OS when asked

        assert keep_freed_memory(False)
        base = rss_mb()
        touch_and_free(256)
        assert rss_mb() - base < 50     # glibc's default: big blocks unmapped at once
    finally:
        keep_freed_memory(True)
