"""Elementwise work of the update compiled into one loop each (``trainer.fused_kernels``).

Between its matrix products the update's forward and backward make many passes over
memory: an RMSNorm's statistics and scaling, the gated MLP's SiLU and products, the output
head's softmax over the vocabulary. Eagerly each op is a pass of its own, with a tensor
written and read back between ops (``x.float()``, ``silu(gate)``, ``softmax(logits)``...).
A function marked ``@kernel`` is compiled by ``torch.compile`` (inductor's C++ on a CPU,
Triton on a GPU) into one loop over its inputs, its intermediates kept in registers and
computed in float32; the result is rounded once where the eager ops rounded after each
step in bf16 (the two agree to bf16's resolution, ``tests/test_kernels.py``).

The matrix products stay outside (they run as fast as they can already), and so does
autograd: the kernels are called inside the autograd functions' ``forward`` and
``backward`` (``nanovppo/packed.py``, ``nanovppo/head.py``), on tensors without history.
Shapes are dynamic: one compilation per dtype and number of dimensions, however many
tokens a micro-batch holds; compiled code is cached on disk (inductor's cache), so the
first use on a machine compiles (~15 s for all of them on a 2-core CPU) and later
processes load it (~3 s). Where compiling fails (no C++ compiler, say) the function runs
eagerly from then on, with a warning: the same math, slower.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class Kernel:
    """``fn`` callable as ``kernel(fused, *args)``: compiled where ``fused`` (and compiling
    works), else ``fn`` itself. Any exception from the compiled call sends this call and
    every later one to ``fn``; an error that is not the compiler's is raised again there."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        self.failed = False  # True after a failed compile: eager from then on

    def __call__(self, fused: bool, *args):
        if fused and not self.failed:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly
                log.warning("%s could not be compiled (%s: %s); it runs eagerly, slower",
                            self.__name__, type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                self.failed = True
        return self.fn(*args)


KERNELS: dict[str, Kernel] = {}  # every kernel by name, e.g. to check none fell back


def kernel(fn) -> Kernel:
    """Mark ``fn`` (tensors in, tensors out, no autograd) as a fused kernel."""
    KERNELS[fn.__name__] = Kernel(fn)
    return KERNELS[fn.__name__]
