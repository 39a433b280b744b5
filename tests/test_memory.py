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


def test_release_pages_hands_a_tensors_pages_back_and_keeps_the_tensor():
    """64 MiB of ones: after release_pages the whole pages read as zeros and are no longer
    resident; the tensor stays usable (written pages come back)."""
    from nanovppo.memory import release_pages

    x = torch.ones(16 * 2 ** 20)  # 64 MiB of float32, every page written
    base = rss_mb()
    released = release_pages([x, x[10:]])  # a view of the same storage counts once
    assert 63 * 2 ** 20 <= released <= 64 * 2 ** 20
    assert base - rss_mb() > 60
    assert x.sum().item() < 4096  # at most the two partial pages at the ends keep their ones
    x.fill_(2.0)
    assert x.sum().item() == 2.0 * x.numel() and rss_mb() - base > -4
