"""How the trainer's process gets and gives back host memory (glibc's malloc on Linux).

On a CPU, torch allocates every tensor through the C library's ``malloc``. Two of glibc's
defaults cost a trainer dearly:

- Blocks above the *mmap threshold* (128 KiB, rising to at most 32 MiB as big blocks are
  freed) are mapped fresh from the OS and unmapped on free, so every activation of every
  micro-batch arrives as new pages the kernel must fault in and zero. For SmolLM2 that was
  ~470k page faults per micro-batch, and a forward + backward took 2.8-3.1 s where it
  takes 2.3-2.4 s with the blocks reused (``keep_freed_memory``).
- Blocks kept in malloc's heaps are only partly returned, and the phases of a step (rollout,
  forward, backward, optimizer) free and allocate differently shaped tensors, so the heaps
  fragment and resident memory grows step after step well above what the process holds.
  ``release_free_memory`` hands the free pages back; the trainer calls it between phases,
  not inside the update, where the same shapes come back every micro-batch.

The trainer wraps each phase of a step in ``phase``: freed pages go back when it ends.
``hardware.low_memory: true`` chooses the other side of the trade during the update, where
memory peaks: glibc's mapping of big blocks (unmapped as soon as they are freed) and a trim
after every micro-batch. With ``trainer.fast: false`` none of this happens (glibc's
defaults throughout).

Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MADV_DONTNEED = 4  # Linux: drop the pages; private anonymous memory reads as zeros after


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both; musl has neither)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def keep_freed_memory(keep: bool = True) -> bool:
    """Serve large tensors from malloc's heap and keep freed ones there for reuse, instead
    of mapping and unmapping pages for each (see the module doc); ``keep=False`` restores
    glibc's starting thresholds (128 KiB): the lowest peak, at the page faults' cost.
    Returns whether it took."""
    if _LIBC is None:
        return False
    size = 1 << 30 if keep else 128 << 10
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, size) and _LIBC.mallopt(_M_TRIM_THRESHOLD, size))


def limit_onednn_cache(capacity: int | None) -> bool:
    """Cap oneDNN's primitive cache (``hardware.onednn_cache``, checked by its schema rule)
    at ``capacity`` entries. oneDNN reads the cap when it first creates a primitive, so this
    acts only before the process's first oneDNN matmul; a cap already in the environment
    is left alone. Returns whether it set one."""
    if capacity is None or "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in os.environ:
        return False
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
    return True


def release_free_memory() -> None:
    """Give the pages of freed blocks back to the operating system (``malloc_trim``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def release_pages(tensors) -> int:
    """Hand the pages of these CPU tensors' memory back to the operating system
    (``madvise(MADV_DONTNEED)``) while keeping the tensors: the whole pages inside each
    storage then read as zeros and come back, zeroed, when next written. For buffers whose
    contents are not needed until they are written again (an engine's KV cache and weights
    during the update). Returns the bytes released; 0 where the C library is not glibc."""
    if _LIBC is None:
        return 0
    page, released, seen = mmap.PAGESIZE, 0, set()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        start = storage.data_ptr()
        if start in seen or not storage.nbytes():
            continue
        seen.add(start)
        first = -(-start // page) * page                   # whole pages only: the partial
        last = (start + storage.nbytes()) // page * page   # ones at the ends stay
        if last > first and _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                                          _MADV_DONTNEED) == 0:
            released += last - first
    return released


class _Phase:
    def __init__(self, low: bool):
        self.low = low

    def trim(self) -> None:
        """Inside a low-memory phase: give freed pages back now (e.g. after a micro-batch)."""
        if self.low:
            release_free_memory()


@contextlib.contextmanager
def phase(on: bool = True, low: bool = False):
    """A phase of a training step (rollout, experience, update). When it ends, the pages it
    freed go back to the OS. ``low``: during the phase, big blocks are mapped and unmapped
    (glibc's defaults) and ``trim()`` hands pages back at once. ``on=False``: nothing."""
    if not on:
        yield _Phase(False)
        return
    if low:
        keep_freed_memory(False)
    try:
        yield _Phase(low)
    finally:
        release_free_memory()
        if low:
            keep_freed_memory()  # back to reusing freed pages for the rest of the step
